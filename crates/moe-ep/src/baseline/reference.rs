//! What the baselines must produce, computed on the host from every rank's inputs: the row layouts
//! (pure functions of the routing, testable without a GPU) and checks of a baseline's outputs. A
//! slot is one `(token, k)` entry of a rank's `[T, K]` expert ids; a slot whose id is -1 (or out of
//! range) is not moved, as the kernels do.

use crate::dtype::DType;
use crate::numerics;
use crate::placement::Placement;
use half::{bf16, f16};

/// One row of a baseline's dispatch output: slot `k` of token `token` of rank `src`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Slot {
    pub src: usize,
    pub token: usize,
    pub k: usize,
}

/// The expert of slot `i` of `topk_idx`, when it has one.
fn expert(topk_idx: &[i32], i: usize, placement: &Placement) -> Option<usize> {
    let e = topk_idx[i];
    (e >= 0 && (e as usize) < placement.num_experts()).then_some(e as usize)
}

/// The rows one source rank's dispatch sends to each rank under the wire rule (a token goes once
/// to each rank owning one of its experts), `[world]`, the source's own entry included: the bytes
/// the contract needs moved, which the copy-engine ceiling moves.
pub fn rows_per_destination(topk_idx: &[i32], topk: usize, placement: &Placement) -> Vec<usize> {
    let mut rows = vec![0; placement.world()];
    let mut seen = vec![usize::MAX; placement.world()];
    for (t, row) in topk_idx.chunks_exact(topk.max(1)).enumerate() {
        for i in 0..row.len() {
            if let Some(e) = expert(row, i, placement) {
                let d = placement.rank_of(e);
                if seen[d] != t {
                    seen[d] = t;
                    rows[d] += 1;
                }
            }
        }
    }
    rows
}

/// The NCCL all-to-all path's send order on one rank (Megatron's permutation): the slots with an
/// expert as `(token, k)`, ordered by the expert's rank, then its local index there, then token,
/// then k; and the rows sent to each rank, `[world]` (one row per slot: the path moves one row
/// per (token, expert), where the wire rule moves one per (token, rank)).
pub fn alltoall_send_order(
    topk_idx: &[i32],
    topk: usize,
    placement: &Placement,
) -> (Vec<(usize, usize)>, Vec<usize>) {
    let mut keyed: Vec<((usize, usize), (usize, usize))> = (0..topk_idx.len())
        .filter_map(|i| {
            expert(topk_idx, i, placement).map(|e| {
                let key = (placement.rank_of(e), placement.local_index(e));
                (key, (i / topk, i % topk))
            })
        })
        .collect();
    // Slots are generated in (token, k) order, so a stable sort by bucket keeps that order inside.
    keyed.sort_by_key(|&(key, _)| key);
    let mut counts = vec![0; placement.world()];
    for &((d, _), _) in &keyed {
        counts[d] += 1;
    }
    (keyed.into_iter().map(|(_, slot)| slot).collect(), counts)
}

/// The rows rank `rank` receives in the NCCL all-to-all path: by source rank, then in each
/// source's send order ([`alltoall_send_order`]). `topk_idx[s]` is rank s's `[T_s, K]` ids.
pub fn alltoall_received(
    topk_idx: &[&[i32]],
    topk: usize,
    placement: &Placement,
    rank: usize,
) -> Vec<Slot> {
    let mut rows = Vec::new();
    for (src, idx) in topk_idx.iter().enumerate() {
        let (order, _) = alltoall_send_order(idx, topk, placement);
        rows.extend(
            order
                .into_iter()
                .filter(|&(t, k)| {
                    expert(idx, t * topk + k, placement).map(|e| placement.rank_of(e)) == Some(rank)
                })
                .map(|(token, k)| Slot { src, token, k }),
        );
    }
    rows
}

/// The rows rank `rank` selects in the all-gather path from every rank's gathered tokens: one per
/// slot whose expert it owns, by the expert's local index, then source rank, token, k.
pub fn allgather_selected(
    topk_idx: &[&[i32]],
    topk: usize,
    placement: &Placement,
    rank: usize,
) -> Vec<Slot> {
    let mut keyed: Vec<(usize, Slot)> = Vec::new();
    for (src, idx) in topk_idx.iter().enumerate() {
        for i in 0..idx.len() {
            if let Some(e) = expert(idx, i, placement).filter(|&e| placement.rank_of(e) == rank) {
                let slot = Slot {
                    src,
                    token: i / topk,
                    k: i % topk,
                };
                keyed.push((placement.local_index(e), slot));
            }
        }
    }
    keyed.sort();
    keyed.into_iter().map(|(_, slot)| slot).collect()
}

/// `Ok` when `got` holds exactly one row of `row_bytes` bytes per expected slot, each equal to its
/// source token's row `x[slot.src][token]` bit for bit; otherwise the first difference. `what`
/// names the output in the message.
pub fn check_rows(
    what: &str,
    expected: &[Slot],
    got: &[u8],
    row_bytes: usize,
    x: &[&[u8]],
) -> Result<(), String> {
    if got.len() != expected.len() * row_bytes {
        return Err(format!(
            "{what}: expected {} rows ({} bytes), got {} bytes",
            expected.len(),
            expected.len() * row_bytes,
            got.len()
        ));
    }
    for (row, (slot, g)) in expected
        .iter()
        .zip(got.chunks_exact(row_bytes.max(1)))
        .enumerate()
    {
        let want = &x[slot.src][slot.token * row_bytes..(slot.token + 1) * row_bytes];
        if let Some(b) = (0..row_bytes).find(|&b| want[b] != g[b]) {
            return Err(format!(
                "{what} row {row}: expected token {} of rank {} (slot {}), byte {b} differs: expected {:#04x}, got {:#04x}",
                slot.token, slot.src, slot.k, want[b], g[b]
            ));
        }
    }
    Ok(())
}

/// The NCCL all-to-all path's combine on one rank: `out[t]` = the sum over k ascending of the
/// slots with an expert of `weights[t, k] * y(t, k)`, widened to f32, one fused multiply-add per
/// term from +0.0, rounded once to `dtype`. `y(t, k)` is the row (`hidden` elements of `dtype`)
/// the expert sent back for slot `(t, k)`.
pub fn weighted_combine<'a>(
    topk_idx: &[i32],
    weights: &[f32],
    topk: usize,
    hidden: usize,
    dtype: DType,
    placement: &Placement,
    y: impl Fn(usize, usize) -> &'a [u8],
) -> Vec<u8> {
    let tokens = topk_idx.len() / topk.max(1);
    let mut out = vec![0u8; tokens * hidden * dtype.size()];
    let mut acc = vec![0f32; hidden];
    for (t, o) in out
        .chunks_exact_mut((hidden * dtype.size()).max(1))
        .enumerate()
    {
        acc.fill(0.0);
        for k in 0..topk {
            if expert(topk_idx, t * topk + k, placement).is_some() {
                numerics::accumulate(&mut acc, y(t, k), dtype, Some(weights[t * topk + k]));
            }
        }
        numerics::store(&acc, o, dtype);
    }
    out
}

/// Element `i` of `bytes` (elements of a reducible `dtype`), widened to f32.
fn element(bytes: &[u8], dtype: DType, i: usize) -> f32 {
    let s = dtype.size();
    let b = &bytes[i * s..(i + 1) * s];
    match dtype {
        DType::BF16 => bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        DType::F16 => f16::from_le_bytes([b[0], b[1]]).to_f32(),
        DType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        other => unreachable!("{other} is not a combine dtype"),
    }
}

/// `v` rounded to nearest even in `dtype`, widened back.
fn round_to(v: f32, dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => bf16::from_f32(v).to_f32(),
        DType::F16 => f16::from_f32(v).to_f32(),
        DType::F32 => v,
        other => unreachable!("{other} is not a combine dtype"),
    }
}

/// The unit roundoff of `dtype` (half an ulp of 1).
fn unit_roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 2f64.powi(-8),
        DType::F16 => 2f64.powi(-11),
        _ => 2f64.powi(-24),
    }
}

/// Checks the all-gather path's combine on one rank. Each expert rank d computes, for every token
/// of every rank, the partial `p_d[t]` = the sum over the slots of t whose expert d owns, k
/// ascending, of `weights[t, k] * y(t, k)` (f32 fused multiply-adds from +0.0, rounded once to
/// `dtype`), and NCCL's reduce-scatter adds the partials of all ranks in an order of its choosing,
/// rounding to `dtype` after each addition (ranks without a slot of t add an exact +0). So `got`
/// must equal the sum bit for bit when at most two partials are non-zero (one rounding, whatever
/// the order), and lie within the error bound of a recursive sum, `(n - 1) * u * sum |p_d|` for n
/// partials and unit roundoff u, otherwise. `weights`, `topk_idx` and `y` are this rank's.
#[allow(clippy::too_many_arguments)]
pub fn check_allgather_combine<'a>(
    what: &str,
    topk_idx: &[i32],
    weights: &[f32],
    topk: usize,
    hidden: usize,
    dtype: DType,
    placement: &Placement,
    y: impl Fn(usize, usize) -> &'a [u8],
    got: &[u8],
) -> Result<(), String> {
    let tokens = topk_idx.len() / topk.max(1);
    let row_bytes = hidden * dtype.size();
    if got.len() != tokens * row_bytes {
        return Err(format!(
            "{what}: expected {tokens} rows ({} bytes), got {} bytes",
            tokens * row_bytes,
            got.len()
        ));
    }
    let mut partials: Vec<Vec<f32>> = Vec::new();
    let mut acc = vec![0f32; hidden];
    let mut rounded = vec![0u8; row_bytes];
    for t in 0..tokens {
        partials.clear();
        for d in 0..placement.world() {
            let mine: Vec<usize> = (0..topk)
                .filter(|&k| {
                    expert(topk_idx, t * topk + k, placement).map(|e| placement.rank_of(e))
                        == Some(d)
                })
                .collect();
            if mine.is_empty() {
                continue;
            }
            acc.fill(0.0);
            for &k in &mine {
                numerics::accumulate(&mut acc, y(t, k), dtype, Some(weights[t * topk + k]));
            }
            numerics::store(&acc, &mut rounded, dtype);
            partials.push((0..hidden).map(|h| element(&rounded, dtype, h)).collect());
        }
        let n = partials.len();
        let g = &got[t * row_bytes..(t + 1) * row_bytes];
        for h in 0..hidden {
            let mut sum = 0f32;
            for p in &partials {
                sum = round_to(sum + p[h], dtype);
            }
            let actual = element(g, dtype, h);
            if actual.to_bits() == sum.to_bits() {
                continue;
            }
            let exact: f64 = partials.iter().map(|p| f64::from(p[h])).sum();
            let magnitude: f64 = partials.iter().map(|p| f64::from(p[h]).abs()).sum();
            let bound = n.saturating_sub(1) as f64 * unit_roundoff(dtype) * magnitude;
            let within = n >= 3 && actual.is_finite() && (f64::from(actual) - exact).abs() <= bound;
            if !within {
                return Err(format!(
                    "{what} token {t} element {h}: expected {sum} (the sum of {n} partial(s){}), got {actual}",
                    if n >= 3 {
                        format!(", within {bound:.3e} of {exact}")
                    } else {
                        String::new()
                    }
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PlacementSpec;

    fn contiguous(experts: usize, world: usize) -> Placement {
        Placement::new(&PlacementSpec::Contiguous, experts, world).unwrap()
    }

    #[test]
    fn wire_rule_rows_count_each_rank_once_per_token() {
        let p = contiguous(4, 2); // experts 0, 1 on rank 0; 2, 3 on rank 1
        let idx = [0, 1, 1, 2, 3, -1, -1, -1, 9, 0];
        assert_eq!(rows_per_destination(&idx, 2, &p), vec![3, 2]);
    }

    #[test]
    fn alltoall_order_is_by_rank_then_expert_then_token() {
        let p = Placement::new(&PlacementSpec::Table(vec![1, 0, 1, 0]), 4, 2).unwrap();
        // Rank 0 owns experts 1 and 3 (local 0, 1); rank 1 owns 0 and 2.
        let idx = [2, 1, 3, 0, 1, -1, 0, 3];
        let (order, counts) = alltoall_send_order(&idx, 2, &p);
        assert_eq!(counts, vec![4, 3]);
        // Rank 0: expert 1 (tokens 0, 2), expert 3 (tokens 1, 3); rank 1: expert 0 (1, 3), 2 (0).
        assert_eq!(
            order,
            vec![(0, 1), (2, 0), (1, 0), (3, 1), (1, 1), (3, 0), (0, 0)]
        );
    }

    #[test]
    fn received_rows_are_by_source_then_send_order() {
        let p = contiguous(4, 2);
        let r0 = [1, 0, 2, -1];
        let r1 = [3, 1, 0, 0];
        let got = alltoall_received(&[&r0, &r1], 2, &p, 0);
        let s = |src, token, k| Slot { src, token, k };
        // From rank 0: expert 0 (token 0 slot 1), expert 1 (token 0 slot 0); from rank 1: expert 0
        // (token 1 slots 0 and 1, a duplicate id: two rows), expert 1 (token 0 slot 1).
        assert_eq!(
            got,
            vec![s(0, 0, 1), s(0, 0, 0), s(1, 1, 0), s(1, 1, 1), s(1, 0, 1)]
        );
        let sel = allgather_selected(&[&r0, &r1], 2, &p, 0);
        assert_eq!(
            sel,
            vec![s(0, 0, 1), s(1, 1, 0), s(1, 1, 1), s(0, 0, 0), s(1, 0, 1)]
        );
    }

    #[test]
    fn a_wrong_row_is_caught() {
        let x0: Vec<u8> = (0..8).collect();
        let x1: Vec<u8> = (100..108).collect();
        let expected = [
            Slot {
                src: 1,
                token: 1,
                k: 0,
            },
            Slot {
                src: 0,
                token: 0,
                k: 1,
            },
        ];
        let good = [&x1[4..8], &x0[0..4]].concat();
        assert_eq!(check_rows("d", &expected, &good, 4, &[&x0, &x1]), Ok(()));
        let swapped = [&x0[0..4], &x1[4..8]].concat();
        let err = check_rows("d", &expected, &swapped, 4, &[&x0, &x1]).unwrap_err();
        assert!(
            err.starts_with("d row 0: expected token 1 of rank 1"),
            "{err}"
        );
        let short = &good[..4];
        assert!(check_rows("d", &expected, short, 4, &[&x0, &x1]).is_err());
    }

    fn bf16_row(v: &[f32]) -> Vec<u8> {
        v.iter()
            .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
            .collect()
    }

    #[test]
    fn weighted_combine_is_one_rounding_of_fmas_in_slot_order() {
        let p = contiguous(4, 2);
        let idx = [0, 3, -1, 2];
        let w = [0.25f32, 0.75, 0.5, 0.5];
        let x = [bf16_row(&[1.0, 3.0]), bf16_row(&[2.0, -4.0])];
        let out = weighted_combine(&idx, &w, 2, 2, DType::BF16, &p, |t, _| &x[t]);
        // Token 0: 0.25 * x + 0.75 * x = x; token 1: only slot 1 counts, 0.5 * x.
        assert_eq!(
            out,
            [bf16_row(&[1.0, 3.0]), bf16_row(&[1.0, -2.0])].concat()
        );
    }

    #[test]
    fn allgather_combine_check_is_exact_for_two_partials_and_bounded_beyond() {
        let p = contiguous(4, 4); // one expert per rank
        let idx = [0, 1, 2, 3, 0, 1, -1, -1];
        let w = [0.125f32, 0.25, 0.5, 0.125, 0.5, 0.5, 0.0, 0.0];
        let x = [bf16_row(&[1.0, 1.5]), bf16_row(&[3.0, -1.0])];
        let y = |t: usize, _k: usize| -> &[u8] { &x[t] };
        let good = [bf16_row(&[1.0, 1.5]), bf16_row(&[3.0, -1.0])].concat();
        let check =
            |got: &[u8]| check_allgather_combine("c", &idx, &w, 4, 2, DType::BF16, &p, y, got);
        assert_eq!(check(&good), Ok(()));
        // Token 1 has two partials: exact. One ulp off is caught.
        let mut off = good.clone();
        off[4..6].copy_from_slice(&bf16::from_f32(3.0).to_bits().wrapping_add(1).to_le_bytes());
        assert!(check(&off).unwrap_err().starts_with("c token 1 element 0"));
        // Token 0 has four partials: one ulp of another summation order is accepted, a wrong row
        // (token 1's values) is not.
        let mut reordered = good.clone();
        reordered[0..2]
            .copy_from_slice(&bf16::from_f32(1.0).to_bits().wrapping_sub(1).to_le_bytes());
        assert_eq!(check(&reordered), Ok(()));
        let wrong = [bf16_row(&[3.0, -1.0]), bf16_row(&[3.0, -1.0])].concat();
        assert!(check(&wrong)
            .unwrap_err()
            .starts_with("c token 0 element 0"));
    }
}
