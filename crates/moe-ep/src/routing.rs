//! Routing helpers: top-k expert choice from router logits, and the ragged per-expert metadata that
//! drives a grouped GEMM over an expert-major dispatch output.

use crate::error::{EpError, Result};

/// Top-k choice for `num_tokens` tokens: `idx[t*k + j]` is the j-th chosen expert of token t.
#[derive(Debug, Clone, PartialEq)]
pub struct TopK {
    pub num_tokens: usize,
    pub k: usize,
    pub idx: Vec<i32>,
    pub weights: Vec<f32>,
}

/// Softmax over each row of `logits [T, num_experts]`, then the `k` largest probabilities in
/// descending order, ties going to the lower expert id. With `renormalize`, the chosen weights are
/// divided by their sum (DeepSeek/Mixtral style); otherwise they are the softmax probabilities.
pub fn topk_softmax(
    logits: &[f32],
    num_experts: usize,
    k: usize,
    renormalize: bool,
) -> Result<TopK> {
    if num_experts == 0 || logits.len() % num_experts != 0 {
        return Err(EpError::Shape {
            arg: "logits",
            expected: format!("[T, num_experts = {num_experts}]"),
            actual: format!("{} values", logits.len()),
        });
    }
    if k == 0 || k > num_experts {
        return Err(EpError::InvalidConfig {
            field: "topk",
            expected: format!("in [1, num_experts = {num_experts}]"),
            actual: k.to_string(),
        });
    }
    if let Some(pos) = logits.iter().position(|v| !v.is_finite()) {
        return Err(EpError::Shape {
            arg: "logits",
            expected: "finite values".into(),
            actual: format!(
                "{} at [{}, {}]",
                logits[pos],
                pos / num_experts,
                pos % num_experts
            ),
        });
    }
    let num_tokens = logits.len() / num_experts;
    let mut idx = Vec::with_capacity(num_tokens * k);
    let mut weights = Vec::with_capacity(num_tokens * k);
    let mut probs = vec![0f32; num_experts];
    let mut order: Vec<usize> = Vec::with_capacity(num_experts);
    for row in logits.chunks_exact(num_experts) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for (p, &l) in probs.iter_mut().zip(row) {
            *p = (l - max).exp();
            sum += *p;
        }
        for p in probs.iter_mut() {
            *p /= sum;
        }
        order.clear();
        order.extend(0..num_experts);
        // Stable sort by descending probability keeps equal probabilities in ascending id order.
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
        let chosen = &order[..k];
        let norm = if renormalize {
            chosen.iter().map(|&e| probs[e]).sum::<f32>()
        } else {
            1.0
        };
        for &e in chosen {
            idx.push(e as i32);
            weights.push(probs[e] / norm);
        }
    }
    Ok(TopK {
        num_tokens,
        k,
        idx,
        weights,
    })
}

/// How many slots of `topk_idx` choose each expert (-1 slots are skipped).
pub fn count_per_expert(topk_idx: &[i32], num_experts: usize) -> Result<Vec<usize>> {
    let mut counts = vec![0usize; num_experts];
    for (i, &e) in topk_idx.iter().enumerate() {
        if e < 0 {
            continue;
        }
        match counts.get_mut(e as usize) {
            Some(c) => *c += 1,
            None => {
                return Err(EpError::ExpertOutOfRange {
                    arg: "topk_idx",
                    row: i,
                    col: 0,
                    value: e as i64,
                    num_experts,
                })
            }
        }
    }
    Ok(counts)
}

/// Per-group row counts and the aligned start of each group, as an expert-major dispatch lays its
/// rows out: group g occupies rows `offsets[g] .. offsets[g] + counts[g]`, every offset a multiple of
/// `align`, and `offsets[n]` is the padded total.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaggedLayout {
    counts: Vec<usize>,
    offsets: Vec<usize>,
    align: usize,
}

impl RaggedLayout {
    pub fn new(counts: &[usize], align: usize) -> Result<Self> {
        if align == 0 {
            return Err(EpError::InvalidConfig {
                field: "align",
                expected: "at least 1".into(),
                actual: "0".into(),
            });
        }
        let mut offsets = Vec::with_capacity(counts.len() + 1);
        let mut at = 0usize;
        offsets.push(0);
        for &c in counts {
            at += c.div_ceil(align) * align;
            offsets.push(at);
        }
        Ok(RaggedLayout {
            counts: counts.to_vec(),
            offsets,
            align,
        })
    }

    pub fn counts(&self) -> &[usize] {
        &self.counts
    }

    /// `num_groups + 1` entries; the last is the padded total.
    pub fn offsets(&self) -> &[usize] {
        &self.offsets
    }

    pub fn align(&self) -> usize {
        self.align
    }

    pub fn padded_total(&self) -> usize {
        *self.offsets.last().unwrap_or(&0)
    }

    /// The group owning `row`, or `None` for a padding row or a row past the end.
    pub fn group_of_row(&self, row: usize) -> Option<usize> {
        let g = self.offsets.partition_point(|&o| o <= row).checked_sub(1)?;
        (g < self.counts.len() && row < self.offsets[g] + self.counts[g]).then_some(g)
    }

    /// Group id of every row, -1 for padding: the per-row index a grouped GEMM takes.
    pub fn row_groups(&self) -> Vec<i32> {
        let mut out = vec![-1i32; self.padded_total()];
        for (g, (&start, &count)) in self.offsets.iter().zip(&self.counts).enumerate() {
            out[start..start + count].fill(g as i32);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topk_picks_largest_and_breaks_ties_low() {
        let logits = [0.0, 2.0, 2.0, 1.0, /* token 1 */ 5.0, 5.0, 5.0, 5.0];
        let t = topk_softmax(&logits, 4, 2, false).unwrap();
        assert_eq!(t.idx, vec![1, 2, 0, 1]);
        assert!((t.weights[2] - 0.25).abs() < 1e-7);
        let r = topk_softmax(&logits, 4, 2, true).unwrap();
        assert!((r.weights[0] + r.weights[1] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn topk_rejects_bad_input() {
        assert!(matches!(
            topk_softmax(&[0.0; 5], 4, 2, false),
            Err(EpError::Shape { arg: "logits", .. })
        ));
        assert!(matches!(
            topk_softmax(&[0.0, f32::NAN], 2, 1, false),
            Err(EpError::Shape { arg: "logits", .. })
        ));
        assert!(matches!(
            topk_softmax(&[0.0; 4], 4, 5, false),
            Err(EpError::InvalidConfig { field: "topk", .. })
        ));
    }

    #[test]
    fn ragged_layout_pads_groups() {
        let r = RaggedLayout::new(&[3, 0, 5], 4).unwrap();
        assert_eq!(r.offsets(), &[0, 4, 4, 12]);
        assert_eq!(r.group_of_row(2), Some(0));
        assert_eq!(r.group_of_row(3), None);
        assert_eq!(r.group_of_row(8), Some(2));
        assert_eq!(r.group_of_row(9), None);
        assert_eq!(r.row_groups(), vec![0, 0, 0, -1, 2, 2, 2, 2, 2, -1, -1, -1]);
    }

    #[test]
    fn counts_skip_dropped_slots() {
        assert_eq!(count_per_expert(&[0, -1, 2, 2], 3).unwrap(), vec![1, 0, 2]);
        assert!(count_per_expert(&[3], 3).is_err());
    }
}
