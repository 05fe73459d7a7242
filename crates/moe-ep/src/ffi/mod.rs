//! The unsafe edge: one module per foreign API, each stating the invariants its calls rely on.

pub(crate) mod baseline_kernels;
pub(crate) mod cuda_driver;
pub(crate) mod cuda_event;
pub(crate) mod cuda_kernels;
pub(crate) mod cuda_memory;
pub(crate) mod cuda_stream;
pub(crate) mod device_buffer;
#[cfg(test)]
mod kernel_abi_tests;
pub(crate) mod nccl;
