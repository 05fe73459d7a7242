//! The CPU backend: ranks are threads of one process. It is the reference every other backend is
//! compared with bit for bit, so it follows the contract's arithmetic literally (see `numerics`).
//!
//! Data moves the way the GPU backends move it: the source packs one row per (token, destination
//! rank), the receiver lays rows out (token-major, or expanded per slot into expert groups), and on
//! the way back each expert rank sends one (partial) row per (token, source rank).

mod dispatch;
mod reduce;

pub(crate) use crate::backend::rendezvous::Op;
use crate::backend::rendezvous::Rendezvous;

use super::{Backend, DispatchArgs, Dispatched};
use crate::config::EpConfig;
use crate::error::{EpError, Result};
use crate::handle::HandleInner;
use crate::output::{
    CachedDispatchOutput, CombineBackwardOutput, CombineOutput, DispatchBackwardOutput,
};
use crate::placement::Placement;
use crate::tensor::{Device, Tensor, TensorRef};
use std::sync::Arc;

/// What ranks post to each other.
pub(crate) enum Message {
    /// `Dispatcher::new`: the config, field by field, to check every rank built the same one.
    Config(super::ConfigFields),
    /// One packet per peer rank, indexed by the rank it is for.
    Packets(Vec<Packet>),
    /// `Dispatcher::all_gather_host`.
    Bytes(Vec<u8>),
}

/// The meeting point of a CPU group's rank threads.
pub(crate) type Exchange = Rendezvous<Message>;

/// Rows for one peer, in the order the contract fixes (source tokens ascending).
#[derive(Default)]
pub(crate) struct Packet {
    /// Source token ids, one per row (dispatch only; replays use the handle's).
    pub tokens: Vec<u32>,
    /// `[n, H]` payload rows.
    pub rows: Option<Tensor>,
    /// `[n, S]` f32 scales.
    pub scales: Option<Tensor>,
    /// `[n, K]` local expert id of each slot on the receiving rank, -1 where it lives elsewhere.
    pub slots: Vec<i32>,
    /// `[n, K]` f32 per slot: weights on the way out, weight sums or gradients on the way back.
    pub side: Option<Vec<f32>>,
    /// The sender takes part in a second round of this call (combine_backward's weight gradients).
    pub follow_up: bool,
}

/// The CPU backend's routing state inside a handle.
pub(crate) struct CpuHandle {
    /// Source side: the tokens sent to each rank, ascending.
    send: Vec<Vec<u32>>,
    /// Receiver side: tokens received from each source rank.
    recv_per_src: Vec<usize>,
    /// Token-major: `[R, K]` local expert id of each received slot (-1 elsewhere).
    recv_slots: Vec<i32>,
    /// Expert-major: received token j (sources in order) fills rows
    /// `exp_rows[exp_start[j]..exp_start[j+1]]`, one per slot on this rank in ascending slot order.
    exp_start: Vec<usize>,
    exp_rows: Vec<u32>,
    exp_slot: Vec<u8>,
    /// Expert-major: the weight of each row (from dispatch, 1 when it had none).
    row_weights: Vec<f32>,
}

impl CpuHandle {
    /// The expert-major rows of received token `j` and their slots.
    fn expansions(&self, j: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        let span = self.exp_start[j]..self.exp_start[j + 1];
        self.exp_rows[span.clone()]
            .iter()
            .zip(&self.exp_slot[span])
            .map(|(&r, &k)| (r as usize, k as usize))
    }

    /// Received token index ranges per source rank.
    fn src_ranges(&self) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        self.recv_per_src.iter().scan(0usize, |at, &n| {
            let r = *at..*at + n;
            *at += n;
            Some(r)
        })
    }
}

pub(crate) struct CpuBackend {
    exchange: Arc<Exchange>,
    rank: usize,
    world: usize,
    channel: u64,
    seq: u64,
    config: EpConfig,
    placement: Arc<Placement>,
}

impl CpuBackend {
    /// Joins the group's other ranks and checks they were built with the same config.
    pub(crate) fn new(
        exchange: Arc<Exchange>,
        rank: usize,
        channel: u64,
        config: EpConfig,
        placement: Arc<Placement>,
    ) -> Result<Self> {
        let world = placement.world();
        let mut backend = CpuBackend {
            exchange,
            rank,
            world,
            channel,
            seq: 0,
            config,
            placement,
        };
        let mine = super::config_fields(&backend.config);
        let posts = backend.all_gather(Op::Create, Message::Config(mine.clone()))?;
        let all = posts.iter().map(|post| match post.as_ref() {
            Message::Config(theirs) => theirs,
            _ => unreachable!("Op::Create rounds carry configs"),
        });
        super::check_configs(rank, &mine, all)?;
        Ok(backend)
    }

    fn all_gather(&mut self, op: Op, message: Message) -> Result<Vec<Arc<Message>>> {
        let key = (self.channel, self.seq);
        self.seq += 1;
        self.exchange
            .all_gather(self.rank, key, op, message, self.config.timeout)
    }

    /// Exchanges one packet per peer; returns, for each peer, the message it posted.
    fn exchange(&mut self, op: Op, packets: Vec<Packet>) -> Result<Vec<Arc<Message>>> {
        debug_assert_eq!(packets.len(), self.world);
        self.all_gather(op, Message::Packets(packets))
    }

    /// Checks that every rank agrees on an optional input being present (e.g. weights), so no
    /// rank waits for a second phase its peers skip.
    fn agree_on(
        &self,
        posts: &[Arc<Message>],
        what: &'static str,
        present: impl Fn(&Packet) -> bool,
    ) -> Result<bool> {
        let mine = present(packet_for(&posts[self.rank], self.rank));
        for (peer, post) in posts.iter().enumerate() {
            let theirs = present(packet_for(post, self.rank));
            if theirs != mine {
                let say = |p: bool| format!("{what} {}", if p { "given" } else { "not given" });
                return Err(EpError::ConfigMismatch {
                    rank: self.rank,
                    peer,
                    expected: say(mine),
                    actual: say(theirs),
                });
            }
        }
        Ok(mine)
    }
}

/// The packet that `post`'s sender addressed to `rank`.
fn packet_for(post: &Message, rank: usize) -> &Packet {
    match post {
        Message::Packets(p) => &p[rank],
        _ => unreachable!("data rounds carry packets"),
    }
}

fn cpu_state(h: &HandleInner) -> &CpuHandle {
    match &h.state {
        super::BackendHandle::Cpu(c) => c,
        super::BackendHandle::Cuda(_) => {
            unreachable!("the dispatcher checked the handle is its own")
        }
    }
}

/// Copies the listed rows of a `[*, row_bytes]` byte matrix into a new `[rows.len(), ..]` tensor.
fn gather_rows(
    src: &[u8],
    row_bytes: usize,
    rows: &[u32],
    shape_tail: usize,
    dtype: crate::DType,
) -> Result<Tensor> {
    let mut out = Tensor::zeros(&[rows.len(), shape_tail], dtype)?;
    for (dst, &r) in out
        .host_bytes_mut()
        .chunks_exact_mut(row_bytes.max(1))
        .zip(rows)
    {
        let r = r as usize;
        dst.copy_from_slice(&src[r * row_bytes..(r + 1) * row_bytes]);
    }
    Ok(out)
}

impl Backend for CpuBackend {
    fn device(&self) -> Device {
        Device::Host
    }

    fn synchronize(&mut self) -> Result<()> {
        Ok(())
    }

    fn cuda_stream(&self) -> Option<u64> {
        None
    }

    fn all_gather_host(&mut self, bytes: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        let posts = self.all_gather(Op::Host, Message::Bytes(bytes))?;
        Ok(posts
            .iter()
            .map(|p| match p.as_ref() {
                Message::Bytes(b) => b.clone(),
                _ => unreachable!("Op::Host rounds carry bytes"),
            })
            .collect())
    }

    unsafe fn set_cuda_stream(&mut self, _stream: u64) -> Result<()> {
        Err(EpError::BackendUnavailable {
            backend: "cpu",
            reason: "CUDA streams order GPU work; use the cuda backend".into(),
        })
    }

    fn begin_capture(&mut self) -> Result<()> {
        Err(EpError::BackendUnavailable {
            backend: "cpu",
            reason: "graph capture records GPU work; use the cuda backend".into(),
        })
    }

    fn end_capture(&mut self) -> Result<crate::graph::Graph> {
        self.begin_capture()
            .map(|_| unreachable!("begin_capture always fails on the CPU"))
    }

    fn to_device(&self, host: TensorRef<'_>) -> Result<Tensor> {
        Tensor::from_bytes(host.host_bytes("tensor")?, host.dims(), host.dtype())
    }

    fn dispatch(&mut self, args: DispatchArgs<'_>) -> Result<Dispatched> {
        dispatch::dispatch(self, args)
    }

    fn dispatch_cached(
        &mut self,
        handle: &HandleInner,
        x: TensorRef<'_>,
        scales: Option<TensorRef<'_>>,
    ) -> Result<CachedDispatchOutput> {
        dispatch::dispatch_cached(self, handle, x, scales)
    }

    fn combine(
        &mut self,
        handle: &HandleInner,
        y: TensorRef<'_>,
        weights: Option<TensorRef<'_>>,
    ) -> Result<CombineOutput> {
        reduce::combine(self, handle, y, weights)
    }

    fn dispatch_backward(
        &mut self,
        handle: &HandleInner,
        grad_recv: TensorRef<'_>,
        grad_recv_weights: Option<TensorRef<'_>>,
    ) -> Result<DispatchBackwardOutput> {
        reduce::dispatch_backward(self, handle, grad_recv, grad_recv_weights)
    }

    fn combine_backward(
        &mut self,
        handle: &HandleInner,
        grad_out: TensorRef<'_>,
        y: Option<TensorRef<'_>>,
    ) -> Result<CombineBackwardOutput> {
        reduce::combine_backward(self, handle, grad_out, y)
    }
}
