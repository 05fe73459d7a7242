//! Invalid arguments: each returns the exact `EpError` variant naming the argument, nothing is sent,
//! and the next valid call on the same dispatchers works (checked against the oracle).

use half::{bf16, f16};
use moe_ep::{Dispatcher, EpError, Group, Handle, Layout, TensorRef};
use moe_ep_conformance::suite::{self, LayerData, Scenario, Staged, Steps};
use moe_ep_conformance::CpuBackend;
use std::time::Duration;

const TM: Layout = Layout::TokenMajor;
const EM: Layout = Layout::ExpertMajor { align: 4 };

/// World 2, E 8, K 4, H 16, max 8 tokens, bf16, with weights; rank 0 has 8 tokens, rank 1 has 7.
fn scenario(layout: Layout, scales: usize) -> Scenario {
    Scenario {
        scale_columns: scales,
        tokens: Some(vec![8, 7]),
        ..Scenario::new("bad_input", layout)
    }
}

type RankFn<'a> =
    dyn Fn(&Group, &mut Dispatcher, &mut Steps, &[LayerData]) -> Result<(), String> + Sync + 'a;

/// Runs `f` on every rank with a fresh dispatcher, then a full valid round (dispatch, combine,
/// cached dispatch, both backwards) on the same dispatcher, checked against the oracle.
fn each_rank(sc: &Scenario, f: &RankFn<'_>) {
    let (config, p, layers) = suite::setup(sc).unwrap();
    let r = suite::run_ranks(&CpuBackend, sc.world, |group| {
        let mut ep = Dispatcher::new(&group, config.clone()).map_err(|e| e.to_string())?;
        let mut st = Steps::new(sc, &p, group.rank());
        f(&group, &mut ep, &mut st, &layers)?;
        st.finish()?;
        suite::run_layers_on(&mut ep, sc, &p, &layers).map(|_| ())
    });
    if let Err(e) = r {
        panic!("{e}");
    }
}

/// Asserts `r` is exactly the error `want`.
fn expect_err<T: std::fmt::Debug>(r: moe_ep::Result<T>, want: EpError) -> Result<(), String> {
    match r {
        Err(e) if e == want => Ok(()),
        other => Err(format!("expected Err({want:?}), got {other:?}")),
    }
}

fn tokens(layers: &[LayerData], rank: usize) -> usize {
    layers[0].inputs[rank].num_tokens
}

fn bf16s(n: usize) -> Vec<bf16> {
    (0..n)
        .map(|i| bf16::from_f32(i as f32 * 0.25 + 1.0))
        .collect()
}

/// The valid dispatch inputs of this rank, with one argument replaced by the caller.
struct Args {
    x: Staged,
    topk: Staged,
    w: Option<Staged>,
    s: Option<Staged>,
}

fn args(st: &Steps, layers: &[LayerData]) -> Args {
    let (x, topk, w, s) = st.dispatch_inputs(&layers[0]);
    Args { x, topk, w, s }
}

fn dispatch_with(
    ep: &mut Dispatcher,
    x: TensorRef<'_>,
    topk: TensorRef<'_>,
    w: Option<TensorRef<'_>>,
    s: Option<TensorRef<'_>>,
) -> moe_ep::Result<()> {
    ep.dispatch(x, topk, w, s).map(|_| ())
}

#[test]
fn x_wrong_hidden_and_rank() {
    each_rank(&scenario(TM, 0), &|_, ep, st, layers| {
        let a = args(st, layers);
        let t = tokens(layers, st.rank);
        let x = bf16s(t * 15);
        expect_err(
            dispatch_with(
                ep,
                TensorRef::new(&x, &[t, 15]).unwrap(),
                a.topk.view(),
                a.w.as_ref().map(|w| w.view()),
                None,
            ),
            EpError::Shape {
                arg: "x",
                expected: "[T, 16]".into(),
                actual: format!("[{t}, 15]"),
            },
        )?;
        let x = bf16s(t * 16);
        expect_err(
            dispatch_with(
                ep,
                TensorRef::new(&x, &[t * 16]).unwrap(),
                a.topk.view(),
                a.w.as_ref().map(|w| w.view()),
                None,
            ),
            EpError::Shape {
                arg: "x",
                expected: "[T, 16]".into(),
                actual: format!("[{}]", t * 16),
            },
        )
    });
}

#[test]
fn x_wrong_dtype() {
    each_rank(&scenario(EM, 0), &|_, ep, st, layers| {
        let a = args(st, layers);
        let t = tokens(layers, st.rank);
        let x: Vec<f16> = (0..t * 16).map(|i| f16::from_f32(i as f32)).collect();
        expect_err(
            dispatch_with(
                ep,
                TensorRef::new(&x, &[t, 16]).unwrap(),
                a.topk.view(),
                a.w.as_ref().map(|w| w.view()),
                None,
            ),
            EpError::DType {
                arg: "x",
                expected: "bf16".into(),
                actual: "f16".into(),
            },
        )
    });
}

#[test]
fn topk_idx_f32() {
    each_rank(&scenario(TM, 0), &|_, ep, st, layers| {
        let a = args(st, layers);
        let t = tokens(layers, st.rank);
        let idx = vec![0f32; t * 4];
        expect_err(
            dispatch_with(
                ep,
                a.x.view(),
                TensorRef::new(&idx, &[t, 4]).unwrap(),
                a.w.as_ref().map(|w| w.view()),
                None,
            ),
            EpError::DType {
                arg: "topk_idx",
                expected: "i32 or i64".into(),
                actual: "f32".into(),
            },
        )
    });
}

#[test]
fn expert_id_out_of_range() {
    for layout in [TM, EM] {
        each_rank(&scenario(layout, 0), &|_, ep, st, layers| {
            let a = args(st, layers);
            let t = tokens(layers, st.rank);
            for (value, row, col) in [(8i64, 1usize, 2usize), (-2, 0, 0), (1 << 40, 6, 3)] {
                let mut idx: Vec<i64> = layers[0].inputs[st.rank]
                    .topk_idx
                    .iter()
                    .map(|&e| e as i64)
                    .collect();
                idx[row * 4 + col] = value;
                let want = EpError::ExpertOutOfRange {
                    arg: "topk_idx",
                    row,
                    col,
                    value,
                    num_experts: 8,
                };
                expect_err(
                    dispatch_with(
                        ep,
                        a.x.view(),
                        TensorRef::new(&idx, &[t, 4]).unwrap(),
                        a.w.as_ref().map(|w| w.view()),
                        None,
                    ),
                    want.clone(),
                )?;
                if value >= i32::MIN as i64 && value <= i32::MAX as i64 {
                    let idx32: Vec<i32> = idx.iter().map(|&v| v as i32).collect();
                    expect_err(
                        dispatch_with(
                            ep,
                            a.x.view(),
                            TensorRef::new(&idx32, &[t, 4]).unwrap(),
                            a.w.as_ref().map(|w| w.view()),
                            None,
                        ),
                        want,
                    )?;
                }
            }
            Ok(())
        });
    }
}

#[test]
fn too_many_tokens() {
    each_rank(&scenario(TM, 0), &|_, ep, _, _| {
        let x = bf16s(9 * 16);
        let idx = vec![0i32; 9 * 4];
        expect_err(
            dispatch_with(
                ep,
                TensorRef::new(&x, &[9, 16]).unwrap(),
                TensorRef::new(&idx, &[9, 4]).unwrap(),
                None,
                None,
            ),
            EpError::TooManyTokens {
                arg: "x",
                max: 8,
                actual: 9,
            },
        )
    });
}

#[test]
fn topk_mismatch_in_topk_idx_and_weights() {
    each_rank(&scenario(EM, 0), &|_, ep, st, layers| {
        let a = args(st, layers);
        let t = tokens(layers, st.rank);
        let idx = vec![1i32; t * 3];
        expect_err(
            dispatch_with(
                ep,
                a.x.view(),
                TensorRef::new(&idx, &[t, 3]).unwrap(),
                a.w.as_ref().map(|w| w.view()),
                None,
            ),
            EpError::TopkMismatch {
                arg: "topk_idx",
                expected: 4,
                actual: 3,
            },
        )?;
        let w = vec![0.5f32; t * 2];
        expect_err(
            dispatch_with(
                ep,
                a.x.view(),
                a.topk.view(),
                Some(TensorRef::new(&w, &[t, 2]).unwrap()),
                None,
            ),
            EpError::TopkMismatch {
                arg: "topk_weights",
                expected: 4,
                actual: 2,
            },
        )?;
        // topk_idx with a row count other than x's
        let idx = vec![1i32; (t - 1) * 4];
        expect_err(
            dispatch_with(
                ep,
                a.x.view(),
                TensorRef::new(&idx, &[t - 1, 4]).unwrap(),
                None,
                None,
            ),
            EpError::Shape {
                arg: "topk_idx",
                expected: format!("[{t}, 4] (T from x)"),
                actual: format!("[{}, 4]", t - 1),
            },
        )
    });
}

#[test]
fn weights_wrong_dtype() {
    each_rank(&scenario(TM, 0), &|_, ep, st, layers| {
        let a = args(st, layers);
        let t = tokens(layers, st.rank);
        let w = bf16s(t * 4);
        expect_err(
            dispatch_with(
                ep,
                a.x.view(),
                a.topk.view(),
                Some(TensorRef::new(&w, &[t, 4]).unwrap()),
                None,
            ),
            EpError::DType {
                arg: "topk_weights",
                expected: "f32".into(),
                actual: "bf16".into(),
            },
        )
    });
}

#[test]
fn scales_missing_when_required() {
    each_rank(&scenario(EM, 2), &|_, ep, st, layers| {
        let a = args(st, layers);
        let t = tokens(layers, st.rank);
        expect_err(
            dispatch_with(
                ep,
                a.x.view(),
                a.topk.view(),
                a.w.as_ref().map(|w| w.view()),
                None,
            ),
            EpError::Presence {
                arg: "scales",
                expected: "a [T, S] f32 tensor (scale_columns > 0)",
                actual: "none",
            },
        )?;
        let s = vec![1f32; t * 3];
        expect_err(
            dispatch_with(
                ep,
                a.x.view(),
                a.topk.view(),
                a.w.as_ref().map(|w| w.view()),
                Some(TensorRef::new(&s, &[t, 3]).unwrap()),
            ),
            EpError::Shape {
                arg: "scales",
                expected: format!("[{t}, 2]"),
                actual: format!("[{t}, 3]"),
            },
        )?;
        assert!(a.s.is_some());
        Ok(())
    });
}

#[test]
fn scales_present_when_not_configured() {
    each_rank(&scenario(TM, 0), &|_, ep, st, layers| {
        let a = args(st, layers);
        let t = tokens(layers, st.rank);
        let s = vec![1f32; t];
        expect_err(
            dispatch_with(
                ep,
                a.x.view(),
                a.topk.view(),
                a.w.as_ref().map(|w| w.view()),
                Some(TensorRef::new(&s, &[t, 1]).unwrap()),
            ),
            EpError::Presence {
                arg: "scales",
                expected: "none",
                actual: "a tensor",
            },
        )
    });
}

/// A valid, checked dispatch of layer 0 (collective: every rank calls it).
fn dispatch0(ep: &mut Dispatcher, st: &mut Steps, layers: &[LayerData]) -> Result<Handle, String> {
    st.dispatch(ep, 0, &layers[0]).map(|(_, h)| h)
}

#[test]
fn handle_from_another_dispatcher() {
    let sc = scenario(TM, 0);
    let config = sc.config().unwrap();
    each_rank(&sc, &|group, ep, st, layers| {
        // A second dispatcher of the same config on the same group (built on every rank).
        let mut other = Dispatcher::new(group, config.clone()).map_err(|e| e.to_string())?;
        let mut st2 = Steps::new(st.sc, st.p, st.rank);
        let foreign = dispatch0(&mut other, &mut st2, layers)?;
        st2.finish()?;
        let handle = dispatch0(ep, st, layers)?;
        let (y, _) = st.combine_inputs(&layers[0]);
        let want = EpError::ForeignHandle {
            expected: ep.id(),
            actual: other.id(),
        };
        expect_err(ep.combine(&foreign, y.view(), None), want.clone())?;
        let (x, ..) = st.dispatch_inputs(&layers[0]);
        expect_err(ep.dispatch_cached(&foreign, x.view(), None), want.clone())?;
        expect_err(ep.dispatch_backward(&foreign, y.view(), None), want)?;
        // The valid calls still work on both dispatchers.
        st.combine(ep, 0, &layers[0], &handle)?;
        st2.combine(&mut other, 0, &layers[0], &foreign)?;
        st2.finish()
    });
}

#[test]
fn handle_from_a_dispatcher_of_the_other_layout() {
    let tm = scenario(TM, 0);
    let em = scenario(EM, 0);
    let em_config = em.config().unwrap();
    let (_, em_p, em_layers) = suite::setup(&em).unwrap();
    each_rank(&tm, &|group, ep, st, layers| {
        let mut other = Dispatcher::new(group, em_config.clone()).map_err(|e| e.to_string())?;
        let mut st2 = Steps::new(&em, &em_p, st.rank);
        let em_handle = dispatch0(&mut other, &mut st2, &em_layers)?;
        let tm_handle = dispatch0(ep, st, layers)?;
        let (y, _) = st.combine_inputs(&layers[0]);
        expect_err(
            ep.combine(&em_handle, y.view(), None),
            EpError::HandleLayout {
                expected: "token-major",
                actual: "expert-major",
            },
        )?;
        let (y2, _) = st2.combine_inputs(&em_layers[0]);
        expect_err(
            other.combine(&tm_handle, y2.view(), None),
            EpError::HandleLayout {
                expected: "expert-major",
                actual: "token-major",
            },
        )?;
        let (x, ..) = st.dispatch_inputs(&layers[0]);
        expect_err(
            ep.dispatch_cached(&em_handle, x.view(), None),
            EpError::HandleLayout {
                expected: "token-major",
                actual: "expert-major",
            },
        )?;
        st.combine(ep, 0, &layers[0], &tm_handle)?;
        st2.combine(&mut other, 0, &em_layers[0], &em_handle)?;
        st2.finish()
    });
}

#[test]
fn cached_dispatch_with_another_token_count() {
    each_rank(&scenario(EM, 1), &|_, ep, st, layers| {
        let handle = dispatch0(ep, st, layers)?;
        let t = tokens(layers, st.rank);
        let x = bf16s((t - 1) * 16);
        let s = vec![1f32; t - 1];
        expect_err(
            ep.dispatch_cached(
                &handle,
                TensorRef::new(&x, &[t - 1, 16]).unwrap(),
                Some(TensorRef::new(&s, &[t - 1, 1]).unwrap()),
            ),
            EpError::CachedTokenCount {
                arg: "x",
                expected: t,
                actual: t - 1,
            },
        )?;
        // scales missing in the replay
        let (x, ..) = st.dispatch_inputs(&layers[0]);
        expect_err(
            ep.dispatch_cached(&handle, x.view(), None),
            EpError::Presence {
                arg: "scales",
                expected: "a [T, S] f32 tensor (scale_columns > 0)",
                actual: "none",
            },
        )?;
        st.dispatch_cached(ep, 0, &layers[0], &handle)?;
        Ok(())
    });
}

#[test]
fn combine_y_too_few_rows_or_wrong_dtype() {
    for layout in [TM, EM] {
        each_rank(&scenario(layout, 0), &|_, ep, st, layers| {
            let handle = dispatch0(ep, st, layers)?;
            let rows = layers[0].dispatch[st.rank].rows;
            assert!(rows > 0, "the scenario sends rows to every rank");
            let y = bf16s((rows - 1) * 16);
            expect_err(
                ep.combine(&handle, TensorRef::new(&y, &[rows - 1, 16]).unwrap(), None),
                EpError::Shape {
                    arg: "y",
                    expected: format!("[at least {rows}, 16]"),
                    actual: format!("[{}, 16]", rows - 1),
                },
            )?;
            let y32 = vec![1f32; rows * 16];
            expect_err(
                ep.combine(&handle, TensorRef::new(&y32, &[rows, 16]).unwrap(), None),
                EpError::DType {
                    arg: "y",
                    expected: "bf16".into(),
                    actual: "f32".into(),
                },
            )?;
            // weights of the wrong shape for the layout
            let y = bf16s(rows * 16);
            let w = vec![1f32; rows * 3];
            let (wdims, want_expected, want_actual) = match layout {
                Layout::TokenMajor => (
                    vec![rows, 3],
                    format!("[at least {rows}, 4]"),
                    format!("[{rows}, 3]"),
                ),
                Layout::ExpertMajor { .. } => (
                    vec![rows, 3],
                    format!("[at least {rows}]"),
                    format!("[{rows}, 3]"),
                ),
            };
            expect_err(
                ep.combine(
                    &handle,
                    TensorRef::new(&y, &[rows, 16]).unwrap(),
                    Some(TensorRef::new(&w, &wdims).unwrap()),
                ),
                EpError::Shape {
                    arg: "weights",
                    expected: want_expected,
                    actual: want_actual,
                },
            )?;
            // the same checks on the backward ops
            expect_err(
                ep.dispatch_backward(&handle, TensorRef::new(&y32, &[rows, 16]).unwrap(), None),
                EpError::DType {
                    arg: "grad_recv",
                    expected: "bf16".into(),
                    actual: "f32".into(),
                },
            )?;
            let t = tokens(layers, st.rank);
            let g = bf16s((t + 1) * 16);
            expect_err(
                ep.combine_backward(&handle, TensorRef::new(&g, &[t + 1, 16]).unwrap(), None),
                EpError::CachedTokenCount {
                    arg: "grad_out",
                    expected: t,
                    actual: t + 1,
                },
            )?;
            st.combine(ep, 0, &layers[0], &handle)?;
            st.dispatch_backward(ep, 0, &layers[0], &handle)?;
            Ok(())
        });
    }
}

#[test]
fn token_major_combine_backward_rejects_y() {
    each_rank(&scenario(TM, 0), &|_, ep, st, layers| {
        let handle = dispatch0(ep, st, layers)?;
        let t = tokens(layers, st.rank);
        let rows = layers[0].dispatch[st.rank].rows;
        let g = bf16s(t * 16);
        let y = bf16s(rows * 16);
        expect_err(
            ep.combine_backward(
                &handle,
                TensorRef::new(&g, &[t, 16]).unwrap(),
                Some(TensorRef::new(&y, &[rows, 16]).unwrap()),
            ),
            EpError::Presence {
                arg: "y",
                expected: "none",
                actual: "a tensor",
            },
        )?;
        st.combine_backward(ep, 0, &layers[0], &handle)?;
        Ok(())
    });
}

#[test]
fn expert_major_combine_backward_y_too_few_rows() {
    each_rank(&scenario(EM, 0), &|_, ep, st, layers| {
        let handle = dispatch0(ep, st, layers)?;
        let t = tokens(layers, st.rank);
        let rows = layers[0].dispatch[st.rank].rows;
        let g = bf16s(t * 16);
        let y = bf16s((rows - 1) * 16);
        expect_err(
            ep.combine_backward(
                &handle,
                TensorRef::new(&g, &[t, 16]).unwrap(),
                Some(TensorRef::new(&y, &[rows - 1, 16]).unwrap()),
            ),
            EpError::Shape {
                arg: "y",
                expected: format!("[at least {rows}, 16]"),
                actual: format!("[{}, 16]", rows - 1),
            },
        )?;
        st.combine_backward(ep, 0, &layers[0], &handle)?;
        Ok(())
    });
}

/// Only one rank passes a bad argument, notices, and retries correctly while its peers already
/// wait in the valid call: every call completes and matches the oracle.
#[test]
fn one_rank_bad_then_retries_while_peers_wait() {
    for layout in [TM, EM] {
        let sc = Scenario {
            world: 3,
            num_experts: 6,
            tokens: Some(vec![5, 6, 4]),
            ..scenario(layout, 0)
        };
        each_rank(&sc, &|_, ep, st, layers| {
            let t = tokens(layers, st.rank);
            if st.rank == 1 {
                // Let the peers enter dispatch first.
                std::thread::sleep(Duration::from_millis(50));
                let x = bf16s(t * 15);
                let a = args(st, layers);
                expect_err(
                    dispatch_with(
                        ep,
                        TensorRef::new(&x, &[t, 15]).unwrap(),
                        a.topk.view(),
                        a.w.as_ref().map(|w| w.view()),
                        None,
                    ),
                    EpError::Shape {
                        arg: "x",
                        expected: "[T, 16]".into(),
                        actual: format!("[{t}, 15]"),
                    },
                )?;
            }
            let handle = dispatch0(ep, st, layers)?;
            if st.rank == 2 {
                std::thread::sleep(Duration::from_millis(50));
                let y32 = vec![1f32; layers[0].dispatch[2].rows.max(1) * 16];
                let r = ep.combine(
                    &handle,
                    TensorRef::new(&y32, &[layers[0].dispatch[2].rows.max(1), 16]).unwrap(),
                    None,
                );
                if !matches!(r, Err(EpError::DType { arg: "y", .. })) {
                    return Err(format!("expected a DType error for y, got {r:?}"));
                }
            }
            st.combine(ep, 0, &layers[0], &handle)?;
            Ok(())
        });
    }
}

/// A handle stays usable after bad calls that used it, and several bad calls in a row leave nothing
/// behind (the following valid sequence of two layers matches the oracle).
#[test]
fn many_bad_calls_then_valid_layers() {
    let sc = Scenario {
        layers: 2,
        ..scenario(EM, 0)
    };
    each_rank(&sc, &|_, ep, st, layers| {
        let a = args(st, layers);
        let t = tokens(layers, st.rank);
        for _ in 0..5 {
            let idx = vec![9i32; t * 4];
            let r = dispatch_with(
                ep,
                a.x.view(),
                TensorRef::new(&idx, &[t, 4]).unwrap(),
                None,
                None,
            );
            if !matches!(r, Err(EpError::ExpertOutOfRange { .. })) {
                return Err(format!("expected ExpertOutOfRange, got {r:?}"));
            }
        }
        Ok(())
    });
}
