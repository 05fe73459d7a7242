//! Checks one rank's last dispatch and combine of a T against the naive oracle of
//! `moe-ep-conformance` (bit for bit). Every rank generates every rank's inputs (the workload is
//! seeded), so each rank checks itself, in whichever process it runs.

use crate::workload::RankData;
use moe_ep::baseline::reference;
use moe_ep::{CombineOutput, DispatchOutput, EpConfig, Placement, Tensor};
use moe_ep_conformance::oracle::{self, Problem, RankInput};

/// One rank's last outputs, on the host.
pub struct LastOutputs {
    pub dispatch: DispatchOutput,
    pub combine: CombineOutput,
    /// The cached dispatch's payload (same rows as `dispatch.x`).
    pub cached: Tensor,
}

/// One rank's last outputs of a baseline path, on the host.
pub struct BaselineOutputs {
    /// The rows dispatch delivered to this rank.
    pub dispatch: Tensor,
    /// Combine's `[T, H]` output on this rank.
    pub combine: Tensor,
}

/// What the oracle says every rank must get for one T. Each rank's expert is the identity:
/// combine's input is the dispatch output, turned into the combine dtype by `to_combine_dtype`
/// (fp8 payloads are widened to bf16).
pub struct Expected {
    dispatch: Vec<oracle::ExpectedDispatch>,
    combine: Vec<oracle::ExpectedCombine>,
    config: EpConfig,
    tokens: Vec<usize>,
}

impl Expected {
    pub fn compute(
        config: &EpConfig,
        inputs: &[RankData],
        to_combine_dtype: &dyn Fn(&[u8]) -> Vec<u8>,
    ) -> Expected {
        let problem = Problem::from_config(config, inputs.len());
        let inputs: Vec<RankInput> = inputs
            .iter()
            .map(|r| RankInput {
                num_tokens: r.num_tokens,
                x: r.x.clone(),
                topk_idx: r.topk_idx.clone(),
                weights: Some(r.weights.clone()),
                scales: r.scales.clone(),
            })
            .collect();
        let dispatch = oracle::dispatch(&problem, &inputs);
        let ys: Vec<Vec<u8>> = dispatch.iter().map(|e| to_combine_dtype(&e.x)).collect();
        let combine = oracle::combine(&problem, &inputs, &ys, None);
        Expected {
            dispatch,
            combine,
            config: config.clone(),
            tokens: inputs.iter().map(|i| i.num_tokens).collect(),
        }
    }
}

/// `Ok` when `rank`'s dispatch and combine match the oracle; otherwise the first mismatch, naming
/// the collective.
pub fn verify_rank(expected: &Expected, rank: usize, out: &LastOutputs) -> Result<(), String> {
    let mine = &expected.dispatch[rank];
    let valid = out
        .dispatch
        .valid_rows()
        .map_err(|m| format!("dispatch rank {rank}: {m}"))?;
    if valid != mine.rows {
        return Err(format!(
            "dispatch rank {rank}: expected {} valid rows, got {valid}",
            mine.rows
        ));
    }
    oracle::compare_dispatch(mine, &out.dispatch)
        .map_err(|m| format!("dispatch rank {rank}: {m}"))?;
    // The cached dispatch replays the same routing with the same payload: the same rows.
    let row_bytes = expected.config.hidden() * expected.config.dtype().size();
    let (want, got) = (out.dispatch.x.host_bytes(), out.cached.host_bytes());
    let n = valid * row_bytes;
    if got.len() < n {
        return Err(format!(
            "cached dispatch rank {rank}: expected at least {valid} rows, got {} bytes",
            got.len()
        ));
    }
    // Expert-major padding rows (src -1) carry no token: their payload is unspecified.
    let src = out
        .dispatch
        .src
        .as_slice::<i32>()
        .map_err(|e| format!("dispatch rank {rank} src: {e}"))?;
    let src_cols = out.dispatch.src.dims().get(1).copied().unwrap_or(1);
    let carries_token = |row: usize| src.get(row * src_cols).is_some_and(|&s| s != -1);
    if let Some(b) = (0..n).find(|&b| carries_token(b / row_bytes.max(1)) && want[b] != got[b]) {
        return Err(format!(
            "cached dispatch rank {rank} row {}: differs from dispatch's (byte {})",
            b / row_bytes.max(1),
            b % row_bytes.max(1)
        ));
    }
    let (e, actual) = (&expected.combine[rank], out.combine.x.host_bytes());
    if actual.len() != e.x.len() {
        return Err(format!(
            "combine rank {rank} x: expected {} bytes, got {}",
            e.x.len(),
            actual.len()
        ));
    }
    oracle::compare_rows(
        &format!("combine rank {rank} x"),
        expected.config.combine_dtype(),
        expected.config.hidden(),
        expected.tokens[rank],
        None,
        &e.x,
        actual,
    )
}

/// A baseline's dispatch rows on rank `rank`, bit for bit: `rows(topk_idx of every rank)` says
/// which source row each output row must be.
fn check_baseline_rows(
    config: &EpConfig,
    inputs: &[RankData],
    rank: usize,
    out: &BaselineOutputs,
    rows: impl Fn(&[&[i32]]) -> Vec<reference::Slot>,
) -> Result<(), String> {
    let idx: Vec<&[i32]> = inputs.iter().map(|r| r.topk_idx.as_slice()).collect();
    let x: Vec<&[u8]> = inputs.iter().map(|r| r.x.as_slice()).collect();
    reference::check_rows(
        &format!("dispatch rank {rank}"),
        &rows(&idx),
        out.dispatch.host_bytes(),
        config.hidden() * config.dtype().size(),
        &x,
    )
}

/// What identity experts hand back for a rank's tokens: each token's x row in the combine dtype.
struct IdentityRows {
    bytes: Vec<u8>,
    row_bytes: usize,
}

impl IdentityRows {
    fn of(config: &EpConfig, mine: &RankData, to_combine_dtype: &dyn Fn(&[u8]) -> Vec<u8>) -> Self {
        IdentityRows {
            bytes: to_combine_dtype(&mine.x),
            row_bytes: config.hidden() * config.combine_dtype().size(),
        }
    }

    fn row(&self, t: usize) -> &[u8] {
        &self.bytes[t * self.row_bytes..(t + 1) * self.row_bytes]
    }
}

/// Checks rank `rank`'s last outputs of the NCCL all-to-all path against what it must produce
/// (`moe_ep::baseline::reference`): the received rows bit for bit, and, with identity experts
/// (y = the received rows in the combine dtype, `to_combine_dtype`), the weighted un-permute
/// `out[t] = sum over k of w[t, k] * x[t]` in the same order, bit for bit.
pub fn verify_alltoall(
    config: &EpConfig,
    placement: &Placement,
    inputs: &[RankData],
    rank: usize,
    out: &BaselineOutputs,
    to_combine_dtype: &dyn Fn(&[u8]) -> Vec<u8>,
) -> Result<(), String> {
    let k = config.topk();
    check_baseline_rows(config, inputs, rank, out, |idx| {
        reference::alltoall_received(idx, k, placement, rank)
    })?;
    let mine = &inputs[rank];
    let y = IdentityRows::of(config, mine, to_combine_dtype);
    let cd = config.combine_dtype();
    let want = reference::weighted_combine(
        &mine.topk_idx,
        &mine.weights,
        k,
        config.hidden(),
        cd,
        placement,
        |t, _| y.row(t),
    );
    let got = out.combine.host_bytes();
    if got.len() != want.len() {
        return Err(format!(
            "combine rank {rank}: expected {} bytes, got {}",
            want.len(),
            got.len()
        ));
    }
    oracle::compare_rows(
        &format!("combine rank {rank}"),
        cd,
        config.hidden(),
        mine.num_tokens,
        None,
        &want,
        got,
    )
}

/// Checks rank `rank`'s last outputs of the all-gather path: the selected rows bit for bit, and
/// with identity experts the reduce-scattered weighted partials (exact up to NCCL's summation
/// order, see `reference::check_allgather_combine`).
pub fn verify_allgather(
    config: &EpConfig,
    placement: &Placement,
    inputs: &[RankData],
    rank: usize,
    out: &BaselineOutputs,
    to_combine_dtype: &dyn Fn(&[u8]) -> Vec<u8>,
) -> Result<(), String> {
    let k = config.topk();
    check_baseline_rows(config, inputs, rank, out, |idx| {
        reference::allgather_selected(idx, k, placement, rank)
    })?;
    let mine = &inputs[rank];
    let y = IdentityRows::of(config, mine, to_combine_dtype);
    reference::check_allgather_combine(
        &format!("combine rank {rank}"),
        &mine.topk_idx,
        &mine.weights,
        k,
        config.hidden(),
        config.combine_dtype(),
        placement,
        |t, _| y.row(t),
        out.combine.host_bytes(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_ep::{DType, PlacementSpec};

    /// Two ranks, four experts, K = 2, H = 2, f32: the worked example's inputs.
    fn example() -> (EpConfig, Placement, Vec<RankData>) {
        let config = EpConfig::builder()
            .num_experts(4)
            .topk(2)
            .hidden(2)
            .max_tokens_per_rank(3)
            .dtype(DType::F32)
            .build()
            .unwrap();
        let placement = Placement::new(&PlacementSpec::Contiguous, 4, 2).unwrap();
        let rank = |r: usize, idx: Vec<i32>, weights: Vec<f32>| RankData {
            num_tokens: 3,
            x: (0..3)
                .flat_map(|t| [(10 * r + t + 1) as f32; 2])
                .flat_map(f32::to_le_bytes)
                .collect(),
            topk_idx: idx,
            weights,
            scales: None,
        };
        let inputs = vec![
            rank(
                0,
                vec![1, 2, 0, 1, 3, -1],
                vec![0.5, 0.5, 0.75, 0.25, 1.0, 0.0],
            ),
            rank(
                1,
                vec![2, 3, -1, -1, 0, 3],
                vec![0.625, 0.375, 0.0, 0.0, 0.875, 0.125],
            ),
        ];
        (config, placement, inputs)
    }

    fn f32_tensor(v: &[f32], rows: usize) -> Tensor {
        Tensor::from_slice(v, &[rows, 2]).unwrap()
    }

    #[test]
    fn the_alltoall_check_accepts_the_right_outputs_and_catches_a_wrong_row() {
        let (config, placement, inputs) = example();
        let same = |b: &[u8]| b.to_vec();
        // Rank 1 receives, by source then (expert, token, slot): from rank 0 token 0 (expert 2)
        // and token 2 (expert 3); from rank 1 token 0 (experts 2, 3) and token 2 (expert 3).
        let received = [1.0, 1.0, 3.0, 3.0, 11.0, 11.0, 11.0, 11.0, 13.0, 13.0];
        // Weights of each token sum to 1 over its valid slots, except rank 1's token 1 (none).
        let good = BaselineOutputs {
            dispatch: f32_tensor(&received, 5),
            combine: f32_tensor(&[11.0, 11.0, 0.0, 0.0, 13.0, 13.0], 3),
        };
        assert_eq!(
            verify_alltoall(&config, &placement, &inputs, 1, &good, &same),
            Ok(())
        );
        let mut swapped = received;
        swapped.swap(0, 2);
        let bad = BaselineOutputs {
            dispatch: f32_tensor(&swapped, 5),
            combine: f32_tensor(&[11.0, 11.0, 0.0, 0.0, 13.0, 13.0], 3),
        };
        let err = verify_alltoall(&config, &placement, &inputs, 1, &bad, &same).unwrap_err();
        assert!(err.starts_with("dispatch rank 1 row 0"), "{err}");
        let wrong_sum = BaselineOutputs {
            dispatch: f32_tensor(&received, 5),
            combine: f32_tensor(&[11.0, 11.0, 0.0, 0.0, 13.0, 12.0], 3),
        };
        let err = verify_alltoall(&config, &placement, &inputs, 1, &wrong_sum, &same).unwrap_err();
        assert!(err.starts_with("combine rank 1"), "{err}");
    }

    #[test]
    fn the_allgather_check_accepts_the_right_outputs_and_catches_a_wrong_row() {
        let (config, placement, inputs) = example();
        let same = |b: &[u8]| b.to_vec();
        // Rank 0 selects, by local expert then (source, token, slot): expert 0: (0, 1, 0),
        // (1, 2, 0); expert 1: (0, 0, 0), (0, 1, 1).
        let selected = [2.0, 2.0, 13.0, 13.0, 1.0, 1.0, 2.0, 2.0];
        let combine = [1.0, 1.0, 2.0, 2.0, 3.0, 3.0];
        let good = BaselineOutputs {
            dispatch: f32_tensor(&selected, 4),
            combine: f32_tensor(&combine, 3),
        };
        assert_eq!(
            verify_allgather(&config, &placement, &inputs, 0, &good, &same),
            Ok(())
        );
        let mut wrong = selected;
        wrong[2] = 11.0;
        let bad = BaselineOutputs {
            dispatch: f32_tensor(&wrong, 4),
            combine: f32_tensor(&combine, 3),
        };
        let err = verify_allgather(&config, &placement, &inputs, 0, &bad, &same).unwrap_err();
        assert!(err.starts_with("dispatch rank 0 row 1"), "{err}");
        let bad = BaselineOutputs {
            dispatch: f32_tensor(&selected, 4),
            combine: f32_tensor(&[1.0, 1.0, 2.0, 2.0, 13.0, 13.0], 3),
        };
        let err = verify_allgather(&config, &placement, &inputs, 0, &bad, &same).unwrap_err();
        assert!(err.starts_with("combine rank 0 token 2"), "{err}");
    }
}
