//! Dispatch and its replay on the CPU backend.

use super::{cpu_state, gather_rows, packet_for, CpuBackend, CpuHandle, Op, Packet};
use crate::backend::{BackendHandle, DispatchArgs, Dispatched};
use crate::config::{Layout, OutputSizing};
use crate::dtype::DType;
use crate::error::{EpError, Result};
use crate::handle::HandleInner;
use crate::output::{CachedDispatchOutput, DispatchOutput, HostCounts};
use crate::placement::Placement;
use crate::routing::RaggedLayout;
use crate::tensor::{Tensor, TensorRef};
use std::sync::Arc;

/// Source side: the tokens each rank receives, ascending; a token goes to a rank once however many
/// of its slots choose experts there.
fn route(topk: &[i32], k: usize, placement: &Placement) -> Vec<Vec<u32>> {
    let world = placement.world();
    let mut send = vec![Vec::new(); world];
    let mut last_token = vec![usize::MAX; world];
    for (t, row) in topk.chunks_exact(k).enumerate() {
        for &e in row.iter().filter(|&&e| e >= 0) {
            let d = placement.rank_of(e as usize);
            if last_token[d] != t {
                last_token[d] = t;
                send[d].push(t as u32);
            }
        }
    }
    send
}

fn to_i32(v: usize) -> i32 {
    i32::try_from(v).expect("row counts fit in i32")
}

fn i32_tensor(values: &[usize]) -> Result<Tensor> {
    let v: Vec<i32> = values.iter().map(|&n| to_i32(n)).collect();
    Tensor::from_slice(&v, &[v.len()])
}

impl CpuBackend {
    /// The receive capacity of `rank` (rows of its capacity-sized outputs).
    fn capacity_of(&self, rank: usize) -> usize {
        self.config.recv_capacity.unwrap_or_else(|| {
            self.config
                .worst_case_rows(self.world, self.placement.num_local(rank))
        })
    }

    /// Rows rank `d` needs for this call's packets.
    fn need_of(&self, posts: &[Arc<super::Message>], d: usize) -> Result<usize> {
        let incoming = posts.iter().map(|p| packet_for(p, d));
        Ok(match self.config.layout {
            Layout::TokenMajor => incoming.map(|p| p.tokens.len()).sum(),
            Layout::ExpertMajor { align } => {
                let counts = local_expert_counts(incoming, self.placement.num_local(d));
                RaggedLayout::new(&counts, align)?.padded_total()
            }
        })
    }

    /// Every rank checks every rank's need, so an overflow is the same error on all of them.
    fn check_capacity(&self, posts: &[Arc<super::Message>]) -> Result<()> {
        for d in 0..self.world {
            let (need, capacity) = (self.need_of(posts, d)?, self.capacity_of(d));
            if need > capacity {
                return Err(EpError::CapacityExceeded {
                    rank: d,
                    need,
                    capacity,
                });
            }
        }
        Ok(())
    }
}

fn local_expert_counts<'a>(
    incoming: impl Iterator<Item = &'a Packet>,
    num_local: usize,
) -> Vec<usize> {
    let mut counts = vec![0usize; num_local];
    for p in incoming {
        for &g in p.slots.iter().filter(|&&g| g >= 0) {
            counts[g as usize] += 1;
        }
    }
    counts
}

/// Lays received rows out: token-major, concatenated in source order; expert-major, each received
/// row copied to every row its slots expand to.
fn place(
    h: &CpuHandle,
    expert_major: bool,
    parts: &[&Tensor],
    out_rows: usize,
    cols: usize,
    dtype: DType,
) -> Result<Tensor> {
    let mut out = Tensor::zeros(&[out_rows, cols], dtype)?;
    let row_bytes = cols * dtype.size();
    let dst = out.host_bytes_mut();
    if expert_major {
        let mut j = 0;
        for part in parts {
            for src in part.host_bytes().chunks_exact(row_bytes) {
                for (row, _) in h.expansions(j) {
                    dst[row * row_bytes..(row + 1) * row_bytes].copy_from_slice(src);
                }
                j += 1;
            }
        }
    } else {
        let mut at = 0;
        for part in parts {
            let b = part.host_bytes();
            dst[at..at + b.len()].copy_from_slice(b);
            at += b.len();
        }
    }
    Ok(out)
}

/// Packs the payload (x rows, scales) for each destination along `send`.
fn payload_packets(
    b: &CpuBackend,
    send: &[Vec<u32>],
    x: &TensorRef<'_>,
    scales: Option<&TensorRef<'_>>,
    dtype: DType,
) -> Result<Vec<Packet>> {
    let (hidden, s_cols) = (b.config.hidden, b.config.scale_columns);
    let x_bytes = x.host_bytes("x")?;
    let scale_bytes = scales.map(|s| s.host_bytes("scales")).transpose()?;
    send.iter()
        .map(|tokens| {
            Ok(Packet {
                rows: Some(gather_rows(
                    x_bytes,
                    hidden * dtype.size(),
                    tokens,
                    hidden,
                    dtype,
                )?),
                scales: scale_bytes
                    .map(|s| gather_rows(s, s_cols * 4, tokens, s_cols, DType::F32))
                    .transpose()?,
                ..Packet::default()
            })
        })
        .collect()
}

fn rows_of(posts: &[Arc<super::Message>], rank: usize) -> Vec<&Packet> {
    posts.iter().map(|p| packet_for(p, rank)).collect()
}

pub(super) fn dispatch(b: &mut CpuBackend, args: DispatchArgs<'_>) -> Result<Dispatched> {
    let topk = args
        .topk_host
        .expect("the CPU backend takes host memory, so the dispatcher read topk_idx");
    let (k, dtype) = (b.config.topk, b.config.dtype);
    let send = route(&topk, k, &b.placement);
    let weights = args
        .weights
        .map(|w| w.host_slice::<f32>("topk_weights"))
        .transpose()?;
    let mut packets = payload_packets(b, &send, &args.x, args.scales.as_ref(), dtype)?;
    for (d, (packet, tokens)) in packets.iter_mut().zip(&send).enumerate() {
        packet.tokens = tokens.clone();
        packet.slots = Vec::with_capacity(tokens.len() * k);
        let mut side = weights.map(|_| Vec::with_capacity(tokens.len() * k));
        for &t in tokens {
            let t = t as usize;
            for slot in t * k..(t + 1) * k {
                let e = topk[slot];
                let here = e >= 0 && b.placement.rank_of(e as usize) == d;
                packet.slots.push(if here {
                    b.placement.local_index(e as usize) as i32
                } else {
                    -1
                });
                if let (Some(side), Some(w)) = (side.as_mut(), weights) {
                    side.push(if here { w[slot] } else { 0.0 });
                }
            }
        }
        packet.side = side;
    }

    let posts = b.exchange(Op::Dispatch, packets)?;
    let has_weights = b.agree_on(&posts, "topk_weights", |p| p.side.is_some())?;
    b.check_capacity(&posts)?;
    let incoming = rows_of(&posts, b.rank);
    match b.config.layout {
        Layout::TokenMajor => receive_token_major(b, send, &incoming, has_weights),
        Layout::ExpertMajor { align } => {
            receive_expert_major(b, send, &incoming, has_weights, align)
        }
    }
}

/// The parts of a dispatch output common to both layouts.
struct Received {
    x: Tensor,
    scales: Option<Tensor>,
    per_src: Vec<usize>,
}

fn receive_payload(
    b: &CpuBackend,
    h: &CpuHandle,
    incoming: &[&Packet],
    out_rows: usize,
    expert_major: bool,
    dtype: DType,
) -> Result<Received> {
    let rows: Vec<&Tensor> = incoming
        .iter()
        .map(|p| p.rows.as_ref().expect("payload packets carry rows"))
        .collect();
    let x = place(h, expert_major, &rows, out_rows, b.config.hidden, dtype)?;
    let scales = if b.config.scale_columns > 0 {
        let parts: Vec<&Tensor> = incoming
            .iter()
            .map(|p| {
                p.scales
                    .as_ref()
                    .expect("scales travel when scale_columns > 0")
            })
            .collect();
        Some(place(
            h,
            expert_major,
            &parts,
            out_rows,
            b.config.scale_columns,
            DType::F32,
        )?)
    } else {
        None
    };
    Ok(Received {
        x,
        scales,
        per_src: h.recv_per_src.clone(),
    })
}

fn receive_token_major(
    b: &CpuBackend,
    send: Vec<Vec<u32>>,
    incoming: &[&Packet],
    has_weights: bool,
) -> Result<Dispatched> {
    let k = b.config.topk;
    let per_src: Vec<usize> = incoming.iter().map(|p| p.tokens.len()).collect();
    let rows: usize = per_src.iter().sum();
    let out_rows = match b.config.output_sizing {
        OutputSizing::Exact => rows,
        OutputSizing::Capacity => b.capacity_of(b.rank),
    };
    let recv_slots: Vec<i32> = incoming
        .iter()
        .flat_map(|p| p.slots.iter().copied())
        .collect();
    let handle = CpuHandle {
        send,
        recv_per_src: per_src,
        recv_slots,
        exp_start: Vec::new(),
        exp_rows: Vec::new(),
        exp_slot: Vec::new(),
        row_weights: Vec::new(),
    };
    let got = receive_payload(b, &handle, incoming, out_rows, false, b.config.dtype)?;

    let mut topk_idx = vec![-1i32; out_rows * k];
    topk_idx[..rows * k].copy_from_slice(&handle.recv_slots);
    let mut src = vec![-1i32; out_rows * 2];
    let mut row = 0;
    for (s, p) in incoming.iter().enumerate() {
        for &t in &p.tokens {
            src[row * 2] = to_i32(s);
            src[row * 2 + 1] = t as i32;
            row += 1;
        }
    }
    let topk_weights = has_weights
        .then(|| {
            let mut w = vec![0f32; out_rows * k];
            let sides = incoming.iter().flat_map(|p| p.side.iter().flatten());
            for (dst, &v) in w.iter_mut().zip(sides) {
                *dst = v;
            }
            Tensor::from_slice(&w, &[out_rows, k])
        })
        .transpose()?;
    let mut per_expert = vec![0usize; b.placement.num_local(b.rank)];
    for &g in handle.recv_slots.iter().filter(|&&g| g >= 0) {
        per_expert[g as usize] += 1;
    }
    let host_counts = (b.config.output_sizing == OutputSizing::Exact).then(|| HostCounts {
        rows,
        per_src: got.per_src.clone(),
        per_local_expert: per_expert.clone(),
        expert_offsets: None,
    });
    let output = DispatchOutput {
        x: got.x,
        scales: got.scales,
        topk_idx: Some(Tensor::from_slice(&topk_idx, &[out_rows, k])?),
        topk_weights,
        src: Tensor::from_slice(&src, &[out_rows, 2])?,
        local_expert: None,
        num_recv_per_src: i32_tensor(&got.per_src)?,
        num_recv_per_local_expert: i32_tensor(&per_expert)?,
        expert_offsets: None,
        host_counts,
    };
    Ok(Dispatched {
        output,
        num_rows: rows,
        out_rows,
        state: BackendHandle::Cpu(handle),
    })
}

fn receive_expert_major(
    b: &CpuBackend,
    send: Vec<Vec<u32>>,
    incoming: &[&Packet],
    has_weights: bool,
    align: usize,
) -> Result<Dispatched> {
    let k = b.config.topk;
    let num_local = b.placement.num_local(b.rank);
    let counts = local_expert_counts(incoming.iter().copied(), num_local);
    let layout = RaggedLayout::new(&counts, align)?;
    let padded = layout.padded_total();
    let out_rows = match b.config.output_sizing {
        OutputSizing::Exact => padded,
        OutputSizing::Capacity => b.capacity_of(b.rank),
    };

    let mut cursor = layout.offsets()[..num_local].to_vec();
    let mut exp_start = Vec::new();
    let mut exp_rows = Vec::new();
    let mut exp_slot = Vec::new();
    let mut row_weights = vec![0f32; padded];
    let mut weights_out = has_weights.then(|| vec![0f32; out_rows]);
    let mut src = vec![-1i32; out_rows * 3];
    let mut local_expert = vec![-1i32; out_rows];
    for (s, p) in incoming.iter().enumerate() {
        for (i, &t) in p.tokens.iter().enumerate() {
            exp_start.push(exp_rows.len());
            for slot in 0..k {
                let g = p.slots[i * k + slot];
                if g < 0 {
                    continue;
                }
                let row = cursor[g as usize];
                cursor[g as usize] += 1;
                exp_rows.push(row as u32);
                exp_slot.push(slot as u8);
                let w = p.side.as_ref().map(|side| side[i * k + slot]);
                row_weights[row] = w.unwrap_or(1.0);
                if let (Some(out), Some(w)) = (weights_out.as_mut(), w) {
                    out[row] = w;
                }
                src[row * 3..row * 3 + 3].copy_from_slice(&[to_i32(s), t as i32, slot as i32]);
                local_expert[row] = g;
            }
        }
    }
    exp_start.push(exp_rows.len());
    let handle = CpuHandle {
        send,
        recv_per_src: incoming.iter().map(|p| p.tokens.len()).collect(),
        recv_slots: Vec::new(),
        exp_start,
        exp_rows,
        exp_slot,
        row_weights,
    };
    let got = receive_payload(b, &handle, incoming, out_rows, true, b.config.dtype)?;
    let host_counts = (b.config.output_sizing == OutputSizing::Exact).then(|| HostCounts {
        rows: padded,
        per_src: got.per_src.clone(),
        per_local_expert: counts.clone(),
        expert_offsets: Some(layout.offsets().to_vec()),
    });
    let output = DispatchOutput {
        x: got.x,
        scales: got.scales,
        topk_idx: None,
        topk_weights: weights_out
            .map(|w| Tensor::from_slice(&w, &[out_rows]))
            .transpose()?,
        src: Tensor::from_slice(&src, &[out_rows, 3])?,
        local_expert: Some(Tensor::from_slice(&local_expert, &[out_rows])?),
        num_recv_per_src: i32_tensor(&got.per_src)?,
        num_recv_per_local_expert: i32_tensor(&counts)?,
        expert_offsets: Some(i32_tensor(layout.offsets())?),
        host_counts,
    };
    Ok(Dispatched {
        output,
        num_rows: padded,
        out_rows,
        state: BackendHandle::Cpu(handle),
    })
}

pub(super) fn dispatch_cached(
    b: &mut CpuBackend,
    handle: &HandleInner,
    x: TensorRef<'_>,
    scales: Option<TensorRef<'_>>,
) -> Result<CachedDispatchOutput> {
    let h = cpu_state(handle);
    let packets = payload_packets(b, &h.send, &x, scales.as_ref(), b.config.dtype)?;
    let posts = b.exchange(Op::DispatchCached, packets)?;
    let incoming = rows_of(&posts, b.rank);
    let expert_major = b.config.layout != Layout::TokenMajor;
    let got = receive_payload(
        b,
        h,
        &incoming,
        handle.out_rows,
        expert_major,
        b.config.dtype,
    )?;
    Ok(CachedDispatchOutput {
        x: got.x,
        scales: got.scales,
    })
}

/// Replays the recorded routing with a combine-dtype payload (combine_backward's token-major path):
/// the rows land where dispatch put them.
pub(super) fn replay_in_combine_dtype(
    b: &mut CpuBackend,
    handle: &HandleInner,
    payload: TensorRef<'_>,
    op: Op,
) -> Result<Tensor> {
    let h = cpu_state(handle);
    let packets = payload_packets(b, &h.send, &payload, None, b.config.combine_dtype)?;
    let posts = b.exchange(op, packets)?;
    let incoming = rows_of(&posts, b.rank);
    let rows: Vec<&Tensor> = incoming
        .iter()
        .map(|p| p.rows.as_ref().expect("payload packets carry rows"))
        .collect();
    let expert_major = b.config.layout != Layout::TokenMajor;
    place(
        h,
        expert_major,
        &rows,
        handle.out_rows,
        b.config.hidden,
        b.config.combine_dtype,
    )
}
