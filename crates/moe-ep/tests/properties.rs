//! Property tests: random worlds, expert counts, top-k, hidden sizes, token counts per rank, routing
//! (with -1 slots and duplicate ids) and layouts; dispatch, combine and their backwards equal the
//! oracle bit for bit.

use moe_ep::{DType, Layout, OutputSizing};
use moe_ep_conformance::suite::{self, Routing, Scenario};
use moe_ep_conformance::CpuBackend;
use proptest::prelude::*;

const MAX_T: usize = 5;

#[derive(Debug, Clone)]
struct Params {
    world: usize,
    experts: usize,
    topk: usize,
    hidden: usize,
    layout: Layout,
    dtype: DType,
    weights: bool,
    scales: usize,
    combine_weights: bool,
    exact: bool,
    routing: Vec<Vec<i32>>,
    seed: u64,
}

fn layout() -> impl Strategy<Value = Layout> {
    prop_oneof![
        Just(Layout::TokenMajor),
        (1usize..=4).prop_map(|align| Layout::ExpertMajor { align }),
    ]
}

fn dtype() -> impl Strategy<Value = DType> {
    prop_oneof![
        Just(DType::BF16),
        Just(DType::F16),
        Just(DType::F32),
        Just(DType::Fp8E4M3)
    ]
}

fn params() -> impl Strategy<Value = Params> {
    (1usize..=4, 1usize..=3, 1usize..=6, 1usize..=40)
        .prop_flat_map(|(world, per_rank, topk, hidden)| {
            let experts = world * per_rank;
            let routing: Vec<_> = (0..world)
                .map(|_| {
                    (0..=MAX_T).prop_flat_map(move |t| {
                        // About one slot in five dropped; duplicates arise from the small E.
                        proptest::collection::vec(
                            prop_oneof![1 => Just(-1i32), 4 => 0..experts as i32],
                            t * topk,
                        )
                    })
                })
                .collect();
            (
                Just((world, experts, topk, hidden)),
                layout(),
                dtype(),
                any::<bool>(),
                0usize..=2,
                any::<bool>(),
                any::<bool>(),
                routing,
                any::<u64>(),
            )
        })
        .prop_map(
            |(
                (world, experts, topk, hidden),
                layout,
                dtype,
                weights,
                scales,
                combine_weights,
                exact,
                routing,
                seed,
            )| Params {
                world,
                experts,
                topk,
                hidden,
                layout,
                dtype,
                weights,
                scales,
                combine_weights,
                exact,
                routing,
                seed,
            },
        )
}

fn scenario(p: &Params) -> Scenario {
    Scenario {
        world: p.world,
        num_experts: p.experts,
        topk: p.topk,
        hidden: p.hidden,
        max_tokens: MAX_T,
        tokens: Some(p.routing.iter().map(|r| r.len() / p.topk).collect()),
        dtype: p.dtype,
        weights: p.weights,
        scale_columns: p.scales,
        combine_weights: p.combine_weights,
        sizing: if p.exact {
            OutputSizing::Exact
        } else {
            OutputSizing::Capacity
        },
        routing: Routing::Fixed(p.routing.clone()),
        seed: p.seed,
        ..Scenario::new("property", p.layout)
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 24,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn dispatch_combine_and_backward_equal_the_oracle(p in params()) {
        let sc = scenario(&p);
        if let Err(e) = suite::check(&CpuBackend, &sc) {
            return Err(TestCaseError::fail(format!("{p:?}\n{e}")));
        }
    }

    #[test]
    fn several_layers_equal_the_oracle(p in params()) {
        let sc = Scenario { layers: 2, ..scenario(&p) };
        if let Err(e) = suite::check(&CpuBackend, &sc) {
            return Err(TestCaseError::fail(format!("{p:?}\n{e}")));
        }
    }
}
