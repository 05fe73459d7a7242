//! Failure handling: a missing peer times out (naming it) and poisons the dispatcher, config and
//! collective mismatches are reported, and a capacity overflow is reported on every rank while the
//! dispatcher stays usable.

use half::bf16;
use moe_ep::{Dispatcher, EpConfig, EpError, Layout, TensorRef};
use moe_ep_conformance::oracle::{self, Problem, RankInput};
use moe_ep_conformance::suite::{self, LayerData, Scenario, Steps};
use moe_ep_conformance::CpuBackend;
use std::sync::Barrier;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_millis(200);

fn scenario(layout: Layout, world: usize) -> Scenario {
    Scenario {
        world,
        num_experts: 2 * world,
        tokens: Some((0..world).map(|r| 3 + r % 2).collect()),
        ..Scenario::new("reliability", layout)
    }
}

fn config_with_timeout(sc: &Scenario) -> EpConfig {
    let c = sc.config().unwrap();
    rebuild(&c).timeout(TIMEOUT).build().unwrap()
}

/// A builder holding every field of `c`.
fn rebuild(c: &EpConfig) -> moe_ep::EpConfigBuilder {
    let mut b = EpConfig::builder()
        .num_experts(c.num_experts())
        .topk(c.topk())
        .hidden(c.hidden())
        .max_tokens_per_rank(c.max_tokens_per_rank())
        .dtype(c.dtype())
        .combine_dtype(c.combine_dtype())
        .layout(c.layout())
        .scale_columns(c.scale_columns())
        .placement(c.placement().clone())
        .output_sizing(c.output_sizing())
        .timeout(c.timeout());
    if let Some(r) = c.recv_capacity() {
        b = b.recv_capacity(r);
    }
    b
}

fn ok<T>(r: Result<T, String>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    }
}

/// Every call on a poisoned dispatcher returns `want` at once.
fn all_calls_return(
    ep: &mut Dispatcher,
    st: &Steps,
    layer: &LayerData,
    handle: &moe_ep::Handle,
    want: &EpError,
) -> Result<(), String> {
    let start = Instant::now();
    let (x, topk, w, s) = st.dispatch_inputs(layer);
    let (y, _) = st.combine_inputs(layer);
    let t = layer.inputs[st.rank].num_tokens;
    let g = vec![bf16::ONE; t * st.sc.hidden];
    let g = TensorRef::new(&g, &[t, st.sc.hidden]).unwrap();
    let results: Vec<(&str, Option<EpError>)> = vec![
        (
            "dispatch",
            ep.dispatch(
                x.view(),
                topk.view(),
                w.as_ref().map(|w| w.view()),
                s.as_ref().map(|s| s.view()),
            )
            .err(),
        ),
        ("combine", ep.combine(handle, y.view(), None).err()),
        (
            "dispatch_cached",
            ep.dispatch_cached(handle, x.view(), None).err(),
        ),
        (
            "dispatch_backward",
            ep.dispatch_backward(handle, y.view(), None).err(),
        ),
        (
            "combine_backward",
            ep.combine_backward(handle, g, None).err(),
        ),
    ];
    for (op, e) in results {
        if e.as_ref() != Some(want) {
            return Err(format!(
                "rank {}: {op} after poisoning: expected {want:?}, got {e:?}",
                st.rank
            ));
        }
    }
    if ep.poisoned() != Some(want) {
        return Err(format!(
            "poisoned(): expected {want:?}, got {:?}",
            ep.poisoned()
        ));
    }
    if start.elapsed() > Duration::from_millis(100) {
        return Err(format!(
            "calls on a poisoned dispatcher took {:?}",
            start.elapsed()
        ));
    }
    Ok(())
}

/// Ranks in `absent` stop after one valid round; the others time out on the next call, naming them.
fn timeout_case(layout: Layout, world: usize, absent: &[usize]) {
    let sc = scenario(layout, world);
    let config = config_with_timeout(&sc);
    let (_, p, layers) = suite::setup(&sc).unwrap();
    let barrier = Barrier::new(world);
    ok(suite::run_ranks(&CpuBackend, world, |group| {
        let rank = group.rank();
        let mut ep = Dispatcher::new(&group, config.clone()).map_err(|e| e.to_string())?;
        let mut st = Steps::new(&sc, &p, rank);
        let (_, handle) = st.dispatch(&mut ep, 0, &layers[0])?;
        st.combine(&mut ep, 0, &layers[0], &handle)?;
        st.finish()?;
        if absent.contains(&rank) {
            // Stays alive (holding its dispatcher) but never calls again.
            barrier.wait();
            return Ok(());
        }
        let start = Instant::now();
        let r = st.dispatch(&mut ep, 0, &layers[0]);
        let elapsed = start.elapsed();
        let err = match ep.poisoned() {
            Some(e) => e.clone(),
            None => {
                barrier.wait();
                return Err(format!("rank {rank}: expected a timeout, got {r:?}"));
            }
        };
        let res = (|| {
            match &err {
                EpError::Timeout {
                    rank: r,
                    missing,
                    waited,
                } => {
                    if *r != rank || missing != absent {
                        return Err(format!(
                            "expected Timeout {{ rank: {rank}, missing: {absent:?} }}, got {err:?}"
                        ));
                    }
                    if *waited < TIMEOUT {
                        return Err(format!("waited {waited:?} < timeout {TIMEOUT:?}"));
                    }
                }
                other => return Err(format!("expected Timeout, got {other:?}")),
            }
            if elapsed < TIMEOUT || elapsed > Duration::from_secs(3) {
                return Err(format!("timed out after {elapsed:?}, timeout {TIMEOUT:?}"));
            }
            match &r {
                Err(e) if e.contains(&err.to_string()) => {}
                other => {
                    return Err(format!(
                        "dispatch: expected the timeout error, got {other:?}"
                    ))
                }
            }
            all_calls_return(&mut ep, &st, &layers[0], &handle, &err)
        })()
        .map_err(|e| format!("rank {rank}: {e}"));
        barrier.wait();
        res
    }));
}

#[test]
fn timeout_names_the_missing_rank_and_poisons_token_major() {
    timeout_case(Layout::TokenMajor, 2, &[1]);
}

#[test]
fn timeout_names_the_missing_rank_and_poisons_expert_major() {
    timeout_case(Layout::ExpertMajor { align: 2 }, 3, &[2]);
}

#[test]
fn timeout_names_every_missing_rank() {
    timeout_case(Layout::TokenMajor, 4, &[1, 3]);
}

#[test]
fn config_mismatch_at_new() {
    let sc = scenario(Layout::TokenMajor, 2);
    let base = config_with_timeout(&sc);
    let other = rebuild(&base).hidden(32).build().unwrap();
    let results = ok(suite::run_ranks(&CpuBackend, 2, |group| {
        let c = if group.rank() == 1 {
            other.clone()
        } else {
            base.clone()
        };
        Ok(Dispatcher::new(&group, c).err())
    }));
    for (rank, e) in results.into_iter().enumerate() {
        match e {
            Some(EpError::ConfigMismatch {
                rank: r,
                peer,
                expected,
                actual,
            }) => {
                assert_eq!(r, rank);
                assert_eq!(peer, 1 - rank);
                assert_ne!(expected, actual);
                let (mine, theirs) = if rank == 0 {
                    ("16", "32")
                } else {
                    ("32", "16")
                };
                assert!(
                    expected.contains(mine) && actual.contains(theirs),
                    "rank {rank}: expected/actual should show hidden {mine} vs {theirs}: {expected} / {actual}"
                );
            }
            other => panic!("rank {rank}: expected ConfigMismatch, got {other:?}"),
        }
    }
}

#[test]
fn collective_mismatch_poisons() {
    let sc = scenario(Layout::TokenMajor, 2);
    let config = config_with_timeout(&sc);
    let (_, p, layers) = suite::setup(&sc).unwrap();
    ok(suite::run_ranks(&CpuBackend, 2, |group| {
        let rank = group.rank();
        let mut ep = Dispatcher::new(&group, config.clone()).map_err(|e| e.to_string())?;
        let mut st = Steps::new(&sc, &p, rank);
        let (_, handle) = st.dispatch(&mut ep, 0, &layers[0])?;
        st.finish()?;
        let start = Instant::now();
        // rank 0 dispatches again, rank 1 combines
        let r = if rank == 0 {
            st.dispatch(&mut ep, 0, &layers[0]).map(|_| ())
        } else {
            st.combine(&mut ep, 0, &layers[0], &handle).map(|_| ())
        };
        let err = ep
            .poisoned()
            .cloned()
            .ok_or_else(|| format!("rank {rank}: expected CollectiveMismatch, got {r:?}"))?;
        let (mine, theirs) = if rank == 0 {
            ("dispatch", "combine")
        } else {
            ("combine", "dispatch")
        };
        let want = EpError::CollectiveMismatch {
            rank,
            peer: 1 - rank,
            expected: mine,
            actual: theirs,
        };
        if err != want {
            return Err(format!("rank {rank}: expected {want:?}, got {err:?}"));
        }
        if start.elapsed() >= TIMEOUT * 5 {
            return Err(format!("rank {rank}: mismatch took {:?}", start.elapsed()));
        }
        all_calls_return(&mut ep, &st, &layers[0], &handle, &err)
    }));
}

#[test]
fn optional_input_given_on_one_rank_only() {
    let sc = scenario(Layout::ExpertMajor { align: 2 }, 2);
    let config = config_with_timeout(&sc);
    let (_, p, layers) = suite::setup(&sc).unwrap();
    ok(suite::run_ranks(&CpuBackend, 2, |group| {
        let rank = group.rank();
        let mut ep = Dispatcher::new(&group, config.clone()).map_err(|e| e.to_string())?;
        let st = Steps::new(&sc, &p, rank);
        let (x, topk, w, _) = st.dispatch_inputs(&layers[0]);
        let w = if rank == 0 { w } else { None };
        let r = ep.dispatch(x.view(), topk.view(), w.as_ref().map(|w| w.view()), None);
        match r {
            Err(EpError::ConfigMismatch { rank: r, peer, .. }) if r == rank && peer == 1 - rank => {
            }
            other => {
                return Err(format!(
                    "rank {rank}: expected ConfigMismatch, got {other:?}"
                ))
            }
        }
        if let Some(e) = ep.poisoned() {
            return Err(format!(
                "rank {rank}: poisoned by an optional-input mismatch: {e}"
            ));
        }
        suite::run_layers_on(&mut ep, &sc, &p, &layers).map(|_| ())
    }));
}

/// Inputs sending every token of every rank to expert 0 (on rank 0).
fn all_to_expert_zero(p: &Problem, t: usize) -> Vec<RankInput> {
    (0..p.world)
        .map(|r| RankInput {
            num_tokens: t,
            x: suite::random_payload(
                &mut <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(r as u64),
                p.dtype,
                t * p.hidden,
                suite::Values::Random,
            ),
            topk_idx: (0..t * p.topk)
                .map(|i| if i % p.topk == 0 { 0 } else { -1 })
                .collect(),
            weights: None,
            scales: None,
        })
        .collect()
}

fn capacity_case(layout: Layout, topk: usize, capacity: usize, overflow_t: usize) {
    let sc = Scenario {
        world: 2,
        num_experts: 4,
        topk,
        max_tokens: 6,
        tokens: Some(vec![1, 1]),
        recv_capacity: Some(capacity),
        ..Scenario::new("capacity", layout)
    };
    let config = sc.config().unwrap();
    let (_, p, layers) = suite::setup(&sc).unwrap();
    let big = all_to_expert_zero(&p, overflow_t);
    let need = oracle::dispatch(&p, &big)[0].rows;
    assert!(need > capacity);
    let want = EpError::CapacityExceeded {
        rank: 0,
        need,
        capacity,
    };
    ok(suite::run_ranks(&CpuBackend, 2, |group| {
        let rank = group.rank();
        let mut ep = Dispatcher::new(&group, config.clone()).map_err(|e| e.to_string())?;
        if ep.recv_capacity() != capacity {
            return Err(format!(
                "recv_capacity(): expected {capacity}, got {}",
                ep.recv_capacity()
            ));
        }
        let inp = &big[rank];
        let x = suite::Staged::new(&inp.x, &[overflow_t, p.hidden], p.dtype);
        let r = ep.dispatch(
            x.view(),
            TensorRef::new(&inp.topk_idx, &[overflow_t, topk]).unwrap(),
            None,
            None,
        );
        match r {
            Err(e) if e == want => {}
            other => {
                return Err(format!(
                    "rank {rank}: expected Err({want:?}), got {other:?}"
                ))
            }
        }
        if let Some(e) = ep.poisoned() {
            return Err(format!("rank {rank}: poisoned by a capacity overflow: {e}"));
        }
        // Still usable: a round that fits, checked against the oracle.
        suite::run_layers_on(&mut ep, &sc, &p, &layers).map(|_| ())
    }));
}

#[test]
fn capacity_exceeded_token_major() {
    capacity_case(Layout::TokenMajor, 4, 3, 4);
}

#[test]
fn capacity_exceeded_expert_major() {
    capacity_case(Layout::ExpertMajor { align: 4 }, 1, 8, 5);
}
