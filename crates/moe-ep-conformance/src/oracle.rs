//! The naive oracle: the semantics contract (`SPEC.md`, as made precise by `docs/semantics.md`)
//! written as plain loops
//! over (source rank, token, slot), on plain `Vec`s. It shares no code with any backend; only the
//! compare functions look at the library's output types.
//!
//! Arithmetic follows the contract exactly, so a conforming backend matches it bit for bit:
//! f32 accumulators starting at +0.0, `acc + v` for plain sums and `w.mul_add(v, acc)` for
//! weighted sums, in the documented order, one rounding (round-to-nearest-even) to the output dtype.

use half::{bf16, f16};
use moe_ep::{DType, DispatchOutput, Layout};

/// Everything about a collective that the oracle needs: sizes, placement, layout and dtypes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub world: usize,
    pub num_experts: usize,
    pub topk: usize,
    pub hidden: usize,
    /// `expert_to_rank[e]`: the rank owning expert `e`.
    pub expert_to_rank: Vec<usize>,
    pub layout: Layout,
    /// Dispatch payload dtype (`x`).
    pub dtype: DType,
    /// Combine / gradient dtype.
    pub combine_dtype: DType,
    pub scale_columns: usize,
}

impl Problem {
    /// The problem a dispatcher with `config` solves on `world` ranks. Contiguous placement is
    /// `rank_of(e) = e / (E / world)`; a table is taken as given.
    pub fn from_config(config: &moe_ep::EpConfig, world: usize) -> Problem {
        let e = config.num_experts();
        let expert_to_rank = match config.placement() {
            moe_ep::PlacementSpec::Contiguous => {
                let per = (e / world).max(1);
                (0..e).map(|x| x / per).collect()
            }
            moe_ep::PlacementSpec::Table(t) => t.clone(),
        };
        Problem {
            world,
            num_experts: e,
            topk: config.topk(),
            hidden: config.hidden(),
            expert_to_rank,
            layout: config.layout(),
            dtype: config.dtype(),
            combine_dtype: config.combine_dtype(),
            scale_columns: config.scale_columns(),
        }
    }

    /// The rank owning expert `e`.
    pub fn rank_of(&self, e: usize) -> usize {
        self.expert_to_rank[e]
    }

    /// Index of expert `e` among its rank's experts (ascending global id).
    pub fn local_index(&self, e: usize) -> usize {
        let r = self.expert_to_rank[e];
        self.expert_to_rank[..e].iter().filter(|&&x| x == r).count()
    }

    /// E_local(r).
    pub fn num_local(&self, r: usize) -> usize {
        self.expert_to_rank.iter().filter(|&&x| x == r).count()
    }

    /// The ranks of token `t`'s non-(-1) slots, ascending, without repeats: D(t).
    pub fn dest_ranks(&self, topk_row: &[i32]) -> Vec<usize> {
        let mut d: Vec<usize> = topk_row
            .iter()
            .filter(|&&e| e >= 0)
            .map(|&e| self.rank_of(e as usize))
            .collect();
        d.sort_unstable();
        d.dedup();
        d
    }

    fn align(&self) -> Option<usize> {
        match self.layout {
            Layout::TokenMajor => None,
            Layout::ExpertMajor { align } => Some(align),
        }
    }

    /// Bytes of one `x` row.
    pub fn x_row_bytes(&self) -> usize {
        self.hidden * self.dtype.size()
    }

    /// Bytes of one combine-dtype row.
    pub fn y_row_bytes(&self) -> usize {
        self.hidden * self.combine_dtype.size()
    }
}

/// One rank's dispatch input.
#[derive(Debug, Clone, PartialEq)]
pub struct RankInput {
    pub num_tokens: usize,
    /// `[T, H]`, raw bytes of the problem's dtype.
    pub x: Vec<u8>,
    /// `[T, K]`.
    pub topk_idx: Vec<i32>,
    /// `[T, K]`.
    pub weights: Option<Vec<f32>>,
    /// `[T, S]`.
    pub scales: Option<Vec<f32>>,
}

/// What dispatch must produce on one rank.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpectedDispatch {
    /// Valid rows (expert-major: the padded total).
    pub rows: usize,
    /// `[rows, H]` bytes of the dispatch dtype; padding rows zero.
    pub x: Vec<u8>,
    /// `[rows, S]`.
    pub scales: Option<Vec<f32>>,
    /// Token-major only: `[rows, K]` local expert index or -1.
    pub topk_idx: Option<Vec<i32>>,
    /// Token-major `[rows, K]`, expert-major `[rows]`; present when dispatch had weights.
    pub topk_weights: Option<Vec<f32>>,
    /// Token-major `[rows, 2]`, expert-major `[rows, 3]`; -1 on padding rows.
    pub src: Vec<i32>,
    /// Expert-major only: `[rows]`, -1 on padding rows.
    pub local_expert: Option<Vec<i32>>,
    /// Per row: true for an expert-major padding row.
    pub padding: Vec<bool>,
    pub num_recv_per_src: Vec<usize>,
    pub num_recv_per_local_expert: Vec<usize>,
    /// Expert-major only: `E_local + 1` aligned group starts.
    pub expert_offsets: Option<Vec<usize>>,
}

/// What combine must produce on one source rank.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpectedCombine {
    /// `[T, H]` bytes of the combine dtype.
    pub x: Vec<u8>,
    /// `[T, K]`, token-major combine given weights.
    pub weights: Option<Vec<f32>>,
}

// ---------------------------------------------------------------------------------------------
// Element helpers

/// Reads element `i` of `bytes` (a reducible dtype) as f32.
pub fn widen(dtype: DType, bytes: &[u8], i: usize) -> f32 {
    match dtype {
        DType::BF16 => {
            bf16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])).to_f32()
        }
        DType::F16 => f16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])).to_f32(),
        DType::F32 => f32::from_le_bytes([
            bytes[4 * i],
            bytes[4 * i + 1],
            bytes[4 * i + 2],
            bytes[4 * i + 3],
        ]),
        other => panic!("oracle: no arithmetic on {other}"),
    }
}

/// Rounds `v` once (round-to-nearest-even) to `dtype` and writes it as element `i` of `out`.
pub fn narrow(dtype: DType, v: f32, out: &mut [u8], i: usize) {
    match dtype {
        DType::BF16 => {
            out[2 * i..2 * i + 2].copy_from_slice(&bf16::from_f32(v).to_bits().to_le_bytes())
        }
        DType::F16 => {
            out[2 * i..2 * i + 2].copy_from_slice(&f16::from_f32(v).to_bits().to_le_bytes())
        }
        DType::F32 => out[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes()),
        other => panic!("oracle: no arithmetic on {other}"),
    }
}

/// `v` rounded once to `dtype` and read back as f32.
pub fn round_trip(dtype: DType, v: f32) -> f32 {
    let mut b = [0u8; 4];
    narrow(dtype, v, &mut b, 0);
    widen(dtype, &b, 0)
}

// ---------------------------------------------------------------------------------------------
// Routing: which row each (s, t) / (s, t, k) lands on, on each rank.

struct Routes {
    /// Per rank d: rows in order. Token-major: (s, t, usize::MAX). Expert-major: Some((s, t, k)),
    /// None for padding.
    rows: Vec<Vec<Option<(usize, usize, usize)>>>,
    /// token_row[d][s][t]: token-major row of (s, t) on d.
    token_row: Vec<Vec<Vec<Option<usize>>>>,
    /// slot_row[d][s][t * K + k]: expert-major row of (s, t, k) on d.
    slot_row: Vec<Vec<Vec<Option<usize>>>>,
    /// Expert-major: per d, the aligned group starts (E_local + 1).
    offsets: Vec<Vec<usize>>,
}

fn check_inputs(p: &Problem, inputs: &[RankInput]) {
    assert_eq!(inputs.len(), p.world, "oracle: one input per rank");
    for (s, inp) in inputs.iter().enumerate() {
        assert_eq!(
            inp.x.len(),
            inp.num_tokens * p.x_row_bytes(),
            "oracle: x of rank {s}"
        );
        assert_eq!(
            inp.topk_idx.len(),
            inp.num_tokens * p.topk,
            "oracle: topk_idx of rank {s}"
        );
        if let Some(w) = &inp.weights {
            assert_eq!(
                w.len(),
                inp.num_tokens * p.topk,
                "oracle: weights of rank {s}"
            );
        }
        if let Some(sc) = &inp.scales {
            assert_eq!(
                sc.len(),
                inp.num_tokens * p.scale_columns,
                "oracle: scales of rank {s}"
            );
        }
    }
}

fn routes(p: &Problem, inputs: &[RankInput]) -> Routes {
    check_inputs(p, inputs);
    let k_ = p.topk;
    let mut r = Routes {
        rows: vec![Vec::new(); p.world],
        token_row: (0..p.world)
            .map(|_| inputs.iter().map(|i| vec![None; i.num_tokens]).collect())
            .collect(),
        slot_row: (0..p.world)
            .map(|_| {
                inputs
                    .iter()
                    .map(|i| vec![None; i.num_tokens * k_])
                    .collect()
            })
            .collect(),
        offsets: vec![Vec::new(); p.world],
    };
    for d in 0..p.world {
        match p.align() {
            None => {
                for (s, inp) in inputs.iter().enumerate() {
                    for t in 0..inp.num_tokens {
                        let row = &inp.topk_idx[t * k_..(t + 1) * k_];
                        if p.dest_ranks(row).contains(&d) {
                            r.token_row[d][s][t] = Some(r.rows[d].len());
                            r.rows[d].push(Some((s, t, usize::MAX)));
                        }
                    }
                }
            }
            Some(align) => {
                let nl = p.num_local(d);
                let mut offsets = vec![0usize];
                for g in 0..nl {
                    let start = r.rows[d].len();
                    for (s, inp) in inputs.iter().enumerate() {
                        for t in 0..inp.num_tokens {
                            for k in 0..k_ {
                                let e = inp.topk_idx[t * k_ + k];
                                if e >= 0
                                    && p.rank_of(e as usize) == d
                                    && p.local_index(e as usize) == g
                                {
                                    r.slot_row[d][s][t * k_ + k] = Some(r.rows[d].len());
                                    r.rows[d].push(Some((s, t, k)));
                                }
                            }
                        }
                    }
                    let count = r.rows[d].len() - start;
                    let padded = count.div_ceil(align) * align;
                    for _ in count..padded {
                        r.rows[d].push(None);
                    }
                    offsets.push(r.rows[d].len());
                }
                r.offsets[d] = offsets;
            }
        }
    }
    r
}

// ---------------------------------------------------------------------------------------------
// Dispatch

/// The dispatch output of every rank d.
pub fn dispatch(p: &Problem, inputs: &[RankInput]) -> Vec<ExpectedDispatch> {
    let r = routes(p, inputs);
    let (k_, sc) = (p.topk, p.scale_columns);
    let xb = p.x_row_bytes();
    let has_w = inputs.iter().any(|i| i.weights.is_some());
    let has_s = sc > 0;
    (0..p.world)
        .map(|d| {
            let rows = r.rows[d].len();
            let expert_major = p.align().is_some();
            let mut out = ExpectedDispatch {
                rows,
                x: vec![0u8; rows * xb],
                scales: has_s.then(|| vec![0f32; rows * sc]),
                topk_idx: (!expert_major).then(|| vec![-1i32; rows * k_]),
                topk_weights: has_w.then(|| vec![0f32; rows * if expert_major { 1 } else { k_ }]),
                src: vec![-1i32; rows * if expert_major { 3 } else { 2 }],
                local_expert: expert_major.then(|| vec![-1i32; rows]),
                padding: vec![false; rows],
                num_recv_per_src: vec![0; p.world],
                num_recv_per_local_expert: vec![0; p.num_local(d)],
                expert_offsets: expert_major.then(|| r.offsets[d].clone()),
            };
            // Tokens received per source: tokens with d in D(t), whatever the layout.
            for (s, inp) in inputs.iter().enumerate() {
                for t in 0..inp.num_tokens {
                    if p.dest_ranks(&inp.topk_idx[t * k_..(t + 1) * k_])
                        .contains(&d)
                    {
                        out.num_recv_per_src[s] += 1;
                    }
                    for k in 0..k_ {
                        let e = inp.topk_idx[t * k_ + k];
                        if e >= 0 && p.rank_of(e as usize) == d {
                            out.num_recv_per_local_expert[p.local_index(e as usize)] += 1;
                        }
                    }
                }
            }
            for (row, slot) in r.rows[d].iter().enumerate() {
                let Some((s, t, kk)) = *slot else {
                    out.padding[row] = true;
                    continue;
                };
                let inp = &inputs[s];
                out.x[row * xb..(row + 1) * xb].copy_from_slice(&inp.x[t * xb..(t + 1) * xb]);
                if let (Some(o), Some(i)) = (out.scales.as_mut(), inp.scales.as_ref()) {
                    o[row * sc..(row + 1) * sc].copy_from_slice(&i[t * sc..(t + 1) * sc]);
                }
                if expert_major {
                    out.src[row * 3] = s as i32;
                    out.src[row * 3 + 1] = t as i32;
                    out.src[row * 3 + 2] = kk as i32;
                    let e = inp.topk_idx[t * k_ + kk] as usize;
                    out.local_expert.as_mut().unwrap()[row] = p.local_index(e) as i32;
                    if let (Some(o), Some(w)) = (out.topk_weights.as_mut(), inp.weights.as_ref()) {
                        o[row] = w[t * k_ + kk];
                    }
                } else {
                    out.src[row * 2] = s as i32;
                    out.src[row * 2 + 1] = t as i32;
                    for k in 0..k_ {
                        let e = inp.topk_idx[t * k_ + k];
                        if e >= 0 && p.rank_of(e as usize) == d {
                            out.topk_idx.as_mut().unwrap()[row * k_ + k] =
                                p.local_index(e as usize) as i32;
                            if let (Some(o), Some(w)) =
                                (out.topk_weights.as_mut(), inp.weights.as_ref())
                            {
                                o[row * k_ + k] = w[t * k_ + k];
                            }
                        }
                    }
                }
            }
            out
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Combine

fn y_at(p: &Problem, y: &[u8], row: usize, h: usize) -> f32 {
    widen(p.combine_dtype, y, row * p.hidden + h)
}

/// Weighted (expert-major) or plain (token-major) reduction of per-row values back to the source
/// tokens. `w(d, row, s, t, k)` gives the expert-major weight; `None` means a plain sum `acc + v`.
fn reduce_back(
    p: &Problem,
    inputs: &[RankInput],
    r: &Routes,
    y: &[Vec<u8>],
    weight: Option<&dyn Fn(usize, usize, usize, usize, usize) -> f32>,
) -> Vec<Vec<u8>> {
    let (k_, hd, cd) = (p.topk, p.hidden, p.combine_dtype);
    let cb = cd.size();
    for (d, yd) in y.iter().enumerate() {
        assert!(
            yd.len() >= r.rows[d].len() * hd * cb,
            "oracle: y of rank {d} has fewer than {} rows",
            r.rows[d].len()
        );
    }
    inputs
        .iter()
        .enumerate()
        .map(|(s, inp)| {
            let mut out = vec![0u8; inp.num_tokens * hd * cb];
            for t in 0..inp.num_tokens {
                let topk = &inp.topk_idx[t * k_..(t + 1) * k_];
                let dests = p.dest_ranks(topk);
                for h in 0..hd {
                    let mut acc = 0.0f32;
                    for &d in &dests {
                        match p.align() {
                            None => {
                                let row = r.token_row[d][s][t].expect("routed");
                                acc += y_at(p, &y[d], row, h);
                            }
                            Some(_) => {
                                let mut part = 0.0f32;
                                for (k, &e) in topk.iter().enumerate() {
                                    if e < 0 || p.rank_of(e as usize) != d {
                                        continue;
                                    }
                                    let row = r.slot_row[d][s][t * k_ + k].expect("routed");
                                    let v = y_at(p, &y[d], row, h);
                                    part = match weight {
                                        Some(w) => w(d, row, s, t, k).mul_add(v, part),
                                        None => part + v,
                                    };
                                }
                                acc += round_trip(cd, part);
                            }
                        }
                    }
                    narrow(cd, acc, &mut out, t * hd + h);
                }
            }
            out
        })
        .collect()
}

/// Per-slot sum of per-row weights back to the source: `[T, K]`. Token-major rows carry `[rows, K]`,
/// expert-major rows `[rows]`. Summed over the ranks d of D(t) ascending, from 0.0. With
/// `owner_only` (the backward of dispatch) each rank contributes its value only for the slots whose
/// expert it owns, 0.0 for the others; without (token-major combine) every rank's `[row, k]` value
/// is summed.
fn reduce_weights_back(
    p: &Problem,
    inputs: &[RankInput],
    r: &Routes,
    rw: &[Vec<f32>],
    owner_only: bool,
) -> Vec<Vec<f32>> {
    let k_ = p.topk;
    inputs
        .iter()
        .enumerate()
        .map(|(s, inp)| {
            let mut out = vec![0f32; inp.num_tokens * k_];
            for t in 0..inp.num_tokens {
                let topk = &inp.topk_idx[t * k_..(t + 1) * k_];
                let dests = p.dest_ranks(topk);
                for (k, &e) in topk.iter().enumerate() {
                    let mut acc = 0.0f32;
                    for &d in &dests {
                        let owner = !owner_only || (e >= 0 && p.rank_of(e as usize) == d);
                        let v = match p.align() {
                            None => {
                                let row = r.token_row[d][s][t].expect("routed");
                                if owner {
                                    rw[d][row * k_ + k]
                                } else {
                                    0.0
                                }
                            }
                            Some(_) => {
                                // Expert-major rows exist only on the owner.
                                if e >= 0 && p.rank_of(e as usize) == d {
                                    rw[d][r.slot_row[d][s][t * k_ + k].expect("routed")]
                                } else {
                                    0.0
                                }
                            }
                        };
                        acc += v;
                    }
                    out[t * k_ + k] = acc;
                }
            }
            out
        })
        .collect()
}

/// The combine output of every source rank s. `y[d]`: `[>= rows_d, H]` combine-dtype bytes in d's
/// dispatch row order. `weights[d]`: token-major `[rows, K]` (summed into the output's weights),
/// expert-major `[rows]` (the weights of the weighted sum, replacing the dispatch weights).
pub fn combine(
    p: &Problem,
    inputs: &[RankInput],
    y: &[Vec<u8>],
    weights: Option<&[Vec<f32>]>,
) -> Vec<ExpectedCombine> {
    let r = routes(p, inputs);
    let k_ = p.topk;
    let xs = match p.align() {
        None => reduce_back(p, inputs, &r, y, None),
        Some(_) => {
            let w = |d: usize, row: usize, s: usize, t: usize, k: usize| -> f32 {
                if let Some(ws) = weights {
                    ws[d][row]
                } else if let Some(w) = &inputs[s].weights {
                    w[t * k_ + k]
                } else {
                    1.0
                }
            };
            reduce_back(p, inputs, &r, y, Some(&w))
        }
    };
    let ws = match (p.align(), weights) {
        (None, Some(ws)) => Some(reduce_weights_back(p, inputs, &r, ws, false)),
        _ => None,
    };
    xs.into_iter()
        .enumerate()
        .map(|(s, x)| ExpectedCombine {
            x,
            weights: ws.as_ref().map(|w| w[s].clone()),
        })
        .collect()
}

/// The backward of dispatch, per source rank: `(grad_x [T, H] combine dtype, grad_weights [T, K])`.
/// grad_x is the combine of `grad_recv` with every weight 1; grad_weights (when
/// `grad_recv_weights` is given) the owner's per-slot value summed back.
pub fn dispatch_backward(
    p: &Problem,
    inputs: &[RankInput],
    grad_recv: &[Vec<u8>],
    grad_recv_weights: Option<&[Vec<f32>]>,
) -> Vec<(Vec<u8>, Option<Vec<f32>>)> {
    let r = routes(p, inputs);
    let gx = reduce_back(p, inputs, &r, grad_recv, None);
    let gw = grad_recv_weights.map(|w| reduce_weights_back(p, inputs, &r, w, true));
    gx.into_iter()
        .enumerate()
        .map(|(s, g)| (g, gw.as_ref().map(|w| w[s].clone())))
        .collect()
}

/// The backward of combine: `grad_y` per expert rank (`[rows_d, H]` combine dtype, padding rows
/// zero) and the weights' gradient per source rank (expert-major with `y` given).
#[allow(clippy::type_complexity)]
pub fn combine_backward(
    p: &Problem,
    inputs: &[RankInput],
    grad_out: &[Vec<u8>],
    y: Option<&[Vec<u8>]>,
) -> (Vec<Vec<u8>>, Vec<Option<Vec<f32>>>) {
    let r = routes(p, inputs);
    let (k_, hd, cd) = (p.topk, p.hidden, p.combine_dtype);
    let cb = cd.size();
    let yb = hd * cb;
    let grad_y: Vec<Vec<u8>> = (0..p.world)
        .map(|d| {
            let mut g = vec![0u8; r.rows[d].len() * yb];
            for (row, slot) in r.rows[d].iter().enumerate() {
                let Some((s, t, k)) = *slot else { continue };
                match p.align() {
                    None => g[row * yb..(row + 1) * yb]
                        .copy_from_slice(&grad_out[s][t * yb..(t + 1) * yb]),
                    Some(_) => {
                        let w = inputs[s].weights.as_ref().map_or(1.0, |w| w[t * k_ + k]);
                        for h in 0..hd {
                            let v = w * widen(cd, &grad_out[s], t * hd + h);
                            narrow(cd, v, &mut g, row * hd + h);
                        }
                    }
                }
            }
            g
        })
        .collect();
    let grad_w = inputs
        .iter()
        .enumerate()
        .map(|(s, inp)| {
            let y = y?;
            p.align()?;
            let mut out = vec![0f32; inp.num_tokens * k_];
            for t in 0..inp.num_tokens {
                for k in 0..k_ {
                    let e = inp.topk_idx[t * k_ + k];
                    if e < 0 {
                        continue;
                    }
                    let d = p.rank_of(e as usize);
                    let row = r.slot_row[d][s][t * k_ + k].expect("routed");
                    out[t * k_ + k] = warp_dot(
                        (0..hd).map(|h| widen(cd, &grad_out[s], t * hd + h)),
                        (0..hd).map(|h| widen(cd, &y[d], row * hd + h)),
                    );
                }
            }
            Some(out)
        })
        .collect();
    (grad_y, grad_w)
}

/// The f32 dot product in the order of a 32-lane GPU warp (docs/semantics.md, combine_backward):
/// lane l accumulates `a[h] * b[h]` for `h = l, l + 32, ...` with fused multiply-adds from +0.0;
/// then the lanes fold by halves (`p[l] = p[l] + p[l + 16]` for l < 16, then 8, 4, 2, 1).
pub fn warp_dot(a: impl Iterator<Item = f32>, b: impl Iterator<Item = f32>) -> f32 {
    let mut p = [0.0f32; 32];
    for (h, (x, y)) in a.zip(b).enumerate() {
        p[h % 32] = x.mul_add(y, p[h % 32]);
    }
    let mut half = 16;
    while half > 0 {
        for l in 0..half {
            p[l] += p[l + half];
        }
        half /= 2;
    }
    p[0]
}

// ---------------------------------------------------------------------------------------------
// Comparison

/// Bitwise comparison of two byte buffers; the message names the first differing byte.
pub fn compare_bytes(what: &str, expected: &[u8], actual: &[u8]) -> Result<(), String> {
    if expected.len() != actual.len() {
        return Err(format!(
            "{what}: expected {} bytes, got {}",
            expected.len(),
            actual.len()
        ));
    }
    match expected.iter().zip(actual).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(i) => Err(format!(
            "{what}: first difference at byte {i}: expected {:#04x}, got {:#04x}",
            expected[i], actual[i]
        )),
    }
}

fn fmt_elem(dtype: DType, b: &[u8], i: usize) -> String {
    match dtype {
        DType::BF16 | DType::F16 | DType::F32 => {
            let bits = match dtype.size() {
                2 => u16::from_le_bytes([b[2 * i], b[2 * i + 1]]) as u32,
                _ => u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]),
            };
            format!("{} (bits {bits:#x})", widen(dtype, b, i))
        }
        DType::I32 => {
            i32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]).to_string()
        }
        _ => format!("{:#04x}", b[i]),
    }
}

/// Bitwise comparison of `[rows, cols]` tensors of `dtype` given as bytes, over the first `rows`
/// rows, skipping rows where `skip[row]` is true. The message names row, column and both values.
pub fn compare_rows(
    what: &str,
    dtype: DType,
    cols: usize,
    rows: usize,
    skip: Option<&[bool]>,
    expected: &[u8],
    actual: &[u8],
) -> Result<(), String> {
    let es = dtype.size();
    let rb = cols * es;
    if expected.len() < rows * rb {
        return Err(format!(
            "{what}: oracle has {} bytes, fewer than {rows} rows of {rb}",
            expected.len()
        ));
    }
    if actual.len() < rows * rb {
        return Err(format!(
            "{what}: expected at least {rows} rows of {cols} {dtype}, got {} bytes",
            actual.len()
        ));
    }
    for row in 0..rows {
        if skip.is_some_and(|s| s[row]) {
            continue;
        }
        let (e, a) = (
            &expected[row * rb..(row + 1) * rb],
            &actual[row * rb..(row + 1) * rb],
        );
        if e != a {
            let col = (0..cols)
                .find(|&c| e[c * es..(c + 1) * es] != a[c * es..(c + 1) * es])
                .unwrap_or(0);
            return Err(format!(
                "{what}[{row}, {col}]: expected {}, got {}",
                fmt_elem(dtype, e, col),
                fmt_elem(dtype, a, col)
            ));
        }
    }
    Ok(())
}

/// [`compare_rows`] on f32 slices.
pub fn compare_f32(
    what: &str,
    cols: usize,
    rows: usize,
    skip: Option<&[bool]>,
    expected: &[f32],
    actual: &[f32],
) -> Result<(), String> {
    compare_rows(
        what,
        DType::F32,
        cols,
        rows,
        skip,
        bytemuck::cast_slice(expected),
        bytemuck::cast_slice(actual),
    )
}

/// [`compare_rows`] on i32 slices.
pub fn compare_i32(
    what: &str,
    cols: usize,
    rows: usize,
    skip: Option<&[bool]>,
    expected: &[i32],
    actual: &[i32],
) -> Result<(), String> {
    compare_rows(
        what,
        DType::I32,
        cols,
        rows,
        skip,
        bytemuck::cast_slice(expected),
        bytemuck::cast_slice(actual),
    )
}

fn tensor_i32(what: &str, t: &moe_ep::Tensor) -> Result<Vec<i32>, String> {
    t.to_vec::<i32>().map_err(|e| format!("{what}: {e}"))
}

fn tensor_f32(what: &str, t: &moe_ep::Tensor) -> Result<Vec<f32>, String> {
    t.to_vec::<f32>().map_err(|e| format!("{what}: {e}"))
}

fn counts(what: &str, expected: &[usize], t: &moe_ep::Tensor) -> Result<(), String> {
    let a = tensor_i32(what, t)?;
    let e: Vec<i32> = expected.iter().map(|&v| v as i32).collect();
    if a != e {
        return Err(format!("{what}: expected {e:?}, got {a:?}"));
    }
    Ok(())
}

fn presence<T>(what: &str, expected: bool, actual: &Option<T>) -> Result<(), String> {
    if expected != actual.is_some() {
        return Err(format!(
            "{what}: expected {}, got {}",
            if expected { "a tensor" } else { "none" },
            if actual.is_some() { "a tensor" } else { "none" }
        ));
    }
    Ok(())
}

/// Compares one rank's dispatch output with the oracle: payload and side data of the valid,
/// non-padding rows bit for bit, per-row metadata of every valid row, the counts, and `src == -1`
/// (and token-major `topk_idx == -1`) on every row past the valid ones.
pub fn compare_dispatch(
    expected: &ExpectedDispatch,
    actual: &DispatchOutput,
) -> Result<(), String> {
    let rows = expected.rows;
    let expert_major = expected.local_expert.is_some();
    let out_rows = actual.x.rows();
    if out_rows < rows {
        return Err(format!("x: expected at least {rows} rows, got {out_rows}"));
    }
    let xd = actual.x.dims();
    if xd.len() != 2 {
        return Err(format!("x: expected a [rows, H] tensor, got {:?}", xd));
    }
    let hidden = xd[1];
    let dtype = actual.x.dtype();
    if expected.x.len() != rows * hidden * dtype.size() {
        return Err(format!(
            "x: oracle holds {} bytes, the output has rows of {} {dtype} (wrong dtype or H?)",
            expected.x.len(),
            hidden
        ));
    }
    let skip = Some(&expected.padding[..]);
    compare_rows(
        "x",
        dtype,
        hidden,
        rows,
        skip,
        &expected.x,
        actual.x.host_bytes(),
    )?;

    // Every per-row tensor has the same number of rows as x.
    let same_rows = |what: &str, t: &moe_ep::Tensor| -> Result<(), String> {
        if t.rows() != out_rows {
            return Err(format!(
                "{what}: expected {out_rows} rows (like x), got {}",
                t.rows()
            ));
        }
        Ok(())
    };

    presence("scales", expected.scales.is_some(), &actual.scales)?;
    if let (Some(e), Some(a)) = (&expected.scales, &actual.scales) {
        same_rows("scales", a)?;
        let sc = e.len().checked_div(rows).unwrap_or(0);
        compare_f32("scales", sc, rows, skip, e, &tensor_f32("scales", a)?)?;
    }

    presence("topk_idx", expected.topk_idx.is_some(), &actual.topk_idx)?;
    if let (Some(e), Some(a)) = (&expected.topk_idx, &actual.topk_idx) {
        same_rows("topk_idx", a)?;
        let k = a.dims().get(1).copied().unwrap_or(0);
        let av = tensor_i32("topk_idx", a)?;
        if rows > 0 && e.len() != rows * k {
            return Err(format!(
                "topk_idx: expected {} columns, got {k}",
                e.len() / rows
            ));
        }
        compare_i32("topk_idx", k, rows, None, e, &av)?;
        if let Some(i) = av[rows * k..].iter().position(|&v| v != -1) {
            return Err(format!(
                "topk_idx[{}, {}] (unused row): expected -1, got {}",
                rows + i / k.max(1),
                i % k.max(1),
                av[rows * k + i]
            ));
        }
    }

    presence(
        "topk_weights",
        expected.topk_weights.is_some(),
        &actual.topk_weights,
    )?;
    if let (Some(e), Some(a)) = (&expected.topk_weights, &actual.topk_weights) {
        same_rows("topk_weights", a)?;
        let cols = if expert_major {
            1
        } else {
            a.dims().get(1).copied().unwrap_or(0)
        };
        if expert_major && a.dims().len() != 1 {
            return Err(format!("topk_weights: expected [rows], got {:?}", a.dims()));
        }
        compare_f32(
            "topk_weights",
            cols,
            rows,
            None,
            e,
            &tensor_f32("topk_weights", a)?,
        )?;
    }

    same_rows("src", &actual.src)?;
    let src_cols = if expert_major { 3 } else { 2 };
    if actual.src.dims().get(1) != Some(&src_cols) {
        return Err(format!(
            "src: expected [rows, {src_cols}], got {:?}",
            actual.src.dims()
        ));
    }
    let src = tensor_i32("src", &actual.src)?;
    compare_i32("src", src_cols, rows, None, &expected.src, &src)?;
    if let Some(i) = src[rows * src_cols..].iter().position(|&v| v != -1) {
        return Err(format!(
            "src[{}, {}] (unused row): expected -1, got {}",
            rows + i / src_cols,
            i % src_cols,
            src[rows * src_cols + i]
        ));
    }

    presence(
        "local_expert",
        expected.local_expert.is_some(),
        &actual.local_expert,
    )?;
    if let (Some(e), Some(a)) = (&expected.local_expert, &actual.local_expert) {
        same_rows("local_expert", a)?;
        compare_i32(
            "local_expert",
            1,
            rows,
            None,
            e,
            &tensor_i32("local_expert", a)?,
        )?;
    }

    counts(
        "num_recv_per_src",
        &expected.num_recv_per_src,
        &actual.num_recv_per_src,
    )?;
    counts(
        "num_recv_per_local_expert",
        &expected.num_recv_per_local_expert,
        &actual.num_recv_per_local_expert,
    )?;
    presence(
        "expert_offsets",
        expected.expert_offsets.is_some(),
        &actual.expert_offsets,
    )?;
    if let (Some(e), Some(a)) = (&expected.expert_offsets, &actual.expert_offsets) {
        counts("expert_offsets", e, a)?;
    }
    let valid = actual
        .valid_rows()
        .map_err(|e| format!("valid_rows(): {e}"))?;
    if valid != rows {
        return Err(format!("valid_rows(): expected {rows}, got {valid}"));
    }
    if let Some(hc) = &actual.host_counts {
        let want = moe_ep::HostCounts {
            rows,
            per_src: expected.num_recv_per_src.clone(),
            per_local_expert: expected.num_recv_per_local_expert.clone(),
            expert_offsets: expected.expert_offsets.clone(),
        };
        if *hc != want {
            return Err(format!("host_counts: expected {want:?}, got {hc:?}"));
        }
        if out_rows != rows {
            return Err(format!(
                "x: exact sizing (host_counts set) expects exactly {rows} rows, got {out_rows}"
            ));
        }
    }
    Ok(())
}
