//! moe-ep's CUDA kernels as one fatbin (sm_90a machine code and compute_90 PTX), compiled by nvcc
//! when this crate was built. [`FATBIN`] is `None` when no nvcc was found; [`NOT_BUILT`] says why.

include!(concat!(env!("OUT_DIR"), "/fatbin.rs"));
