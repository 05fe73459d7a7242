//! The backend-independent conformance suite, run on the CPU backend.

moe_ep_conformance::conformance_tests!(moe_ep_conformance::CpuBackend);
