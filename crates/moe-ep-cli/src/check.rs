//! Checks one T's last dispatch and combine of every rank against the naive oracle of
//! `moe-ep-conformance` (bit for bit).

use crate::workload::RankData;
use moe_ep::{CombineOutput, DispatchOutput, EpConfig};
use moe_ep_conformance::oracle::{self, Problem, RankInput};

/// One rank's last outputs, kept for the check.
pub struct LastOutputs {
    pub dispatch: DispatchOutput,
    pub combine: CombineOutput,
    /// The combine input when it is not the dispatch output itself (fp8 payloads, widened to the
    /// combine dtype): `[valid rows, H]` raw bytes.
    pub y: Option<Vec<u8>>,
}

/// `Ok` when every rank's dispatch and combine match the oracle; otherwise the first mismatch,
/// naming the collective and the rank. Consumes the inputs (the oracle wants them by value-like
/// `Vec`s and the benchmark no longer needs them).
pub fn verify(
    config: &EpConfig,
    world: usize,
    inputs: Vec<RankData>,
    outputs: Vec<LastOutputs>,
) -> Result<(), String> {
    let problem = Problem::from_config(config, world);
    let inputs: Vec<RankInput> = inputs
        .into_iter()
        .map(|r| RankInput {
            num_tokens: r.num_tokens,
            x: r.x,
            topk_idx: r.topk_idx,
            weights: Some(r.weights),
            scales: r.scales,
        })
        .collect();

    let expected = oracle::dispatch(&problem, &inputs);
    for (rank, (e, out)) in expected.iter().zip(&outputs).enumerate() {
        let valid = out
            .dispatch
            .valid_rows()
            .map_err(|m| format!("dispatch rank {rank}: {m}"))?;
        if valid != e.rows {
            return Err(format!(
                "dispatch rank {rank}: expected {} valid rows, got {valid}",
                e.rows
            ));
        }
        oracle::compare_dispatch(e, &out.dispatch)
            .map_err(|m| format!("dispatch rank {rank}: {m}"))?;
    }
    let rows: Vec<usize> = expected.iter().map(|e| e.rows).collect();
    drop(expected);

    // The identity expert: y is the dispatch output (its valid rows), or its widened copy.
    let row_bytes = config.hidden() * config.combine_dtype().size();
    let mut combines = Vec::with_capacity(outputs.len());
    let ys: Vec<Vec<u8>> = outputs
        .into_iter()
        .zip(&rows)
        .map(|(out, &n)| {
            let y = match out.y {
                Some(y) => y,
                None => out.dispatch.x.host_bytes()[..n * row_bytes].to_vec(),
            };
            combines.push(out.combine);
            y
        })
        .collect();
    let expected = oracle::combine(&problem, &inputs, &ys, None);
    drop(ys);
    for (rank, (e, actual)) in expected.iter().zip(&combines).enumerate() {
        oracle::compare_rows(
            &format!("combine rank {rank} x"),
            config.combine_dtype(),
            config.hidden(),
            inputs[rank].num_tokens,
            None,
            &e.x,
            actual.x.host_bytes(),
        )?;
        if actual.x.host_bytes().len() != e.x.len() {
            return Err(format!(
                "combine rank {rank} x: expected {} bytes, got {}",
                e.x.len(),
                actual.x.host_bytes().len()
            ));
        }
    }
    Ok(())
}
