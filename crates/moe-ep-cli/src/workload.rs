//! Random inputs for the benchmark: uniform top-k routing over distinct experts, softmax-like
//! weights, and random non-zero finite token values (never zeros, so a dropped or misplaced row
//! cannot hide behind a zero-filled buffer).

use moe_ep::{DType, Placement};
use rand::rngs::StdRng;
use rand::{Rng, RngCore};

/// What one rank feeds to dispatch (the same fields as the oracle's input).
#[derive(Debug, Clone)]
pub struct RankData {
    pub num_tokens: usize,
    /// `[T, H]` raw bytes of the payload dtype.
    pub x: Vec<u8>,
    /// `[T, K]` distinct expert ids.
    pub topk_idx: Vec<i32>,
    /// `[T, K]` positive, summing to 1 per token.
    pub weights: Vec<f32>,
    /// `[T, S]` when the payload carries scales.
    pub scales: Option<Vec<f32>>,
}

/// Sizes of one benchmark problem.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub world: usize,
    pub hidden: usize,
    pub num_experts: usize,
    pub topk: usize,
    pub dtype: DType,
    pub scale_columns: usize,
}

/// Every rank's inputs for one T, and the rows they send to other ranks.
#[derive(Debug, Clone)]
pub struct Workload {
    pub ranks: Vec<RankData>,
    /// Sum over source ranks of (token, destination rank != source) pairs: the rows that cross
    /// the wire in one dispatch (and come back in one combine).
    pub remote_rows: usize,
}

/// How tokens choose their experts.
#[derive(Debug, Clone, PartialEq)]
pub enum Routing {
    /// K distinct experts, uniformly.
    Uniform,
    /// K distinct experts with popularity falling as 1 / rank^exponent (Zipf) over a seeded
    /// shuffle of the expert ids, so the hot experts are spread over the ranks.
    Zipf { exponent: f64 },
    /// A recorded trace: each rank's `[T, K]` expert ids (see [`load_trace`]).
    Trace(Vec<Vec<i32>>),
}

/// Fresh random inputs for every rank, `t` tokens each (a trace fixes each rank's T itself).
pub fn generate(
    rng: &mut StdRng,
    shape: &Shape,
    placement: &Placement,
    t: usize,
    routing: &Routing,
) -> Workload {
    let (e, k) = (shape.num_experts, shape.topk);
    // Zipf popularity: the expert at popularity rank i has weight 1 / (i + 1)^s.
    let zipf_weights = match routing {
        Routing::Zipf { exponent } => {
            let mut order: Vec<usize> = (0..e).collect();
            for i in (1..e).rev() {
                order.swap(i, rng.random_range(0..=i));
            }
            let mut w = vec![0f64; e];
            for (rank, &expert) in order.iter().enumerate() {
                w[expert] = 1.0 / ((rank + 1) as f64).powf(*exponent);
            }
            Some(w)
        }
        _ => None,
    };
    let ranks: Vec<RankData> = (0..shape.world)
        .map(|r| {
            let topk_idx = match (routing, &zipf_weights) {
                (Routing::Trace(per_rank), _) => per_rank[r].clone(),
                (_, Some(w)) => weighted_routing(rng, t, w, k),
                _ => random_routing(rng, t, e, k),
            };
            let t = topk_idx.len() / k.max(1);
            (t, topk_idx)
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|(t, topk_idx)| RankData {
            num_tokens: t,
            x: random_payload(rng, shape.dtype, t * shape.hidden),
            topk_idx,
            weights: random_weights(rng, t, shape.topk),
            scales: (shape.scale_columns > 0).then(|| {
                (0..t * shape.scale_columns)
                    .map(|_| rng.random_range(0.5f32..2.0))
                    .collect()
            }),
        })
        .collect();
    let remote_rows = ranks
        .iter()
        .enumerate()
        .map(|(s, r)| remote_rows_of(s, &r.topk_idx, shape.topk, placement))
        .sum();
    Workload { ranks, remote_rows }
}

/// Tokens of source rank `src` times destination ranks other than `src` (each destination rank
/// counted once per token: the wire rule).
pub fn remote_rows_of(src: usize, topk_idx: &[i32], k: usize, placement: &Placement) -> usize {
    let mut seen = vec![usize::MAX; placement.world()];
    let mut rows = 0;
    for (t, row) in topk_idx.chunks_exact(k.max(1)).enumerate() {
        for &e in row {
            if e < 0 {
                continue;
            }
            let d = placement.rank_of(e as usize);
            if seen[d] != t {
                seen[d] = t;
                if d != src {
                    rows += 1;
                }
            }
        }
    }
    rows
}

/// `t` rows of `k` distinct experts drawn with probabilities proportional to `weights` (one per
/// expert), without replacement: the `k` largest keys `u^(1/w)` (Efraimidis-Spirakis).
pub fn weighted_routing(rng: &mut StdRng, t: usize, weights: &[f64], k: usize) -> Vec<i32> {
    let mut keys: Vec<(f64, i32)> = Vec::with_capacity(weights.len());
    let mut idx = Vec::with_capacity(t * k);
    for _ in 0..t {
        keys.clear();
        keys.extend(weights.iter().enumerate().map(|(e, &w)| {
            let u: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
            (u.powf(1.0 / w), e as i32)
        }));
        keys.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0));
        idx.extend(keys[..k].iter().map(|&(_, e)| e));
    }
    idx
}

/// A routing trace from a safetensors file: tensors `rank0`, `rank1`, ... (one per rank), each
/// `[T, K]` i32 or i64 expert ids in `[0, num_experts)` or -1. T may differ between ranks.
pub fn load_trace(path: &std::path::Path, shape: &Shape) -> Result<Vec<Vec<i32>>, String> {
    use safetensors::{Dtype, SafeTensors};
    let what = |m: String| format!("--routing {}: {m}", path.display());
    let bytes = std::fs::read(path).map_err(|e| what(e.to_string()))?;
    let file = SafeTensors::deserialize(&bytes)
        .map_err(|e| what(format!("not a safetensors file: {e}")))?;
    (0..shape.world)
        .map(|r| {
            let name = format!("rank{r}");
            let t = file.tensor(&name).map_err(|_| {
                what(format!(
                    "expected a tensor `{name}` (one per rank, world {}), found {:?}",
                    shape.world,
                    file.names()
                ))
            })?;
            let dims = t.shape();
            if dims.len() != 2 || dims[1] != shape.topk {
                return Err(what(format!(
                    "`{name}`: expected shape [T, {}] (--topk), got {dims:?}",
                    shape.topk
                )));
            }
            let ids: Vec<i64> = match t.dtype() {
                Dtype::I32 => t
                    .data()
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64)
                    .collect(),
                Dtype::I64 => t
                    .data()
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect(),
                other => {
                    return Err(what(format!(
                        "`{name}`: expected dtype I32 or I64, got {other:?}"
                    )))
                }
            };
            ids.iter()
                .enumerate()
                .map(|(i, &e)| {
                    if e == -1 || (0..shape.num_experts as i64).contains(&e) {
                        Ok(e as i32)
                    } else {
                        Err(what(format!(
                            "`{name}`[{}, {}]: expected an expert id in [0, {}) or -1, got {e}",
                            i / shape.topk,
                            i % shape.topk,
                            shape.num_experts
                        )))
                    }
                })
                .collect()
        })
        .collect()
}

/// `t` rows of `k` distinct experts drawn uniformly from `[0, e)` (needs `k <= e`).
pub fn random_routing(rng: &mut StdRng, t: usize, e: usize, k: usize) -> Vec<i32> {
    assert!(k <= e, "topk {k} > num_experts {e}");
    let mut idx = Vec::with_capacity(t * k);
    let mut row: Vec<i32> = Vec::with_capacity(k);
    for _ in 0..t {
        row.clear();
        if 2 * k > e {
            // Dense choice: a partial Fisher-Yates shuffle.
            let mut all: Vec<i32> = (0..e as i32).collect();
            for j in 0..k {
                let pick = rng.random_range(j..e);
                all.swap(j, pick);
            }
            row.extend_from_slice(&all[..k]);
        } else {
            while row.len() < k {
                let c = rng.random_range(0..e) as i32;
                if !row.contains(&c) {
                    row.push(c);
                }
            }
        }
        idx.extend_from_slice(&row);
    }
    idx
}

/// `t` rows of `k` positive weights summing to 1 (a softmax of random logits).
pub fn random_weights(rng: &mut StdRng, t: usize, k: usize) -> Vec<f32> {
    let mut w = Vec::with_capacity(t * k);
    for _ in 0..t {
        let start = w.len();
        w.extend((0..k).map(|_| rng.random_range(-2.0f32..2.0).exp()));
        let sum: f32 = w[start..].iter().sum();
        for v in &mut w[start..] {
            *v /= sum;
        }
    }
    w
}

/// `n` random elements of `dtype` as raw bytes: random sign and mantissa, an exponent in a small
/// range around 1, so every value is finite and non-zero (fp8: never NaN).
pub fn random_payload(rng: &mut StdRng, dtype: DType, n: usize) -> Vec<u8> {
    let size = dtype.size();
    let per_word = 8 / size;
    let mut out = Vec::with_capacity(n * size);
    let mut left = n;
    while left > 0 {
        let word = rng.next_u64();
        for j in 0..per_word.min(left) {
            let r = word >> (j * size * 8);
            match dtype {
                DType::BF16 => {
                    let r = r as u16;
                    let bits = (r & 0x8000) | ((123 + ((r >> 12) & 7)) << 7) | (r & 0x7F);
                    out.extend_from_slice(&bits.to_le_bytes());
                }
                DType::F16 => {
                    let r = r as u16;
                    let bits = (r & 0x8000) | ((11 + ((r >> 12) & 7)) << 10) | (r & 0x3FF);
                    out.extend_from_slice(&bits.to_le_bytes());
                }
                DType::F32 => {
                    let r = r as u32;
                    let bits =
                        (r & 0x8000_0000) | ((123 + ((r >> 28) & 7)) << 23) | (r & 0x7F_FFFF);
                    out.extend_from_slice(&bits.to_le_bytes());
                }
                DType::Fp8E4M3 => {
                    let r = r as u8;
                    out.push((r & 0x80) | ((4 + ((r >> 4) & 7)) << 3) | (r & 7));
                }
                DType::I32 | DType::I64 => unreachable!("not a payload dtype"),
            }
        }
        left -= per_word.min(left);
    }
    out
}

/// Decodes one fp8 e4m3 (fn) value; every one of them is exact in bf16.
pub fn fp8_e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((b >> 3) & 0xF);
    let mant = f32::from(b & 7);
    if exp == 15 && b & 7 == 7 {
        return f32::NAN;
    }
    if exp == 0 {
        sign * mant / 8.0 * 2f32.powi(-6)
    } else {
        sign * (1.0 + mant / 8.0) * 2f32.powi(exp - 7)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_ep::PlacementSpec;
    use rand::SeedableRng;

    #[test]
    fn payload_is_finite_and_non_zero() {
        let mut rng = StdRng::seed_from_u64(1);
        for dtype in [DType::BF16, DType::F16, DType::F32, DType::Fp8E4M3] {
            let bytes = random_payload(&mut rng, dtype, 1001);
            assert_eq!(bytes.len(), 1001 * dtype.size());
            let values: Vec<f32> = match dtype {
                DType::BF16 => bytes
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                DType::F16 => bytes
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                DType::F32 => bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                _ => bytes.iter().map(|&b| fp8_e4m3_to_f32(b)).collect(),
            };
            assert!(values.iter().all(|v| v.is_finite() && *v != 0.0), "{dtype}");
            assert!(values.iter().any(|v| *v < 0.0) && values.iter().any(|v| *v > 0.0));
        }
    }

    #[test]
    fn fp8_decoding() {
        assert_eq!(fp8_e4m3_to_f32(0x38), 1.0);
        assert_eq!(fp8_e4m3_to_f32(0xC0), -2.0);
        assert_eq!(fp8_e4m3_to_f32(0x7E), 448.0);
        assert_eq!(fp8_e4m3_to_f32(0x01), 2f32.powi(-9));
        assert!(fp8_e4m3_to_f32(0x7F).is_nan());
    }

    #[test]
    fn routing_is_distinct_and_weights_sum_to_one() {
        let mut rng = StdRng::seed_from_u64(2);
        for (e, k) in [(8, 2), (8, 8), (256, 8), (5, 4)] {
            let idx = random_routing(&mut rng, 50, e, k);
            for row in idx.chunks_exact(k) {
                let mut r = row.to_vec();
                r.sort();
                r.dedup();
                assert_eq!(r.len(), k);
                assert!(r.iter().all(|&x| x >= 0 && (x as usize) < e));
            }
        }
        let w = random_weights(&mut rng, 10, 8);
        for row in w.chunks_exact(8) {
            assert!(row.iter().all(|&v| v > 0.0));
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
    }

    #[test]
    fn remote_rows_dedup_per_rank() {
        let p = Placement::new(&PlacementSpec::Contiguous, 4, 2).unwrap();
        // token 0 -> experts 0,1 (rank 0 twice), token 1 -> 1,2 (ranks 0,1), token 2 -> 3,2 (rank 1).
        let idx = [0, 1, 1, 2, 3, 2];
        assert_eq!(remote_rows_of(0, &idx, 2, &p), 2);
        assert_eq!(remote_rows_of(1, &idx, 2, &p), 2);
    }
}

#[cfg(test)]
mod routing_tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn zipf_routing_is_skewed_and_rows_stay_distinct() {
        let (t, e, k) = (4000, 64, 2);
        let mut rng = StdRng::seed_from_u64(3);
        let weights: Vec<f64> = (0..e).map(|i| 1.0 / ((i + 1) as f64).powf(1.2)).collect();
        let idx = weighted_routing(&mut rng, t, &weights, k);
        let mut counts = vec![0usize; e];
        for row in idx.chunks_exact(k) {
            assert_ne!(row[0], row[1], "a row repeats an expert");
            for &x in row {
                counts[x as usize] += 1;
            }
        }
        let uniform = t * k / e;
        assert!(
            counts[0] > 4 * uniform,
            "hottest expert {} vs uniform {uniform}",
            counts[0]
        );
        assert!(
            counts[e - 1] < uniform,
            "coldest expert {} vs uniform {uniform}",
            counts[e - 1]
        );
    }
}
