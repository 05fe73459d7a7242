//! Naive oracle and backend-independent conformance suite for moe-ep.
//!
//! - [`oracle`]: the semantics contract as plain loops; bit-exact expected outputs.
//! - [`suite`]: cases run against any backend ([`suite::BackendUnderTest`]), one `#[test]` each
//!   through [`conformance_tests!`].
//!
//! ```ignore
//! // tests/conformance_cpu.rs of a backend:
//! moe_ep_conformance::conformance_tests!(moe_ep_conformance::suite::CpuBackend);
//! ```

pub mod oracle;
pub mod suite;

pub use suite::{BackendUnderTest, CpuBackend, CudaLocal};

/// Expands to one `#[test]` per conformance case, each running the case on the backend that
/// `$factory` (an expression implementing [`suite::BackendUnderTest`]) evaluates to.
#[macro_export]
macro_rules! conformance_tests {
    // `$factory` evaluates to `Result<backend, String>`; an `Err` skips the case, printing why.
    (available $factory:expr) => {
        $crate::__conformance_case_list!(try_tests $factory);
    };
    ($factory:expr) => {
        $crate::__conformance_case_list!(tests $factory);
    };
}

/// The one list of case names; `$mode` picks what is emitted for it.
#[macro_export]
#[doc(hidden)]
macro_rules! __conformance_case_list {
    ($($mode:tt)*) => {
        $crate::__conformance_emit!(($($mode)*)
            token_major_basic,
            expert_major_align1,
            expert_major_align4,
            topk_1,
            topk_8,
            zero_tokens_all_ranks,
            tokens_differ_across_ranks,
            tokens_at_max,
            dropped_slot_patterns,
            all_slots_dropped,
            duplicate_expert_ids,
            weights_and_scales,
            combine_weights_given,
            dtype_bf16,
            dtype_f16,
            dtype_f32,
            dtype_fp8,
            dtype_bf16_combine_f32,
            topk_idx_i64,
            placement_table,
            cached_dispatch,
            handles_alive_reverse_order,
            output_sizing_exact,
            extra_rows_handed_back,
            hidden_wide,
            f32_summation_order,
            signed_zeros,
            world_1,
            world_2,
            world_4,
            world_8,
            transpose_identity_token_major,
            transpose_identity_expert_major,
        );
    };
}

#[macro_export]
#[doc(hidden)]
macro_rules! __conformance_emit {
    ((tests $factory:expr) $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                let backend = $factory;
                if let Err(e) = $crate::suite::$case(&backend) {
                    panic!("conformance case `{}` failed:\n{}", stringify!($case), e);
                }
            }
        )*
    };
    ((try_tests $factory:expr) $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                let backend = match $factory {
                    Ok(backend) => backend,
                    Err(reason) => return $crate::suite::print_skip(stringify!($case), &reason),
                };
                if let Err(e) = $crate::suite::$case(&backend) {
                    panic!("conformance case `{}` failed:\n{}", stringify!($case), e);
                }
            }
        )*
    };
    ((array) $($case:ident),* $(,)?) => {
        /// Every conformance case, in order: (name, function).
        pub const CASES: &[$crate::suite::Case] = &[$((stringify!($case), $case as fn(&dyn BackendUnderTest) -> Result<(), String>)),*];
    };
}
