//! The CUDA backend: each rank drives one GPU (several ranks may share one) from a thread of this
//! process, and the kernels store rows straight into peer GPUs' memory (peer access over NVLink).
//!
//! Every call is a short kernel sequence on the rank's stream with no host synchronization, unless
//! exact output sizes are asked for. Ranks meet through epoch-valued flags: the call number, the
//! same on every rank, so flags never need resetting. A call first makes sure every rank entered it
//! (dispatch's count exchange does this; the other calls raise and wait a flag), which guarantees
//! every peer finished its previous call and its buffers are free to write into.

mod buffers;

use super::{Backend, BackendHandle, DispatchArgs, Dispatched};
use crate::backend::rendezvous::{Op, Rendezvous};
use crate::backend::tcp_rendezvous::TcpRendezvous;
use crate::config::{EpConfig, Layout, OutputSizing};
use crate::dtype::DType;
use crate::error::{EpError, Result};
use crate::ffi::cuda_kernels::{
    self as k, ptr_or_null, Elem, EpDims, EpExpand, EpPeers, EpTokenLayout, Grid, Kernels,
    SIDE_EXPANDED, SIDE_NONE, SIDE_ROW_K, SIDE_ROW_K_OWNED, SIG_DATA2,
};
use crate::ffi::cuda_memory::{self as mem, PeerMapping, StreamBuffer, IPC_HANDLE_BYTES};
use crate::ffi::cuda_stream::Stream;
use crate::handle::HandleInner;
use crate::output::{
    CachedDispatchOutput, CombineBackwardOutput, CombineOutput, DispatchBackwardOutput,
    DispatchOutput, HostCounts,
};
use crate::placement::Placement;
use crate::tensor::{Device, Tensor, TensorRef};
use crate::timer::StreamGate;
use buffers::{SharedBuffers, STAGE_SLOTS};
use cudarc::driver::CudaContext;
use std::sync::Arc;

/// What CUDA ranks of one process exchange when a dispatcher is built.
pub(crate) enum CudaMessage {
    Config(super::ConfigFields),
    /// `Dispatcher::all_gather_host`.
    Bytes(Vec<u8>),
    /// A rank's shared buffers. Every rank keeps every rank's buffers alive, so memory a peer may
    /// still write into is freed only once the whole group is gone.
    Buffers {
        ordinal: u32,
        buffers: Arc<SharedBuffers>,
    },
}

/// The control plane of a group of CUDA ranks in one process.
pub(crate) type CudaExchange = Rendezvous<CudaMessage>;

/// How the ranks of a CUDA group meet to set up (never on the data path).
#[derive(Clone)]
pub(crate) enum ControlPlane {
    /// Ranks are threads of this process: they hand each other their buffers.
    Local(Arc<CudaExchange>),
    /// Ranks are processes of this node: they exchange CUDA IPC handles over TCP.
    Tcp(Arc<TcpRendezvous>),
}

/// The buffers of every rank as this one maps them, and what keeps them alive.
struct GroupBuffers {
    peers: EpPeers,
    /// Local groups: every rank's buffers, freed when the last rank lets go.
    local: Vec<Arc<SharedBuffers>>,
    /// Process groups: the other processes' buffers mapped here.
    mapped: Vec<PeerMapping>,
    /// Ranks of the group on this rank's GPU (itself included).
    ranks_on_my_gpu: usize,
}

fn set_peer(peers: &mut EpPeers, r: usize, a: [u64; 7]) {
    peers.signals[r] = a[0];
    peers.inbox[r] = a[1];
    peers.stage_x[r] = a[2];
    peers.stage_scales[r] = a[3];
    peers.stage_meta[r] = a[4];
    peers.back[r] = a[5];
    peers.back_side[r] = a[6];
}

/// Learns every rank's buffers through the control plane, after checking every rank built the
/// same config.
fn join_group(
    control: &ControlPlane,
    rank: usize,
    channel: u64,
    device: &CudaRank,
    shared: &Arc<SharedBuffers>,
    config: &EpConfig,
) -> Result<GroupBuffers> {
    let mine = super::config_fields(config);
    let timeout = config.timeout;
    let mut out = GroupBuffers {
        peers: EpPeers::default(),
        local: Vec::new(),
        mapped: Vec::new(),
        ranks_on_my_gpu: 0,
    };
    let my_ordinal = device.ctx.ordinal() as u32;
    match control {
        ControlPlane::Local(exchange) => {
            let posts = exchange.all_gather(
                rank,
                (channel, 0),
                Op::Create,
                CudaMessage::Config(mine.clone()),
                timeout,
            )?;
            let all = posts.iter().map(|p| match p.as_ref() {
                CudaMessage::Config(f) => f,
                _ => unreachable!("the first round carries configs"),
            });
            super::check_configs(rank, &mine, all)?;
            let message = CudaMessage::Buffers {
                ordinal: device.ctx.ordinal() as u32,
                buffers: shared.clone(),
            };
            let posts = exchange.all_gather(rank, (channel, 1), Op::Create, message, timeout)?;
            for (r, post) in posts.iter().enumerate() {
                let CudaMessage::Buffers { ordinal, buffers } = post.as_ref() else {
                    unreachable!("the second round carries buffers")
                };
                out.ranks_on_my_gpu += usize::from(*ordinal == my_ordinal);
                let peer_ctx = CudaContext::new(*ordinal as usize)
                    .map_err(|e| device_error(mem::describe("peer context", e)))?;
                mem::enable_peer_access(&device.ctx, &peer_ctx).map_err(device_error)?;
                set_peer(&mut out.peers, r, buffers.addresses());
                out.local.push(buffers.clone());
            }
        }
        ControlPlane::Tcp(tcp) => {
            let text: String = mine.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
            let posts = tcp.all_gather((channel, 0), Op::Create, text.into_bytes(), timeout)?;
            let all: Vec<super::ConfigFields> = posts
                .iter()
                .map(|p| {
                    String::from_utf8_lossy(p)
                        .lines()
                        .filter_map(|l| l.split_once('='))
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect()
                })
                .collect();
            super::check_configs(rank, &mine, &all)?;
            // Each post: the rank's device ordinal (4 bytes), then its buffers' IPC handles.
            let handles = shared.ipc_handles().map_err(device_error)?;
            let post = [my_ordinal.to_le_bytes().to_vec(), handles.concat()].concat();
            let posts = tcp.all_gather((channel, 1), Op::Create, post, timeout)?;
            for (r, post) in posts.iter().enumerate() {
                let (ordinal, post) = post.split_at(4);
                let ordinal = u32::from_le_bytes(ordinal.try_into().expect("4 bytes"));
                out.ranks_on_my_gpu += usize::from(ordinal == my_ordinal);
                if r == rank {
                    set_peer(&mut out.peers, r, shared.addresses());
                    continue;
                }
                let mut addrs = [0u64; 7];
                for (i, h) in post.chunks_exact(IPC_HANDLE_BYTES).enumerate() {
                    let handle: &[u8; IPC_HANDLE_BYTES] = h.try_into().expect("whole handles");
                    let m = PeerMapping::open(&device.ctx, handle).map_err(device_error)?;
                    addrs[i] = m.ptr();
                    out.mapped.push(m);
                }
                set_peer(&mut out.peers, r, addrs);
            }
        }
    }
    Ok(out)
}

/// A rank's device: its context and the stream its dispatchers start on.
pub(crate) struct CudaRank {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Stream,
}

impl CudaRank {
    pub(crate) fn new(ordinal: u32) -> Result<Self> {
        let unavailable = |reason: String| EpError::BackendUnavailable {
            backend: "cuda",
            reason,
        };
        crate::probe::cuda_devices().map_err(unavailable)?;
        let ctx = CudaContext::new(ordinal as usize)
            .map_err(|e| unavailable(mem::describe("creating the context", e)))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| unavailable(mem::describe("creating a stream", e)))?;
        Ok(CudaRank {
            ctx,
            stream: Stream::owned(stream),
        })
    }
}

fn device_error(what: String) -> EpError {
    EpError::BackendUnavailable {
        backend: "cuda",
        reason: what,
    }
}

fn elem(dtype: DType) -> Elem {
    match dtype {
        DType::BF16 => Elem::Bf16,
        DType::F16 => Elem::F16,
        DType::F32 => Elem::F32,
        other => unreachable!("{other} is not a combine dtype; the config admits bf16, f16, f32"),
    }
}

/// The receive slot of one call (see `buffers::STAGE_SLOTS`), and, when its payload rows are
/// handed out as the output itself, the lease that keeps the slot from being picked again while
/// that output lives.
struct RecvSlot {
    index: usize,
    lease: Option<Arc<SlotLease>>,
}

/// What an output handed out from a receive slot holds: the buffers, and the slot's lease.
struct SlotLease {
    shared: Arc<SharedBuffers>,
    _lease: Arc<()>,
}

/// Which receive slot a call uses, and whether its rows are handed out as the output (leased),
/// given which slots no output holds (`free`) and which a recorded graph writes into. A slot is
/// leased only when the caller may take it (`may_lease`: the output's rows are laid out as the
/// staged rows), another slot stays free for the next call, no graph writes into it (its replays
/// would overwrite the output), and the call is not being recorded; otherwise the rows are copied
/// out of the first free slot.
fn choose_slot(
    free: &[bool],
    graph_slots: &[bool],
    may_lease: bool,
    capturing: bool,
) -> (usize, bool) {
    let free: Vec<usize> = (0..free.len()).filter(|&i| free[i]).collect();
    let leasable = (may_lease && !capturing && free.len() >= 2)
        .then(|| free.iter().copied().find(|&i| !graph_slots[i]))
        .flatten();
    match leasable {
        Some(i) => (i, true),
        None => (
            *free
                .first()
                .expect("a slot is leased only while another one stays free"),
            false,
        ),
    }
}

/// Whether a combine-direction call may skip waiting for every rank to enter it: only right after
/// a call every rank entered that touched neither the back buffers nor the arrival counters
/// (`after_token_major_send`), and only where no replay can run between the two unseen: both
/// inside one recording, or live calls while no graph was ever recorded.
fn may_skip_entry(after_token_major_send: bool, capturing: bool, recorded_graph: bool) -> bool {
    after_token_major_send && (capturing || !recorded_graph)
}

/// SMs the data kernels use unless `EpConfig::num_sms` says otherwise.
const DEFAULT_NUM_SMS: u32 = 24;

fn i32_of(v: usize) -> i32 {
    i32::try_from(v).expect("sizes fit in i32 (checked when the dispatcher was built)")
}

/// The CUDA backend's routing state inside a handle, all on the device.
pub(crate) struct CudaHandle {
    /// `[T, world]`: position of each token among those sent to each rank, -1 if not sent.
    pos: StreamBuffer,
    /// `[world + 1]`: first staged row of each source on this rank.
    recv_base: StreamBuffer,
    /// `[world]`: first row of this rank's tokens on each destination.
    my_base_on: StreamBuffer,
    /// `[world * max_tokens, 2]`: (source, token) of each staged row.
    row_src: StreamBuffer,
    /// Token-major `[world * max_tokens, K]`: local slot ids of each staged row.
    row_slots: Option<StreamBuffer>,
    /// Expert-major `[world * max_tokens, K]`: the output row of each slot of each staged row.
    exp_rows: Option<StreamBuffer>,
    /// Expert-major `[rows]`: the weight of each output row (1 when dispatch had none).
    row_weights: Option<StreamBuffer>,
    /// Expert-major `[E_local + 1]`: the aligned group starts (shared with the dispatch output).
    offsets: Option<Tensor>,
}

impl CudaHandle {
    fn offsets_ptr(&self) -> u64 {
        ptr_or_null(self.offsets.as_ref().and_then(Tensor::device_ptr))
    }
}

pub(crate) struct CudaBackend {
    rank: usize,
    world: usize,
    config: EpConfig,
    placement: Arc<Placement>,
    device: Arc<CudaRank>,
    kernels: Kernels,
    control: ControlPlane,
    channel: u64,
    shared: Arc<SharedBuffers>,
    /// Every rank's buffers as this rank maps them, alive as long as this rank is.
    group: GroupBuffers,
    peers: EpPeers,
    expert_rank: StreamBuffer,
    local_index: StreamBuffer,
    local_experts: StreamBuffer,
    capacity: StreamBuffer,
    done: StreamBuffer,
    err: StreamBuffer,
    /// u64 on the device: the number of the current call, advanced by each call's first kernel.
    epoch: StreamBuffer,
    blocks: u32,
    /// One per receive slot: a slot is leased while a clone of its Arc lives in an output.
    slot_leases: Vec<Arc<()>>,
    /// Receive slots that a recorded graph writes into on every replay: never leased again.
    graph_slots: Vec<bool>,
    /// Whether calls are being recorded into a graph.
    capturing: bool,
    /// Whether the last call was a barrier or a token-major dispatch-direction call (a dispatch,
    /// its replay, a token-major combine_backward). Every rank passed that call's entry, so every
    /// rank finished the calls before it, and it touched neither the back buffers nor the arrival
    /// counters: a combine-direction call right after it needs no entry of its own (`ep_combine`).
    after_token_major_send: bool,
    /// Whether a graph was recorded: its replays run between live calls unseen here, so from
    /// then on a live call never counts on the one before it.
    recorded_graph: bool,
    /// Host rounds (`all_gather_host`) made so far.
    host_rounds: u64,
    /// The host word `hold_stream`'s gates open (made at the first hold), and the holds so far.
    hold_gate: Option<Arc<mem::HostWord>>,
    holds: u64,
    /// Where this dispatcher's calls run: the rank's stream, or one the caller set.
    stream: Stream,
}

fn i32_buffer(stream: &Stream, values: impl IntoIterator<Item = usize>) -> Result<StreamBuffer> {
    let v: Vec<i32> = values.into_iter().map(i32_of).collect();
    StreamBuffer::from_host(stream, bytemuck::cast_slice(&v)).map_err(device_error)
}

impl CudaBackend {
    pub(crate) fn new(
        control: ControlPlane,
        rank: usize,
        channel: u64,
        device: Arc<CudaRank>,
        config: EpConfig,
        placement: Arc<Placement>,
    ) -> Result<Self> {
        let world = placement.world();
        if world > k::MAX_WORLD {
            return Err(EpError::Group {
                arg: "world",
                expected: format!("at most {} ranks for the CUDA backend", k::MAX_WORLD),
                actual: world.to_string(),
            });
        }
        let fatbin = moe_ep_kernels::FATBIN.ok_or_else(|| EpError::BackendUnavailable {
            backend: "cuda",
            reason: format!(
                "moe-ep was built without CUDA kernels: {}",
                moe_ep_kernels::NOT_BUILT
            ),
        })?;
        let kernels = Kernels::load(&device.ctx, fatbin).map_err(device_error)?;
        let stream = device.stream.clone();
        let s = &stream;
        let capacity_rows: Vec<usize> = (0..world)
            .map(|d| {
                config
                    .recv_capacity
                    .unwrap_or_else(|| config.worst_case_rows(world, placement.num_local(d)))
            })
            .collect();
        let shared = Arc::new(SharedBuffers::new(s, &config, world).map_err(device_error)?);
        let group = join_group(&control, rank, channel, &device, &shared, &config)?;
        let kernels = match group.ranks_on_my_gpu {
            0 | 1 => kernels,
            _ => kernels.without_bulk_layout().without_overlapping_launches(),
        };
        let peers = group.peers;
        let e = config.num_experts;
        let expert_rank = i32_buffer(s, (0..e).map(|x| placement.rank_of(x)))?;
        let local_index = i32_buffer(s, (0..e).map(|x| placement.local_index(x)))?;
        let local_experts = i32_buffer(s, placement.experts_of(rank).to_vec())?;
        let capacity = i32_buffer(s, capacity_rows)?;
        // u32 [2]: blocks arrived (arrive_last), then ep_combine's next reduce item.
        let done = StreamBuffer::filled(s, 8, 0).map_err(device_error)?;
        let err = StreamBuffer::filled(s, 16, 0).map_err(device_error)?;
        let epoch = StreamBuffer::filled(s, 8, 0).map_err(device_error)?;
        let sms = device
            .ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(|e| device_error(mem::describe("reading the SM count", e)))?;
        // The data kernels' grid: one block per SM they may use, leaving the rest to the caller's
        // work (DeepEP's default is 20-24 SMs). Ranks sharing a GPU split its SMs: every block of
        // a call may spin waiting for peers, so all ranks' blocks must be resident at once.
        let share = sms as u32 / group.ranks_on_my_gpu.max(1) as u32;
        let blocks = config.num_sms.unwrap_or(DEFAULT_NUM_SMS).min(share).max(1);
        s.synchronize().map_err(device_error)?;
        Ok(CudaBackend {
            rank,
            world,
            config,
            placement,
            device,
            kernels,
            control,
            channel,
            shared,
            group,
            peers,
            expert_rank,
            local_index,
            local_experts,
            capacity,
            done,
            err,
            epoch,
            blocks,
            slot_leases: (0..STAGE_SLOTS).map(|_| Arc::new(())).collect(),
            graph_slots: vec![false; STAGE_SLOTS],
            capturing: false,
            after_token_major_send: false,
            recorded_graph: false,
            hold_gate: None,
            holds: 0,
            host_rounds: 0,
            stream,
        })
    }

    fn stream(&self) -> &Stream {
        &self.stream
    }

    fn ordinal(&self) -> u32 {
        self.device.ctx.ordinal() as u32
    }

    /// The dims the kernels of a call take; `begins_call` for the call's first kernel, which
    /// advances the call number.
    fn dims(&self, x_row_bytes: usize, begins_call: bool) -> EpDims {
        let c = &self.config;
        EpDims {
            rank: i32_of(self.rank),
            world: i32_of(self.world),
            num_experts: i32_of(c.num_experts),
            num_local: i32_of(self.placement.num_local(self.rank)),
            topk: i32_of(c.topk),
            hidden: i32_of(c.hidden),
            scale_cols: i32_of(c.scale_columns),
            max_tokens: i32_of(c.max_tokens_per_rank),
            x_row_bytes: i32_of(x_row_bytes),
            stage_row_bytes: i32_of(self.shared.stage_row_bytes),
            begins_call: begins_call as i32,
            reserved: 0,
            epoch_ptr: self.epoch.ptr(),
            my_signals: self.peers.signals[self.rank],
            timeout_ns: self.timeout_ns(),
        }
    }

    /// How long the kernels wait for a peer (or a gate) before giving up, in ns.
    fn timeout_ns(&self) -> u64 {
        u64::try_from(self.config.timeout.as_nanos()).unwrap_or(u64::MAX)
    }

    /// Device memory the kernels of the call write in full before anything reads it.
    fn alloc(&self, bytes: usize) -> Result<StreamBuffer> {
        StreamBuffer::uninit(self.stream(), bytes).map_err(device_error)
    }

    /// A device tensor the kernels of the call write in full (see [`Self::alloc`]).
    fn tensor(&self, rows: usize, cols: Option<usize>, dtype: DType) -> Result<Tensor> {
        let shape: Vec<usize> = match cols {
            Some(c) => vec![rows, c],
            None => vec![rows],
        };
        let bytes = shape.iter().product::<usize>() * dtype.size();
        Tensor::on_device(self.alloc(bytes)?, &shape, dtype)
    }

    fn grid(&self) -> Grid {
        Grid {
            blocks: self.blocks,
            threads: 1024,
        }
    }

    fn stage_rows(&self) -> usize {
        self.world * self.config.max_tokens_per_rank
    }

    fn capacity_of_me(&self) -> usize {
        self.config.recv_capacity.unwrap_or_else(|| {
            self.config
                .worst_case_rows(self.world, self.placement.num_local(self.rank))
        })
    }

    fn check<T>(&self, r: std::result::Result<T, String>) -> Result<T> {
        r.map_err(device_error)
    }

    /// Reads the device's error record once this rank's current stream is done: the stream the
    /// calls run on, which after `set_cuda_stream` is not the one `err` was made on.
    fn read_err(&self, rec: &mut [u8; 16]) -> std::result::Result<(), String> {
        mem::read_device(self.stream(), self.err.ptr(), rec)
    }

    /// Opens every hold of this rank's stream (see `hold_stream`), gates still alive or not.
    fn open_holds(&self) {
        if let Some(word) = &self.hold_gate {
            word.store(self.holds);
        }
    }

    /// Waits for this rank's work and turns a device-side error record into an error; errors that
    /// leave the group consistent (bad expert id, capacity) are cleared so the dispatcher goes on.
    pub(crate) fn synchronize(&mut self) -> Result<()> {
        // Waiting for the stream behind a closed hold would wait out its timeout.
        self.open_holds();
        let mut rec = [0u8; 16];
        self.check(self.read_err(&mut rec))?;
        let rec: [i32; 4] = bytemuck::cast(rec);
        let error = match rec[0] {
            0 => return Ok(()),
            k::ERR_EXPERT_ID => EpError::ExpertOutOfRange {
                arg: "topk_idx",
                row: rec[1] as usize,
                col: rec[2] as usize,
                value: rec[3] as i64,
                num_experts: self.config.num_experts,
            },
            k::ERR_CAPACITY => EpError::CapacityExceeded {
                rank: rec[1] as usize,
                need: rec[2] as usize,
                capacity: rec[3] as usize,
            },
            k::ERR_ROWS => EpError::Shape {
                arg: "y",
                expected: format!(
                    "[at least {}, {}] (every row dispatch produced)",
                    rec[1], self.config.hidden
                ),
                actual: format!("[{}, {}]", rec[2], self.config.hidden),
            },
            k::ERR_TIMEOUT => EpError::Timeout {
                rank: rec[1] as usize,
                missing: vec![rec[2] as usize],
                waited: self.config.timeout,
            },
            other => device_error(format!("unknown device error record {other}")),
        };
        if !error.poisons() {
            self.err = StreamBuffer::filled(self.stream(), 16, 0).map_err(device_error)?;
        }
        Err(error)
    }

    fn finish_exact(&mut self) -> Result<bool> {
        let exact = self.config.output_sizing == OutputSizing::Exact;
        if exact {
            self.synchronize()?;
        }
        Ok(exact)
    }

    /// Sends a payload along a recorded routing into every destination's staging buffer, as the
    /// call's first kernel (`dm.begins_call`: it waits until every rank entered the call), with
    /// the expert-major layout of the arriving rows when `expand` asks for it, or the token-major
    /// one when `token_layout` does.
    #[allow(clippy::too_many_arguments)]
    fn send_payload(
        &self,
        dm: EpDims,
        h: &CudaHandle,
        x: u64,
        scales: Option<u64>,
        num_tokens: usize,
        slot: &RecvSlot,
        (expand, token_layout): (EpExpand, EpTokenLayout),
    ) -> Result<()> {
        let r = self.kernels.dispatch_send(
            self.stream(),
            self.grid(),
            &self.peers,
            dm,
            x,
            ptr_or_null(scales),
            0,
            false,
            0,
            self.expert_rank.ptr(),
            self.local_index.ptr(),
            h.pos.ptr(),
            h.my_base_on.ptr(),
            0,
            i32_of(num_tokens),
            true,
            i32_of(slot.index),
            expand,
            token_layout,
            self.done.ptr(),
            self.err.ptr(),
        );
        self.check(r)
    }

    /// The receive slot of a call (see [`choose_slot`]); a call being recorded marks its slot as a
    /// graph's.
    fn pick_slot(&mut self, may_lease: bool) -> RecvSlot {
        let free: Vec<bool> = self
            .slot_leases
            .iter()
            .map(|l| Arc::strong_count(l) == 1)
            .collect();
        let (index, leased) = choose_slot(&free, &self.graph_slots, may_lease, self.capturing);
        if self.capturing {
            self.graph_slots[index] = true;
        }
        let lease = leased.then(|| {
            Arc::new(SlotLease {
                shared: self.shared.clone(),
                _lease: self.slot_leases[index].clone(),
            })
        });
        RecvSlot { index, lease }
    }

    /// Output tensors for `out_rows` payload rows of `dtype`, and their scales when `with_scales`
    /// and the dispatcher has scale columns: the receive slot's rows themselves when it is leased
    /// (the returned flag is then true: nothing to copy), else fresh memory.
    fn payload_tensors(
        &self,
        out_rows: usize,
        dtype: DType,
        with_scales: bool,
        slot: &RecvSlot,
    ) -> Result<(Tensor, Option<Tensor>, bool)> {
        let s_cols = self.config.scale_columns;
        let hidden = self.config.hidden;
        let with_scales = with_scales && s_cols > 0;
        if let Some(lease) = &slot.lease {
            let (x_at, scales_at) = self.shared.slot_offsets(slot.index);
            let view = |at: usize, bytes: usize, region: fn(&SlotLease) -> &mem::SharedBuffer| {
                StreamBuffer::region_of(self.stream(), lease.clone(), region, at, bytes)
                    .expect("a slot holds its rows")
            };
            let x = view(x_at, out_rows * hidden * dtype.size(), |l| {
                &l.shared.stage_x
            });
            let x = Tensor::on_device(x, &[out_rows, hidden], dtype)?;
            let scales = with_scales
                .then(|| {
                    let b = view(scales_at, out_rows * s_cols * 4, |l| &l.shared.stage_scales);
                    Tensor::on_device(b, &[out_rows, s_cols], DType::F32)
                })
                .transpose()?;
            return Ok((x, scales, true));
        }
        // Rows past the valid ones keep unspecified payload (docs/semantics.md).
        let x = self.tensor(out_rows, Some(hidden), dtype)?;
        let scales = with_scales
            .then(|| self.tensor(out_rows, Some(s_cols), DType::F32))
            .transpose()?;
        Ok((x, scales, false))
    }

    /// Whether a token-major output of `dtype` can be its receive slot's rows (same row size).
    fn slot_holds_rows_of(&self, dtype: DType) -> bool {
        self.shared.stage_row_bytes == self.config.hidden * dtype.size()
    }

    /// A token-major replay (`first`: the dims of its call's one kernel): sends a payload along a
    /// recorded routing and, once every rank's rows arrived, lays them out in the recorded rows,
    /// in the same kernel: `[out_rows, H]` of `dtype`, and the scales when `with_scales` (the
    /// dispatcher has scale columns and the payload carried them).
    fn replay_token_major(
        &mut self,
        first: EpDims,
        h: &CudaHandle,
        (x, scales): (u64, Option<u64>),
        num_tokens: usize,
        (out_rows, dtype, with_scales): (usize, DType, bool),
        slot: &RecvSlot,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (out_x, out_scales, in_place) =
            self.payload_tensors(out_rows, dtype, with_scales, slot)?;
        let layout = self.token_layout(h, slot, (&out_x, out_scales.as_ref(), in_place), None);
        let none = EpExpand::default();
        self.send_payload(first, h, x, scales, num_tokens, slot, (none, layout))?;
        self.after_token_major_send = true;
        Ok((out_x, out_scales))
    }

    /// The token-major layout `ep_dispatch_send` runs once every rank's rows arrived: copies them
    /// from the receive slot `slot` into `payload` (rows, scales, and whether those are the
    /// slot's own rows: then nothing is copied) and, for a dispatch, writes `meta`, every row of
    /// it. It ends every token-major dispatch-direction call, so its caller sets
    /// `after_token_major_send` once the kernel is queued.
    fn token_layout(
        &self,
        h: &CudaHandle,
        slot: &RecvSlot,
        payload: (&Tensor, Option<&Tensor>, bool),
        meta: Option<TokenMeta>,
    ) -> EpTokenLayout {
        let (x, scales, in_place) = payload;
        let copied = |t: Option<&Tensor>| match in_place {
            true => 0,
            false => ptr_or_null(t.and_then(Tensor::device_ptr)),
        };
        let m = meta.unwrap_or_default();
        let stage = self.shared.slot(slot.index);
        EpTokenLayout {
            stage_x: stage.x,
            stage_scales: stage.scales,
            stage_meta: stage.meta,
            recv_base: h.recv_base.ptr(),
            out_x: copied(Some(x)),
            out_scales: copied(scales),
            out_topk: m.topk,
            out_weights: m.weights,
            out_src: m.src,
            row_src: m.row_src,
            row_slots: m.row_slots,
            out_row_bytes: i32_of(x.dims()[1] * x.dtype().size()),
            out_rows: i32_of(x.dims()[0]),
            payload_only: meta.is_none() as i32,
            enabled: 1,
        }
    }

    /// The expert-major layout the send kernel's receiving warps write into `x` (and `scales`)
    /// from this call's receive slot `slot`; the caller adds what a dispatch also records.
    fn expand_into(
        &self,
        slot: &RecvSlot,
        h: &CudaHandle,
        x: &Tensor,
        scales: Option<&Tensor>,
    ) -> EpExpand {
        let stage = self.shared.slot(slot.index);
        EpExpand {
            stage_x: stage.x,
            stage_scales: stage.scales,
            stage_meta: stage.meta,
            recv_base: h.recv_base.ptr(),
            offsets: h.offsets_ptr(),
            exp_rows: h.exp_rows.as_ref().map_or(0, StreamBuffer::ptr),
            out_x: x.device_ptr().expect("device tensor"),
            out_scales: ptr_or_null(scales.and_then(Tensor::device_ptr)),
            out_row_bytes: i32_of(x.dims()[1] * x.dtype().size()),
            out_rows: i32_of(x.dims()[0]),
            send_warps: dispatch_send_warps(self.world),
            ..EpExpand::default()
        }
    }

    /// A whole call in the reverse direction, one kernel: each staged row goes back to its source
    /// (expert-major: as the partial over its slots), and the sources reduce over destinations in
    /// rank order as each chunk of their tokens completes. `rows_given`: the fewest rows among the
    /// per-row tensors handed back.
    #[allow(clippy::too_many_arguments)]
    fn reduce_back(
        &mut self,
        h: &CudaHandle,
        num_tokens: usize,
        y: u64,
        rows_given: usize,
        weights: Option<u64>,
        unit_weights: bool,
        side: Option<(u64, i32)>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let row_bytes = self.config.hidden * self.config.combine_dtype.size();
        let (side_ptr, side_mode) = side.unwrap_or((0, SIDE_NONE));
        let out = self.tensor(
            num_tokens,
            Some(self.config.hidden),
            self.config.combine_dtype,
        )?;
        let out_side = side
            .map(|_| self.tensor(num_tokens, Some(self.config.topk), DType::F32))
            .transpose()?;
        let send = k::CombineSend {
            y,
            weights: ptr_or_null(weights),
            row_weights: ptr_or_null(h.row_weights.as_ref().map(StreamBuffer::ptr)),
            unit_weights,
            recv_base: h.recv_base.ptr(),
            row_src: h.row_src.ptr(),
            row_slots: ptr_or_null(h.row_slots.as_ref().map(StreamBuffer::ptr)),
            exp_rows: ptr_or_null(h.exp_rows.as_ref().map(StreamBuffer::ptr)),
            side: side_ptr,
            side_mode,
            offsets: h.offsets_ptr(),
            rows_given: i32_of(rows_given),
        };
        let reduce = self.reduce_args(
            h,
            num_tokens,
            out.device_ptr(),
            out_side.as_ref().and_then(Tensor::device_ptr),
        );
        let skip_entry = self.take_skip_entry();
        let r = self.kernels.combine(
            self.stream(),
            elem(self.config.combine_dtype),
            self.grid(),
            &self.peers,
            self.dims(row_bytes, true),
            &send,
            &reduce,
            skip_entry,
            combine_send_warps(self.world, h.exp_rows.is_some(), num_tokens),
            self.done.ptr(),
            self.err.ptr(),
        );
        self.check(r)?;
        Ok((out, out_side))
    }

    /// Whether the combine-direction call about to launch may skip its entry (see
    /// `after_token_major_send`); a call inside a recording counts only on calls recorded with it.
    /// Clears the mark: this call is not a token-major dispatch-direction call.
    fn take_skip_entry(&mut self) -> bool {
        let skip = may_skip_entry(
            self.after_token_major_send,
            self.capturing,
            self.recorded_graph,
        );
        self.after_token_major_send = false;
        skip
    }

    /// What the reduce of a combine-direction call reads (the rows sent back here) and writes.
    fn reduce_args(
        &self,
        h: &CudaHandle,
        num_tokens: usize,
        out: Option<u64>,
        out_side: Option<u64>,
    ) -> k::CombineReduce {
        k::CombineReduce {
            back: self.shared.back.ptr(),
            back_side: self.shared.back_side.ptr(),
            pos: h.pos.ptr(),
            num_tokens: i32_of(num_tokens),
            out: ptr_or_null(out),
            out_side: ptr_or_null(out_side),
        }
    }

    /// Once flag `sig` arrived from every rank, sums the rows sent back into `out` (and the side
    /// values into `out_side`).
    fn reduce(
        &self,
        dm: EpDims,
        h: &CudaHandle,
        num_tokens: usize,
        out: Option<u64>,
        out_side: Option<u64>,
        sig: i32,
    ) -> Result<()> {
        let r = self.kernels.combine_reduce(
            self.stream(),
            elem(self.config.combine_dtype),
            self.grid(),
            dm,
            &self.reduce_args(h, num_tokens, out, out_side),
            sig,
            self.err.ptr(),
        );
        self.check(r)
    }
}

/// What a token-major dispatch's layout writes besides the payload (device addresses, 0 for an
/// absent one): `topk_idx`, the weights, `src`, and the handle's (source, token) and slot ids.
#[derive(Debug, Clone, Copy, Default)]
struct TokenMeta {
    topk: u64,
    weights: u64,
    src: u64,
    row_src: u64,
    row_slots: u64,
}

/// Warps of each 32-warp block of `ep_combine` that send rows back first; the others reduce from
/// the start, and the senders join them once their rows are out. The senders are bound by the
/// links (token-major) or by gathering each row's partial (expert-major), the reducers by loads
/// from this GPU's memory and by the arrivals (docs/perf-notes.md, v3, v4, v6 and v16 have the
/// measured splits). An expert-major combine of many tokens at world 2 gathers with 31: there
/// the reduce keeps up with one warp a block, and the gather is what takes the time; with fewer
/// tokens the reduce follows the last rows and needs the warps. MOE_EP_COMBINE_SEND_WARPS
/// (1..31) overrides it, for measuring the split.
fn combine_send_warps(world: usize, expert_major: bool, num_tokens: usize) -> i32 {
    static WARPS: std::sync::OnceLock<Option<i32>> = std::sync::OnceLock::new();
    let set = *WARPS.get_or_init(|| warps_from_env("MOE_EP_COMBINE_SEND_WARPS"));
    let gather_bound = expert_major && world <= 2 && num_tokens >= 2048;
    set.unwrap_or(if gather_bound { 31 } else { 24 })
}

/// Warps of each block of an expert-major dispatch's send kernel that send; the others lay the
/// arriving rows out (docs/perf-notes.md, v5). Two ranks send more: each GPU then lays out rows
/// from one peer, not three, so fewer warps keep up with them (v15, v16 measured the splits).
/// MOE_EP_DISPATCH_SEND_WARPS (1..31) overrides it.
fn dispatch_send_warps(world: usize) -> i32 {
    static WARPS: std::sync::OnceLock<Option<i32>> = std::sync::OnceLock::new();
    let set = *WARPS.get_or_init(|| warps_from_env("MOE_EP_DISPATCH_SEND_WARPS"));
    set.unwrap_or(if world <= 2 { 20 } else { 16 })
}

/// A warp count of 1..31 from the environment variable `name`, if set to one.
fn warps_from_env(name: &str) -> Option<i32> {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|w| (1..32).contains(w))
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        // Work still queued on this rank's stream reads and writes the group's buffers; let it
        // finish (every wait in it is bounded by the timeout) before they may be freed, with
        // every hold opened.
        self.open_holds();
        let _ = self.stream.synchronize();
        let ControlPlane::Tcp(tcp) = &self.control else {
            return; // local groups free buffers when the last rank lets go of them
        };
        // Another process may still store into this rank's buffers until it finished its last
        // call: meet once more before freeing. A poisoned group (a peer gone) may never meet, so
        // its memory is left mapped rather than freed under a peer's stores.
        let mut rec = [0u8; 16];
        let poisoned = self.read_err(&mut rec).is_err()
            || bytemuck::cast::<_, [i32; 4]>(rec)[0] == k::ERR_TIMEOUT;
        let met = !poisoned
            && tcp
                .all_gather(
                    (self.channel, u64::MAX),
                    Op::Drop,
                    Vec::new(),
                    self.config.timeout,
                )
                .is_ok();
        if !met {
            std::mem::forget(self.shared.clone());
            std::mem::forget(std::mem::take(&mut self.group.mapped));
        }
    }
}

/// The fewest rows among the per-row tensors handed back (the kernels check they cover dispatch).
fn rows_given(rows: &TensorRef<'_>, per_row_weights: Option<&TensorRef<'_>>) -> usize {
    per_row_weights.map_or(rows.dims()[0], |w| w.dims()[0].min(rows.dims()[0]))
}

fn cuda_state(h: &HandleInner) -> &CudaHandle {
    match &h.state {
        BackendHandle::Cuda(c) => c,
        BackendHandle::Cpu(_) => unreachable!("the dispatcher checked the handle is its own"),
    }
}

fn ptr_of(t: &TensorRef<'_>) -> u64 {
    t.device_ptr()
        .expect("the dispatcher checked every tensor is on this device")
}

impl Backend for CudaBackend {
    fn device(&self) -> Device {
        Device::Cuda(self.ordinal())
    }

    fn synchronize(&mut self) -> Result<()> {
        CudaBackend::synchronize(self)
    }

    fn cuda_stream(&self) -> Option<u64> {
        Some(self.stream.handle())
    }

    fn all_gather_host(&mut self, bytes: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        // Rounds 0 and 1 of the channel set the dispatcher up; host rounds follow in call order.
        self.host_rounds += 1;
        let key = (self.channel, 1 + self.host_rounds);
        let timeout = self.config.timeout;
        match &self.control {
            ControlPlane::Local(exchange) => {
                let posts = exchange.all_gather(
                    self.rank,
                    key,
                    Op::Host,
                    CudaMessage::Bytes(bytes),
                    timeout,
                )?;
                Ok(posts
                    .iter()
                    .map(|p| match p.as_ref() {
                        CudaMessage::Bytes(b) => b.clone(),
                        _ => unreachable!("Op::Host rounds carry bytes"),
                    })
                    .collect())
            }
            ControlPlane::Tcp(tcp) => tcp.all_gather(key, Op::Host, bytes, timeout),
        }
    }

    fn barrier(&mut self) -> Result<()> {
        self.after_token_major_send = false;
        let dm = self.dims(0, true);
        let r = self
            .kernels
            .barrier(self.stream(), &self.peers, dm, self.err.ptr());
        self.check(r)?;
        // Every rank passed it, and it touches no buffer: as good as a token-major send for the
        // combine after it.
        self.after_token_major_send = true;
        Ok(())
    }

    fn hold_stream(&mut self) -> Result<Option<StreamGate>> {
        // A hold recorded into a graph would wait on every replay for a gate opened once.
        if self.capturing {
            return Ok(None);
        }
        let word = match &self.hold_gate {
            Some(w) => w.clone(),
            None => {
                let w = Arc::new(mem::HostWord::new(&self.device.ctx).map_err(device_error)?);
                self.hold_gate.insert(w).clone()
            }
        };
        self.holds += 1;
        let until = self.holds;
        let timeout_ns = self.timeout_ns();
        let r = self
            .kernels
            .hold(self.stream(), word.device_ptr(), until, timeout_ns);
        self.check(r)?;
        Ok(Some(StreamGate::new(move || word.store(until))))
    }

    unsafe fn set_cuda_stream(&mut self, stream: u64) -> Result<()> {
        // Work queued on the old stream must not overlap the new stream's.
        self.stream.synchronize().map_err(device_error)?;
        // SAFETY: the caller's contract (Dispatcher::set_cuda_stream) is Stream::borrowed's.
        self.stream = unsafe { Stream::borrowed(stream, self.device.ctx.clone()) };
        Ok(())
    }

    fn begin_capture(&mut self) -> Result<()> {
        self.stream
            .begin_capture()
            .map_err(|e| device_error(mem::describe("cuStreamBeginCapture", e)))?;
        self.capturing = true;
        // The recording's first call follows whatever ran before each replay.
        self.after_token_major_send = false;
        Ok(())
    }

    fn end_capture(&mut self) -> Result<crate::graph::Graph> {
        self.capturing = false;
        self.after_token_major_send = false;
        self.recorded_graph = true;
        let graph = self
            .stream
            .end_capture()
            .map_err(|e| device_error(mem::describe("cuStreamEndCapture", e)))?
            .ok_or_else(|| device_error("the capture recorded no work".into()))?;
        Ok(crate::graph::Graph::cuda(graph))
    }

    fn to_device(&self, host: TensorRef<'_>) -> Result<Tensor> {
        let bytes = host.host_bytes("tensor")?;
        let buf = StreamBuffer::from_host(self.stream(), bytes).map_err(device_error)?;
        Tensor::on_device(buf, host.dims(), host.dtype())
    }

    fn dispatch(&mut self, args: DispatchArgs<'_>) -> Result<Dispatched> {
        self.after_token_major_send = false;
        let c = self.config.clone();
        let (world, kk, hidden) = (self.world, c.topk, c.hidden);
        let num_tokens = args.x.dims()[0];
        let dm = self.dims(hidden * c.dtype.size(), false);
        let num_local = self.placement.num_local(self.rank);
        let expert_major = match c.layout {
            Layout::TokenMajor => None,
            Layout::ExpertMajor { align } => Some(align),
        };
        let stage_rows = self.stage_rows();
        let cap = self.capacity_of_me();
        let has_weights = args.weights.is_some();
        let slot = self.pick_slot(expert_major.is_none() && self.slot_holds_rows_of(c.dtype));

        // Two allocations for every small buffer of the call, taken before the first launch: the
        // handle's state, and the metadata outputs (each group is dropped together). The payload
        // comes later: it may be the receive slot itself.
        let em = expert_major.is_some();
        let [pos, recv_base, my_base_on, row_src, row_map, row_weights, slot_rank, group_base, rank_scratch] =
            StreamBuffer::carve(
                self.stream(),
                [
                    num_tokens * world * 4,
                    (world + 1) * 4,
                    world * 4,
                    stage_rows * 2 * 4,
                    stage_rows * kk * 4,
                    if em { cap * 4 } else { 0 },
                    if em { num_tokens * kk * 4 } else { 0 },
                    if em { world * num_local * 4 } else { 0 },
                    k::rank_scratch_ints(c.num_experts) * 4,
                ],
            )
            .map_err(device_error)?;
        let src_cols = if em { 3 } else { 2 };
        // Per output row: token-major topk_idx and weights [K], expert-major local_expert and weight.
        let per_row = if em { 1 } else { kk };
        let [per_src, per_expert, offsets, src, row_ids, row_w] = StreamBuffer::carve(
            self.stream(),
            [
                world * 4,
                num_local * 4,
                if em { (num_local + 1) * 4 } else { 0 },
                cap * src_cols * 4,
                cap * per_row * 4,
                if has_weights { cap * per_row * 4 } else { 0 },
            ],
        )
        .map_err(device_error)?;
        let row_dims = if em { vec![cap] } else { vec![cap, kk] };
        let per_src = Tensor::on_device(per_src, &[world], DType::I32)?;
        let per_expert = Tensor::on_device(per_expert, &[num_local], DType::I32)?;
        let offsets = em
            .then(|| Tensor::on_device(offsets, &[num_local + 1], DType::I32))
            .transpose()?;
        let src = Tensor::on_device(src, &[cap, src_cols], DType::I32)?;
        let row_ids = Tensor::on_device(row_ids, &row_dims, DType::I32)?;
        let row_w = has_weights
            .then(|| Tensor::on_device(row_w, &row_dims, DType::F32))
            .transpose()?;
        let only_em = |b: &StreamBuffer| if em { b.ptr() } else { 0 };
        let topk = ptr_of(&args.topk_idx);
        let idx64 = args.topk_idx.dtype() == DType::I64;
        let r = self.kernels.route_notify(
            self.stream(),
            &self.peers,
            self.dims(hidden * c.dtype.size(), true),
            topk,
            idx64,
            i32_of(num_tokens),
            self.expert_rank.ptr(),
            self.local_experts.ptr(),
            self.capacity.ptr(),
            expert_major.map_or(0, i32_of),
            i32_of(slot.index),
            pos.ptr(),
            only_em(&slot_rank),
            match k::rank_scratch_ints(c.num_experts) {
                0 => 0,
                _ => rank_scratch.ptr(),
            },
            recv_base.ptr(),
            my_base_on.ptr(),
            per_src.device_ptr().expect("device"),
            per_expert.device_ptr().expect("device"),
            ptr_or_null(offsets.as_ref().and_then(Tensor::device_ptr)),
            only_em(&group_base),
            self.done.ptr(),
            self.err.ptr(),
        );
        self.check(r)?;

        let src_ptr = src.device_ptr().expect("device");
        let mut handle = CudaHandle {
            pos,
            recv_base,
            my_base_on,
            row_src,
            row_slots: None,
            exp_rows: None,
            row_weights: None,
            offsets: offsets.clone(),
        };
        // The payload: token-major possibly the receive slot itself; expert-major rows the send
        // kernel lays out as they arrive, with everything the dispatch records about them.
        let (x, scales, in_place) = self.payload_tensors(cap, c.dtype, true, &slot)?;
        let mut row_map = Some(row_map);
        let expand = match em {
            false => EpExpand::default(),
            true => {
                handle.exp_rows = row_map.take();
                let row_weights_ptr = row_weights.ptr();
                handle.row_weights = Some(row_weights);
                EpExpand {
                    group_base: group_base.ptr(),
                    per_expert: per_expert.device_ptr().expect("device"),
                    out_src: src_ptr,
                    out_local_expert: row_ids.device_ptr().expect("device"),
                    out_weights: ptr_or_null(row_w.as_ref().and_then(Tensor::device_ptr)),
                    row_weights: row_weights_ptr,
                    row_src: handle.row_src.ptr(),
                    has_weights: has_weights as i32,
                    ..self.expand_into(&slot, &handle, &x, scales.as_ref())
                }
            }
        };
        // Token-major, the send kernel's blocks lay the rows out once every rank's are in, and
        // write every row of these (padding included: src -1 and so on, as docs/semantics.md
        // states); expert-major, its receiving warps do as the rows arrive.
        let row_slots = (!em).then(|| row_map.take().expect("token-major row slots"));
        let token_layout = match &row_slots {
            None => EpTokenLayout::default(),
            Some(row_slots) => {
                let meta = TokenMeta {
                    topk: row_ids.device_ptr().expect("device"),
                    weights: ptr_or_null(row_w.as_ref().and_then(Tensor::device_ptr)),
                    src: src_ptr,
                    row_src: handle.row_src.ptr(),
                    row_slots: row_slots.ptr(),
                };
                let payload = (&x, scales.as_ref(), in_place);
                self.token_layout(&handle, &slot, payload, Some(meta))
            }
        };
        let r = self.kernels.dispatch_send(
            self.stream(),
            self.grid(),
            &self.peers,
            dm,
            ptr_of(&args.x),
            ptr_or_null(args.scales.as_ref().map(ptr_of)),
            topk,
            idx64,
            ptr_or_null(args.weights.as_ref().map(ptr_of)),
            self.expert_rank.ptr(),
            self.local_index.ptr(),
            handle.pos.ptr(),
            handle.my_base_on.ptr(),
            only_em(&slot_rank),
            i32_of(num_tokens),
            false,
            -1,
            expand,
            token_layout,
            self.done.ptr(),
            self.err.ptr(),
        );
        self.check(r)?;
        let (topk_idx, weights_out, local_expert) = match row_slots {
            Some(row_slots) => {
                self.after_token_major_send = true;
                handle.row_slots = Some(row_slots);
                (Some(row_ids), row_w, None)
            }
            None => (None, row_w, Some(row_ids)),
        };
        let mut output = DispatchOutput {
            x,
            scales,
            topk_idx,
            topk_weights: weights_out,
            src,
            local_expert,
            num_recv_per_src: per_src,
            num_recv_per_local_expert: per_expert,
            expert_offsets: offsets,
            host_counts: None,
        };
        // Without a host sync the valid row count stays on the device; the kernels that take rows
        // back check it there.
        let mut num_rows = 0;
        let mut out_rows = cap;
        if self.finish_exact()? {
            let host = |t: &Tensor| -> Result<Vec<usize>> {
                Ok(t.to_host()?
                    .as_slice::<i32>()?
                    .iter()
                    .map(|&v| v as usize)
                    .collect())
            };
            let per_src = host(&output.num_recv_per_src)?;
            let per_local_expert = host(&output.num_recv_per_local_expert)?;
            let expert_offsets = output.expert_offsets.as_ref().map(host).transpose()?;
            let rows = match &expert_offsets {
                Some(o) => *o.last().expect("E_local + 1 offsets"),
                None => per_src.iter().sum(),
            };
            output.truncate_rows(rows)?;
            output.host_counts = Some(HostCounts {
                rows,
                per_src,
                per_local_expert,
                expert_offsets,
            });
            num_rows = rows;
            out_rows = rows;
        }
        Ok(Dispatched {
            output,
            num_rows,
            out_rows,
            state: BackendHandle::Cuda(Box::new(handle)),
        })
    }

    fn dispatch_cached(
        &mut self,
        handle: &HandleInner,
        x: TensorRef<'_>,
        scales: Option<TensorRef<'_>>,
    ) -> Result<CachedDispatchOutput> {
        self.after_token_major_send = false;
        let h = cuda_state(handle);
        let dtype = self.config.dtype;
        let row_bytes = self.config.hidden * dtype.size();
        let token_major = h.exp_rows.is_none();
        let slot = self.pick_slot(token_major && self.slot_holds_rows_of(dtype));
        let first = self.dims(row_bytes, true);
        let (x_in, scales_in) = (ptr_of(&x), scales.as_ref().map(ptr_of));
        let (x, scales) = if token_major {
            let out = (handle.out_rows, dtype, true);
            let payload = (x_in, scales_in);
            self.replay_token_major(first, h, payload, handle.num_tokens, out, &slot)?
        } else {
            // The send kernel lays the rows out along the recorded expansion as they arrive.
            let (x, scales, _) = self.payload_tensors(handle.out_rows, dtype, true, &slot)?;
            let expand = self.expand_into(&slot, h, &x, scales.as_ref());
            let layout = (expand, EpTokenLayout::default());
            self.send_payload(first, h, x_in, scales_in, handle.num_tokens, &slot, layout)?;
            (x, scales)
        };
        self.finish_exact()?;
        Ok(CachedDispatchOutput { x, scales })
    }

    fn combine(
        &mut self,
        handle: &HandleInner,
        y: TensorRef<'_>,
        weights: Option<TensorRef<'_>>,
    ) -> Result<CombineOutput> {
        let h = cuda_state(handle);
        let token_major = h.exp_rows.is_none();
        let (override_weights, side) = match (&weights, token_major) {
            (Some(w), true) => (None, Some((ptr_of(w), SIDE_ROW_K))),
            (Some(w), false) => (Some(ptr_of(w)), None),
            (None, _) => (None, None),
        };
        let (x, weights) = self.reduce_back(
            h,
            handle.num_tokens,
            ptr_of(&y),
            rows_given(&y, weights.as_ref()),
            override_weights,
            false,
            side,
        )?;
        self.finish_exact()?;
        Ok(CombineOutput { x, weights })
    }

    fn dispatch_backward(
        &mut self,
        handle: &HandleInner,
        grad_recv: TensorRef<'_>,
        grad_recv_weights: Option<TensorRef<'_>>,
    ) -> Result<DispatchBackwardOutput> {
        let h = cuda_state(handle);
        let mode = if h.exp_rows.is_none() {
            SIDE_ROW_K_OWNED
        } else {
            SIDE_EXPANDED
        };
        let side = grad_recv_weights.as_ref().map(|w| (ptr_of(w), mode));
        let rows_given = rows_given(&grad_recv, grad_recv_weights.as_ref());
        let (grad_x, grad_weights) = self.reduce_back(
            h,
            handle.num_tokens,
            ptr_of(&grad_recv),
            rows_given,
            None,
            true,
            side,
        )?;
        self.finish_exact()?;
        Ok(DispatchBackwardOutput {
            grad_x,
            grad_weights,
        })
    }

    fn combine_backward(
        &mut self,
        handle: &HandleInner,
        grad_out: TensorRef<'_>,
        y: Option<TensorRef<'_>>,
    ) -> Result<CombineBackwardOutput> {
        self.after_token_major_send = false;
        let h = cuda_state(handle);
        let cd = self.config.combine_dtype;
        let row_bytes = self.config.hidden * cd.size();
        let first = self.dims(row_bytes, true);
        let slot = self.pick_slot(h.exp_rows.is_none() && self.slot_holds_rows_of(cd));
        let grad = ptr_of(&grad_out);
        let Some(exp_rows) = &h.exp_rows else {
            // Token-major combine is an unweighted sum: its backward is a replay of grad_out.
            let out = (handle.out_rows, cd, false);
            let (grad_y, _) =
                self.replay_token_major(first, h, (grad, None), handle.num_tokens, out, &slot)?;
            self.finish_exact()?;
            return Ok(CombineBackwardOutput {
                grad_y,
                grad_weights: None,
            });
        };
        let none = (EpExpand::default(), EpTokenLayout::default());
        self.send_payload(first, h, grad, None, handle.num_tokens, &slot, none)?;
        let dm = self.dims(row_bytes, false);
        // Padding rows of grad_y are unspecified, like the payload's.
        let grad_y = self.tensor(handle.out_rows, Some(self.config.hidden), cd)?;
        let r = self.kernels.combine_backward_expert(
            self.stream(),
            elem(cd),
            self.grid(),
            &self.peers,
            dm,
            self.shared.slot(slot.index).x,
            ptr_or_null(y.as_ref().map(ptr_of)),
            h.row_weights.as_ref().expect("expert-major handle").ptr(),
            h.recv_base.ptr(),
            h.row_src.ptr(),
            exp_rows.ptr(),
            h.offsets_ptr(),
            i32_of(y.as_ref().map_or(0, |y| y.dims()[0])),
            grad_y.device_ptr().expect("device"),
            self.done.ptr(),
            self.err.ptr(),
        );
        self.check(r)?;
        let grad_weights = if y.is_some() {
            let gw = self.tensor(handle.num_tokens, Some(self.config.topk), DType::F32)?;
            self.reduce(dm, h, handle.num_tokens, None, gw.device_ptr(), SIG_DATA2)?;
            Some(gw)
        } else {
            None
        };
        self.finish_exact()?;
        Ok(CombineBackwardOutput {
            grad_y,
            grad_weights,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{choose_slot, may_skip_entry};

    #[test]
    fn a_combine_skips_its_entry_only_after_a_token_major_send_no_replay_can_follow() {
        // (after a token-major send, capturing, a graph recorded before) -> may skip
        let cases = [
            ((true, false, false), true),
            ((true, true, false), true),
            ((true, true, true), true),
            ((true, false, true), false),
            ((false, false, false), false),
            ((false, true, false), false),
            ((false, true, true), false),
            ((false, false, true), false),
        ];
        for ((after, capturing, recorded), want) in cases {
            assert_eq!(
                may_skip_entry(after, capturing, recorded),
                want,
                "after_token_major_send {after}, capturing {capturing}, recorded_graph {recorded}"
            );
        }
    }

    #[test]
    fn a_slot_is_leased_only_while_another_stays_free() {
        assert_eq!(
            choose_slot(&[true, true], &[false, false], true, false),
            (0, true)
        );
        assert_eq!(
            choose_slot(&[false, true], &[false, false], true, false),
            (1, false)
        );
        assert_eq!(
            choose_slot(&[true, false], &[false, false], true, false),
            (0, false)
        );
        assert_eq!(
            choose_slot(&[true, true], &[false, false], false, false),
            (0, false)
        );
    }

    #[test]
    fn graphs_never_lease_and_their_slots_are_never_leased() {
        assert_eq!(
            choose_slot(&[true, true], &[false, false], true, true),
            (0, false)
        );
        assert_eq!(
            choose_slot(&[true, true], &[true, false], true, false),
            (1, true)
        );
        assert_eq!(
            choose_slot(&[true, true], &[true, true], true, false),
            (0, false)
        );
    }
}
