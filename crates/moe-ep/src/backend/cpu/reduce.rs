//! Combine and the backward ops on the CPU backend: each expert rank sends one row per (token,
//! source rank) back (expert-major: the local partial, rounded once to the combine dtype), and the
//! source sums them in ascending rank order in f32, rounding once.

use super::dispatch::replay_in_combine_dtype;
use super::{cpu_state, gather_rows, packet_for, CpuBackend, CpuHandle, Message, Op, Packet};
use crate::config::Layout;
use crate::error::Result;
use crate::handle::HandleInner;
use crate::numerics;
use crate::output::{CombineBackwardOutput, CombineOutput, DispatchBackwardOutput};
use crate::tensor::{Tensor, TensorRef};
use std::ops::Range;
use std::sync::Arc;

impl CpuBackend {
    fn row_bytes(&self) -> usize {
        self.config.hidden * self.config.combine_dtype.size()
    }

    fn is_token_major(&self) -> bool {
        self.config.layout == Layout::TokenMajor
    }

    /// Expert-major: the partial of each received token in `tokens`, `sum over its rows in
    /// ascending slot order of weight(row) * y[row]`, rounded once.
    fn local_partials(
        &self,
        h: &CpuHandle,
        tokens: Range<usize>,
        y: &[u8],
        weight: &dyn Fn(usize) -> Option<f32>,
    ) -> Result<Tensor> {
        let (hidden, dtype, rb) = (
            self.config.hidden,
            self.config.combine_dtype,
            self.row_bytes(),
        );
        let mut out = Tensor::zeros(&[tokens.len(), hidden], dtype)?;
        let mut acc = vec![0f32; hidden];
        for (dst, j) in out.host_bytes_mut().chunks_exact_mut(rb).zip(tokens) {
            acc.fill(0.0);
            for (row, _) in h.expansions(j) {
                numerics::accumulate(&mut acc, &y[row * rb..(row + 1) * rb], dtype, weight(row));
            }
            numerics::store(&acc, dst, dtype);
        }
        Ok(out)
    }

    /// Source side: sums, per token and in ascending rank order, the rows and the `[K]` side
    /// values each destination sent back.
    fn reduce_back(
        &self,
        h: &CpuHandle,
        num_tokens: usize,
        posts: &[Arc<Message>],
        with_rows: bool,
        with_side: bool,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (hidden, k, dtype, rb) = (
            self.config.hidden,
            self.config.topk,
            self.config.combine_dtype,
            self.row_bytes(),
        );
        let back: Vec<&Packet> = posts.iter().map(|p| packet_for(p, self.rank)).collect();
        let mut out = with_rows
            .then(|| Tensor::zeros(&[num_tokens, hidden], dtype))
            .transpose()?;
        let mut side = with_side.then(|| vec![0f32; num_tokens * k]);
        let mut acc = vec![0f32; hidden];
        let mut cursor = vec![0usize; self.world];
        for t in 0..num_tokens {
            acc.fill(0.0);
            for (d, packet) in back.iter().enumerate() {
                let j = cursor[d];
                if h.send[d].get(j) != Some(&(t as u32)) {
                    continue;
                }
                cursor[d] += 1;
                if let (true, Some(rows)) = (with_rows, &packet.rows) {
                    numerics::accumulate(
                        &mut acc,
                        &rows.host_bytes()[j * rb..(j + 1) * rb],
                        dtype,
                        None,
                    );
                }
                if let (Some(side), Some(from)) = (side.as_mut(), &packet.side) {
                    for (s, v) in side[t * k..(t + 1) * k]
                        .iter_mut()
                        .zip(&from[j * k..(j + 1) * k])
                    {
                        *s += v;
                    }
                }
            }
            if let Some(out) = out.as_mut() {
                numerics::store(&acc, &mut out.host_bytes_mut()[t * rb..(t + 1) * rb], dtype);
            }
        }
        let side = side
            .map(|s| Tensor::from_slice(&s, &[num_tokens, k]))
            .transpose()?;
        Ok((out, side))
    }

    /// Token-major: the received rows of each source, copied back as they are.
    fn rows_back(&self, range: &Range<usize>, y: &[u8]) -> Result<Tensor> {
        let rows: Vec<u32> = (range.start as u32..range.end as u32).collect();
        gather_rows(
            y,
            self.row_bytes(),
            &rows,
            self.config.hidden,
            self.config.combine_dtype,
        )
    }
}

pub(super) fn combine(
    b: &mut CpuBackend,
    handle: &HandleInner,
    y: TensorRef<'_>,
    weights: Option<TensorRef<'_>>,
) -> Result<CombineOutput> {
    let h = cpu_state(handle);
    let k = b.config.topk;
    let y_bytes = y.host_bytes("y")?;
    let weights = weights
        .map(|w| w.host_slice::<f32>("weights"))
        .transpose()?;
    let packets = h
        .src_ranges()
        .map(|range| {
            Ok(if b.is_token_major() {
                Packet {
                    rows: Some(b.rows_back(&range, y_bytes)?),
                    side: weights.map(|w| w[range.start * k..range.end * k].to_vec()),
                    ..Packet::default()
                }
            } else {
                let weight = |row: usize| Some(weights.map_or(h.row_weights[row], |w| w[row]));
                Packet {
                    rows: Some(b.local_partials(h, range, y_bytes, &weight)?),
                    ..Packet::default()
                }
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let posts = b.exchange(Op::Combine, packets)?;
    let with_side = b.agree_on(&posts, "weights", |p| p.side.is_some())?;
    let (x, weights) = b.reduce_back(h, handle.num_tokens, &posts, true, with_side)?;
    Ok(CombineOutput {
        x: x.expect("rows requested"),
        weights,
    })
}

pub(super) fn dispatch_backward(
    b: &mut CpuBackend,
    handle: &HandleInner,
    grad_recv: TensorRef<'_>,
    grad_recv_weights: Option<TensorRef<'_>>,
) -> Result<DispatchBackwardOutput> {
    let h = cpu_state(handle);
    let k = b.config.topk;
    let grad = grad_recv.host_bytes("grad_recv")?;
    let grad_w = grad_recv_weights
        .map(|w| w.host_slice::<f32>("grad_recv_weights"))
        .transpose()?;
    let packets = h
        .src_ranges()
        .map(|range| {
            // Only the rank owning a slot's expert received its weight, so only its gradient counts.
            let side = grad_w.map(|gw| {
                let mut v = vec![0f32; range.len() * k];
                for (i, j) in range.clone().enumerate() {
                    if b.is_token_major() {
                        for slot in 0..k {
                            if h.recv_slots[j * k + slot] >= 0 {
                                v[i * k + slot] = gw[j * k + slot];
                            }
                        }
                    } else {
                        for (row, slot) in h.expansions(j) {
                            v[i * k + slot] = gw[row];
                        }
                    }
                }
                v
            });
            let rows = if b.is_token_major() {
                b.rows_back(&range, grad)?
            } else {
                b.local_partials(h, range, grad, &|_| None)?
            };
            Ok(Packet {
                rows: Some(rows),
                side,
                ..Packet::default()
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let posts = b.exchange(Op::DispatchBackward, packets)?;
    let with_side = b.agree_on(&posts, "grad_recv_weights", |p| p.side.is_some())?;
    let (grad_x, grad_weights) = b.reduce_back(h, handle.num_tokens, &posts, true, with_side)?;
    Ok(DispatchBackwardOutput {
        grad_x: grad_x.expect("rows requested"),
        grad_weights,
    })
}

pub(super) fn combine_backward(
    b: &mut CpuBackend,
    handle: &HandleInner,
    grad_out: TensorRef<'_>,
    y: Option<TensorRef<'_>>,
) -> Result<CombineBackwardOutput> {
    if b.is_token_major() {
        // Token-major combine is an unweighted sum, so its backward is a replay of grad_out.
        let grad_y = replay_in_combine_dtype(b, handle, grad_out, Op::CombineBackward)?;
        return Ok(CombineBackwardOutput {
            grad_y,
            grad_weights: None,
        });
    }
    let h = cpu_state(handle);
    let (hidden, k, dtype, rb) = (
        b.config.hidden,
        b.config.topk,
        b.config.combine_dtype,
        b.row_bytes(),
    );
    let g_bytes = grad_out.host_bytes("grad_out")?;
    let y_bytes = y.map(|y| y.host_bytes("y")).transpose()?;
    let packets = h
        .send
        .iter()
        .map(|tokens| {
            Ok(Packet {
                rows: Some(gather_rows(g_bytes, rb, tokens, hidden, dtype)?),
                follow_up: y_bytes.is_some(),
                ..Packet::default()
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let posts = b.exchange(Op::CombineBackward, packets)?;
    let with_y = b.agree_on(&posts, "y", |p| p.follow_up)?;

    let mut grad_y = Tensor::zeros(&[handle.out_rows, hidden], dtype)?;
    let mut back = Vec::with_capacity(b.world);
    let mut j = 0;
    for post in &posts {
        let rows = packet_for(post, b.rank)
            .rows
            .as_ref()
            .expect("payload packets carry rows")
            .host_bytes();
        let n = rows.len() / rb.max(1);
        let mut side = vec![0f32; n * k];
        for (i, g) in rows.chunks_exact(rb).enumerate() {
            for (row, slot) in h.expansions(j) {
                let dst = &mut grad_y.host_bytes_mut()[row * rb..(row + 1) * rb];
                numerics::scale(h.row_weights[row], g, dst, dtype);
                if let Some(y) = y_bytes {
                    side[i * k + slot] = numerics::dot(g, &y[row * rb..(row + 1) * rb], dtype);
                }
            }
            j += 1;
        }
        back.push(Packet {
            side: Some(side),
            ..Packet::default()
        });
    }
    let grad_weights = if with_y {
        let posts = b.exchange(Op::CombineBackwardWeights, back)?;
        b.reduce_back(h, handle.num_tokens, &posts, false, true)?.1
    } else {
        None
    };
    Ok(CombineBackwardOutput {
        grad_y,
        grad_weights,
    })
}
