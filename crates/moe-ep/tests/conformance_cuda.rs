//! The backend-independent conformance suite on the CUDA backend: ranks are threads of this
//! process on the GPUs of MOE_EP_TEST_DEVICES (default: every GPU, ranks placed round-robin).
//! Without a usable GPU every case says why it is skipped.

moe_ep_conformance::conformance_tests!(available moe_ep_conformance::CudaLocal::from_env());
