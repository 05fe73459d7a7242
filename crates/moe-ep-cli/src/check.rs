//! Checks one rank's last dispatch and combine of a T against the naive oracle of
//! `moe-ep-conformance` (bit for bit). Every rank generates every rank's inputs (the workload is
//! seeded), so each rank checks itself, in whichever process it runs.

use crate::workload::RankData;
use moe_ep::{CombineOutput, DispatchOutput, EpConfig};
use moe_ep_conformance::oracle::{self, Problem, RankInput};

/// One rank's last outputs, on the host.
pub struct LastOutputs {
    pub dispatch: DispatchOutput,
    pub combine: CombineOutput,
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
