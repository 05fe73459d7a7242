//! The edge to moe-ep's own kernels (crates/moe-ep-kernels/cuda/moe_ep.cu): the parameter structs
//! mirrored from moe_ep.h, and one launch function per kernel whose argument list mirrors the
//! kernel's signature. Buffer sizes are the callers' (backend/cuda) duty, as each kernel's comment
//! in moe_ep.cu states them; these functions are crate-internal for that reason.

use super::cuda_memory::describe;
use super::cuda_stream::Stream;
use cudarc::driver::{sys, CudaContext, CudaFunction, CudaModule};
use std::ffi::c_void;
use std::sync::Arc;

/// Must equal EP_MAX_WORLD in moe_ep.h.
pub(crate) const MAX_WORLD: usize = 16;
pub(crate) const SIG_DATA2: i32 = 2;
pub(crate) const NUM_SIGNALS: usize = 3;
/// Tokens per combine arrival counter (EP_CHUNK_TOKENS); the counters follow the flags in each
/// rank's signals buffer, u32 [world][ceil(max_tokens / CHUNK_TOKENS)].
pub(crate) const CHUNK_TOKENS: usize = 32;
pub(crate) const ERR_EXPERT_ID: i32 = 1;
pub(crate) const ERR_TIMEOUT: i32 = 2;
pub(crate) const ERR_CAPACITY: i32 = 3;
pub(crate) const ERR_ROWS: i32 = 4;
pub(crate) const SIDE_NONE: i32 = 0;
pub(crate) const SIDE_ROW_K: i32 = 1;
pub(crate) const SIDE_ROW_K_OWNED: i32 = 2;
pub(crate) const SIDE_EXPANDED: i32 = 3;

/// Ints of metadata per staged row (EP_META_INTS).
pub(crate) fn meta_ints(topk: usize) -> usize {
    2 + 3 * topk
}

/// Experts the route kernel ranks slots of in shared memory (EP_RANK_SHARED_INTS); past that it
/// takes a scratch of i32 [32][E] (`rank_scratch_ints`).
pub(crate) const RANK_SHARED_INTS: usize = 11264;

/// Ints of the route kernel's global rank scratch for `num_experts` experts (0: none needed).
pub(crate) fn rank_scratch_ints(num_experts: usize) -> usize {
    if num_experts <= RANK_SHARED_INTS {
        0
    } else {
        32 * num_experts
    }
}

/// `struct EpPeers` of moe_ep.h: every rank's shared buffer addresses.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct EpPeers {
    pub signals: [u64; MAX_WORLD],
    pub inbox: [u64; MAX_WORLD],
    pub stage_x: [u64; MAX_WORLD],
    pub stage_scales: [u64; MAX_WORLD],
    pub stage_meta: [u64; MAX_WORLD],
    pub back: [u64; MAX_WORLD],
    pub back_side: [u64; MAX_WORLD],
}

/// `struct EpDims` of moe_ep.h.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct EpDims {
    pub rank: i32,
    pub world: i32,
    pub num_experts: i32,
    pub num_local: i32,
    pub topk: i32,
    pub hidden: i32,
    pub scale_cols: i32,
    pub max_tokens: i32,
    pub x_row_bytes: i32,
    pub stage_row_bytes: i32,
    /// 1 when the kernel is its call's first (it advances the call number).
    pub begins_call: i32,
    pub reserved: i32,
    /// Address of this rank's call counter (a u64 on its device).
    pub epoch_ptr: u64,
    /// Address of this rank's flags (`EpPeers::signals[rank]`).
    pub my_signals: u64,
    pub timeout_ns: u64,
}

/// `struct EpExpand` of moe_ep.h: the expert-major layout `ep_dispatch_send`'s receiving warps
/// write as rows arrive (device addresses; 0 for absent ones; `send_warps` 0: no layout there).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct EpExpand {
    pub stage_x: u64,
    pub stage_scales: u64,
    pub stage_meta: u64,
    pub recv_base: u64,
    /// `[world][E_local]` first output row of each (source, local expert); 0 in a replay.
    pub group_base: u64,
    pub offsets: u64,
    pub per_expert: u64,
    /// `[world * max_tokens][K]`: written from the metadata, or read in a replay.
    pub exp_rows: u64,
    pub out_x: u64,
    pub out_scales: u64,
    pub out_src: u64,
    pub out_local_expert: u64,
    pub out_weights: u64,
    pub row_weights: u64,
    pub row_src: u64,
    pub out_row_bytes: i32,
    pub out_rows: i32,
    pub has_weights: i32,
    pub send_warps: i32,
}

/// `struct EpTokenLayout` of moe_ep.h: the token-major layout `ep_dispatch_send`'s blocks write
/// once every rank's rows arrived (device addresses; 0 for absent ones; `enabled` 0: none there).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct EpTokenLayout {
    pub stage_x: u64,
    pub stage_scales: u64,
    pub stage_meta: u64,
    pub recv_base: u64,
    /// 0: the output is the receive slot's rows themselves, nothing to copy.
    pub out_x: u64,
    pub out_scales: u64,
    pub out_topk: u64,
    pub out_weights: u64,
    pub out_src: u64,
    pub row_src: u64,
    pub row_slots: u64,
    pub out_row_bytes: i32,
    pub out_rows: i32,
    pub payload_only: i32,
    pub enabled: i32,
}

/// What the send-back half of `ep_combine` reads (device addresses; 0 for absent ones).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CombineSend {
    pub y: u64,
    pub weights: u64,
    pub row_weights: u64,
    pub unit_weights: bool,
    pub recv_base: u64,
    pub row_src: u64,
    pub row_slots: u64,
    pub exp_rows: u64,
    pub side: u64,
    pub side_mode: i32,
    pub offsets: u64,
    pub rows_given: i32,
}

/// What the reduce half of `ep_combine` (and `ep_combine_reduce`) reads and writes.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CombineReduce {
    pub back: u64,
    pub back_side: u64,
    pub pos: u64,
    pub num_tokens: i32,
    pub out: u64,
    pub out_side: u64,
}

impl CombineReduce {
    /// These fields as kernel arguments, in the order `ep_combine` and `ep_combine_reduce` take
    /// them.
    fn args(&self) -> [Arg; 6] {
        [
            Arg::Ptr(self.back),
            Arg::Ptr(self.back_side),
            Arg::Ptr(self.pos),
            Arg::Int(self.num_tokens),
            Arg::Ptr(self.out),
            Arg::Ptr(self.out_side),
        ]
    }
}

/// One kernel argument, stored by value until the launch copies it.
enum Arg {
    Ptr(u64),
    U64(u64),
    Int(i32),
    Peers(Box<EpPeers>),
    Dims(EpDims),
    Expand(EpExpand),
    TokenLayout(EpTokenLayout),
}

impl Arg {
    fn param(&mut self) -> *mut c_void {
        match self {
            Arg::Ptr(v) | Arg::U64(v) => v as *mut u64 as *mut c_void,
            Arg::Int(v) => v as *mut i32 as *mut c_void,
            Arg::Peers(p) => &mut **p as *mut EpPeers as *mut c_void,
            Arg::Dims(d) => d as *mut EpDims as *mut c_void,
            Arg::Expand(e) => e as *mut EpExpand as *mut c_void,
            Arg::TokenLayout(t) => t as *mut EpTokenLayout as *mut c_void,
        }
    }
}

/// 0 for an absent optional buffer: the kernels read a null pointer as "not given".
pub(crate) fn ptr_or_null(p: Option<u64>) -> u64 {
    p.unwrap_or(0)
}

/// The element type a templated kernel is instantiated for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Elem {
    Bf16,
    F16,
    F32,
}

const ELEMS: [(Elem, &str); 3] = [(Elem::Bf16, "bf16"), (Elem::F16, "f16"), (Elem::F32, "f32")];

struct Typed {
    combine: CudaFunction,
    combine_reduce: CudaFunction,
    combine_backward_expert: CudaFunction,
}

/// The loaded kernels of one device.
pub(crate) struct Kernels {
    _module: Arc<CudaModule>,
    route_notify: CudaFunction,
    dispatch_send: CudaFunction,
    barrier: CudaFunction,
    hold: CudaFunction,
    typed: Vec<(Elem, Typed)>,
    /// Dynamic shared memory `ep_combine_*` may take for its expert-major gather rings.
    ring_bytes: u32,
    /// Dynamic shared memory `ep_dispatch_send` may take for its laying-out warps' bulk copies.
    layout_shared_bytes: u32,
    /// How the data kernels start (ep_hold always starts after the kernel ahead).
    start: Start,
}

/// The most dynamic shared memory the gather rings of `ep_combine_*` take per block: 16 vectors
/// per lane for the expert-major default of 24 sending warps. 128 KiB (10 vectors) left fewer
/// loads in flight: the world-2 T = 4096 combine took 691 us instead of 623 (docs/perf-notes.md,
/// v13).
const RING_BYTES: u32 = 16 * 24 * RING_BYTES_PER_VEC;
/// Vectors per lane in a gather ring, at most: enough loads in flight for each sent row, which
/// gathers about 2 rows here.
const RING_VECS_MAX: u32 = 16;
/// Bytes of a ring per vector slot: 32 lanes of 16 bytes.
const RING_BYTES_PER_VEC: u32 = 32 * 16;
/// Bulk-copy stages of a laying-out warp of `ep_dispatch_send`, and the bytes before them (their
/// mbarriers), as in moe_ep.cu (kBulkStages, kBulkHeader).
const LAYOUT_STAGES: u32 = 4;
const LAYOUT_HEADER: u32 = 128;
/// Shared memory per laying-out warp of `ep_dispatch_send` for bulk copies, at most:
/// MOE_EP_LAYOUT_STAGE_BYTES when set, else 0 (the rows go through registers). Bulk copies are
/// opt-in, for measurement: 2% faster at T = 4096, and a run with 4 ranks on one GPU hung with
/// them (docs/perf-notes.md, v5).
fn layout_stage_bytes_max() -> u32 {
    static BYTES: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *BYTES.get_or_init(|| bytes_from_env("MOE_EP_LAYOUT_STAGE_BYTES").unwrap_or(0))
}

/// The gather rings' shared memory per block, at most: MOE_EP_COMBINE_RING_BYTES when set (for
/// measuring), else RING_BYTES. Read once per [`Kernels::load`].
fn ring_bytes_max() -> u32 {
    bytes_from_env("MOE_EP_COMBINE_RING_BYTES").unwrap_or(RING_BYTES)
}

/// A byte count from the environment variable `name`, if set to one.
fn bytes_from_env(name: &str) -> Option<u32> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Whether the data kernels start overlapping the kernel ahead of them ([`Start`]): yes, unless
/// MOE_EP_OVERLAP_LAUNCHES is 0 (for measuring what the overlap gains).
fn overlap_launches_from_env() -> bool {
    static OVERLAP: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OVERLAP.get_or_init(|| std::env::var("MOE_EP_OVERLAP_LAUNCHES").map_or(true, |v| v != "0"))
}

/// Shared memory the kernels keep for their static variables, below the opt-in limit.
const STATIC_SHARED_RESERVE: u32 = 16 * 1024;

const PLAIN: [&str; 4] = [
    "ep_route_notify",
    "ep_dispatch_send",
    "ep_barrier",
    "ep_hold",
];

/// Grid and block of a launch (1-D).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Grid {
    pub blocks: u32,
    pub threads: u32,
}

/// How a kernel may start relative to the kernel ahead of it in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// Once the kernel ahead finished (plain stream order).
    AfterPrior,
    /// Scheduled as soon as every block of the kernel ahead let it (programmatic dependent
    /// launch); the kernel itself then waits for the one ahead to complete before it touches
    /// memory (follow_prior_grids in moe_ep.cu), so only its launch overlaps.
    OverlappingPrior,
}

/// Launches `f` on `stream` with `shared_bytes` of dynamic shared memory per block (within what
/// the function was allowed at load).
fn launch_with(
    stream: &Stream,
    f: &CudaFunction,
    grid: Grid,
    shared_bytes: u32,
    start: Start,
    mut args: Vec<Arg>,
    name: &str,
) -> Result<(), String> {
    if grid.blocks == 0 {
        return Ok(());
    }
    let mut params: Vec<*mut c_void> = args.iter_mut().map(Arg::param).collect();
    let mut value = sys::CUlaunchAttributeValue { pad: [0; 64] };
    value.programmaticStreamSerializationAllowed = 1;
    let mut overlap = sys::CUlaunchAttribute {
        id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
        pad: [0; 4],
        value,
    };
    let config = sys::CUlaunchConfig {
        gridDimX: grid.blocks,
        gridDimY: 1,
        gridDimZ: 1,
        blockDimX: grid.threads,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: shared_bytes,
        hStream: stream.raw(),
        attrs: &mut overlap,
        numAttrs: u32::from(start == Start::OverlappingPrior),
    };
    // SAFETY: every caller below passes exactly the kernel's parameters, in order and with the
    // kernel's types (device addresses as u64, ints as i32, the structs mirrored from
    // moe_ep.h), and addresses of buffers sized as the kernel's comment states that stay alive
    // until the stream has run the kernel (they are owned by the dispatcher, the handle or the
    // caller's tensors). `args` and `overlap` outlive the call, which copies the parameters and
    // the attributes. A kernel launched OverlappingPrior waits for the grids ahead of it before
    // it touches memory (follow_prior_grids), so it sees what stream order would give it.
    unsafe {
        sys::cuLaunchKernelEx(
            &config,
            f.cu_function(),
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    }
    .result()
    .map_err(|e| describe(&format!("launching {name}"), e))
}

impl Kernels {
    pub(crate) fn load(ctx: &Arc<CudaContext>, fatbin: &[u8]) -> Result<Self, String> {
        let mut names: Vec<String> = PLAIN.iter().map(|s| s.to_string()).collect();
        for (_, suffix) in ELEMS {
            for base in [
                "ep_combine",
                "ep_combine_reduce",
                "ep_combine_backward_expert",
            ] {
                names.push(format!("{base}_{suffix}"));
            }
        }
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let (module, mut f) = super::cuda_memory::load_kernels(ctx, fatbin, &refs)?;
        // What the device lets a block opt into, less room for the kernels' static variables.
        let opt_in = ctx
            .attribute(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .map_err(|e| describe("reading the shared memory limit", e))?;
        let dynamic_limit = u32::try_from(opt_in)
            .unwrap_or(0)
            .saturating_sub(STATIC_SHARED_RESERVE);
        let ring_bytes = ring_bytes_max().min(dynamic_limit);
        let layout_shared_bytes = dynamic_limit;
        let mut typed_fns = f.split_off(PLAIN.len()).into_iter();
        let mut plain = f.into_iter();
        let mut next = || plain.next().expect("one function per name");
        let (route_notify, dispatch_send) = (next(), next());
        dispatch_send
            .set_attribute(
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                layout_shared_bytes as i32,
            )
            .map_err(|e| describe("allowing ep_dispatch_send its shared memory", e))?;
        let (barrier, hold) = (next(), next());
        let typed = ELEMS
            .iter()
            .map(|&(elem, _)| {
                let mut take = || typed_fns.next().expect("three functions per element type");
                let (combine, combine_reduce, combine_backward_expert) = (take(), take(), take());
                combine
                    .set_attribute(
                        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        ring_bytes as i32,
                    )
                    .map_err(|e| describe("allowing ep_combine its shared memory", e))?;
                Ok((
                    elem,
                    Typed {
                        combine,
                        combine_reduce,
                        combine_backward_expert,
                    },
                ))
            })
            .collect::<Result<_, String>>()?;
        Ok(Kernels {
            _module: module,
            route_notify,
            dispatch_send,
            barrier,
            hold,
            typed,
            ring_bytes,
            layout_shared_bytes,
            start: match overlap_launches_from_env() {
                true => Start::OverlappingPrior,
                false => Start::AfterPrior,
            },
        })
    }

    /// Starts every kernel after the one ahead of it, for ranks that share a GPU: each rank's
    /// next kernel would hold SMs that the other ranks' current kernels may still need.
    pub(crate) fn without_overlapping_launches(mut self) -> Self {
        self.start = Start::AfterPrior;
        self
    }

    /// [`launch_with`] for the data kernels, started as `self.start` says.
    fn launch(
        &self,
        stream: &Stream,
        f: &CudaFunction,
        grid: Grid,
        shared_bytes: u32,
        args: Vec<Arg>,
        name: &str,
    ) -> Result<(), String> {
        launch_with(stream, f, grid, shared_bytes, self.start, args, name)
    }

    /// Keeps `ep_dispatch_send`'s layout off bulk copies (for ranks that share a GPU).
    pub(crate) fn without_bulk_layout(mut self) -> Self {
        self.layout_shared_bytes = 0;
        self
    }

    fn typed(&self, elem: Elem) -> &Typed {
        &self
            .typed
            .iter()
            .find(|(e, _)| *e == elem)
            .expect("every element type is loaded")
            .1
    }

    /// A dispatch's first kernel: routing, then the count exchange (world + 1 blocks).
    /// Expert-major (`slot_rank` given), also each slot's rank in its expert and `group_base`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn route_notify(
        &self,
        s: &Stream,
        peers: &EpPeers,
        dm: EpDims,
        topk: u64,
        idx64: bool,
        num_tokens: i32,
        expert_rank: u64,
        local_experts: u64,
        capacity: u64,
        align: i32,
        recv_slot: i32,
        pos: u64,
        slot_rank: u64,
        rank_scratch: u64,
        recv_base: u64,
        my_base_on: u64,
        out_per_src: u64,
        out_per_expert: u64,
        out_offsets: u64,
        group_base: u64,
        done: u64,
        err: u64,
    ) -> Result<(), String> {
        let grid = Grid {
            blocks: dm.world as u32 + 1,
            threads: 1024,
        };
        let args = vec![
            Arg::Peers(Box::new(*peers)),
            Arg::Dims(dm),
            Arg::Ptr(topk),
            Arg::Int(idx64 as i32),
            Arg::Int(num_tokens),
            Arg::Ptr(expert_rank),
            Arg::Ptr(local_experts),
            Arg::Ptr(capacity),
            Arg::Int(align),
            Arg::Int(recv_slot),
            Arg::Ptr(pos),
            Arg::Ptr(slot_rank),
            Arg::Ptr(rank_scratch),
            Arg::Ptr(recv_base),
            Arg::Ptr(my_base_on),
            Arg::Ptr(out_per_src),
            Arg::Ptr(out_per_expert),
            Arg::Ptr(out_offsets),
            Arg::Ptr(group_base),
            Arg::Ptr(done),
            Arg::Ptr(err),
        ];
        self.launch(s, &self.route_notify, grid, 0, args, "ep_route_notify")
    }

    /// A barrier among the ranks, as a call of its own (`dm.begins_call`). One block.
    pub(crate) fn barrier(
        &self,
        s: &Stream,
        peers: &EpPeers,
        dm: EpDims,
        err: u64,
    ) -> Result<(), String> {
        let grid = Grid {
            blocks: 1,
            threads: 32,
        };
        let args = vec![Arg::Peers(Box::new(*peers)), Arg::Dims(dm), Arg::Ptr(err)];
        self.launch(s, &self.barrier, grid, 0, args, "ep_barrier")
    }

    /// Holds the stream until the host stores `until` or more into the host word at `gate` (a
    /// device address), or `timeout_ns` passed. One thread.
    pub(crate) fn hold(
        &self,
        s: &Stream,
        gate: u64,
        until: u64,
        timeout_ns: u64,
    ) -> Result<(), String> {
        let grid = Grid {
            blocks: 1,
            threads: 1,
        };
        let args = vec![Arg::Ptr(gate), Arg::U64(until), Arg::U64(timeout_ns)];
        // Plain order: the hold is what the kernels behind it wait for, and it waits for nothing.
        launch_with(s, &self.hold, grid, 0, Start::AfterPrior, args, "ep_hold")
    }

    /// Sends every token to its destinations; with `expand.send_warps` > 0, the other warps of
    /// each block lay the arriving rows out expert-major, through rings in shared memory; with
    /// `token_layout.enabled`, every block lays them out token-major once all are in.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn dispatch_send(
        &self,
        s: &Stream,
        grid: Grid,
        peers: &EpPeers,
        dm: EpDims,
        x: u64,
        scales: u64,
        topk: u64,
        idx64: bool,
        weights: u64,
        expert_rank: u64,
        local_index: u64,
        pos: u64,
        my_base_on: u64,
        slot_rank: u64,
        num_tokens: i32,
        payload_only: bool,
        recv_slot: i32,
        expand: EpExpand,
        token_layout: EpTokenLayout,
        done: u64,
        err: u64,
    ) -> Result<(), String> {
        // The kernel keeps at least one sending warp per block.
        let layout_warps = match expand.send_warps {
            0 => 0,
            w => grid.threads / 32 - (w as u32).min(grid.threads / 32 - 1),
        };
        // Each laying-out warp's bulk-copy stages: whole rows when they fit, in 128-byte units.
        let stage_bytes = match layout_warps {
            0 => 0,
            l => {
                let whole_rows = LAYOUT_HEADER + LAYOUT_STAGES * dm.x_row_bytes.max(0) as u32;
                let bytes = whole_rows
                    .min(self.layout_shared_bytes / l)
                    .min(layout_stage_bytes_max())
                    & !127;
                if bytes >= LAYOUT_HEADER + LAYOUT_STAGES * 16 {
                    bytes
                } else {
                    0
                }
            }
        };
        let args = vec![
            Arg::Peers(Box::new(*peers)),
            Arg::Dims(dm),
            Arg::Ptr(x),
            Arg::Ptr(scales),
            Arg::Ptr(topk),
            Arg::Int(idx64 as i32),
            Arg::Ptr(weights),
            Arg::Ptr(expert_rank),
            Arg::Ptr(local_index),
            Arg::Ptr(pos),
            Arg::Ptr(my_base_on),
            Arg::Ptr(slot_rank),
            Arg::Int(num_tokens),
            Arg::Int(payload_only as i32),
            Arg::Int(recv_slot),
            Arg::Expand(expand),
            Arg::Int(stage_bytes as i32),
            Arg::TokenLayout(token_layout),
            Arg::Ptr(done),
            Arg::Ptr(err),
        ];
        let shared = layout_warps * stage_bytes;
        self.launch(
            s,
            &self.dispatch_send,
            grid,
            shared,
            args,
            "ep_dispatch_send",
        )
    }

    /// The combine-direction call in one kernel: send back, and reduce each chunk of tokens as
    /// it completes (`send_warps` of each block's 32 warps send). `skip_entry`: the call does not
    /// wait for every rank to enter it (see `ep_combine`: only right after a barrier or a
    /// token-major dispatch-direction call).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn combine(
        &self,
        s: &Stream,
        elem: Elem,
        grid: Grid,
        peers: &EpPeers,
        dm: EpDims,
        send: &CombineSend,
        reduce: &CombineReduce,
        skip_entry: bool,
        send_warps: i32,
        done: u64,
        err: u64,
    ) -> Result<(), String> {
        // Expert-major sending warps gather through rings in shared memory (ep_combine).
        let ring_vecs = match send.exp_rows {
            0 => 0,
            _ => RING_VECS_MAX.min(self.ring_bytes / (send_warps as u32 * RING_BYTES_PER_VEC)),
        };
        let sends = [
            Arg::Peers(Box::new(*peers)),
            Arg::Dims(dm),
            Arg::Ptr(send.y),
            Arg::Ptr(send.weights),
            Arg::Ptr(send.row_weights),
            Arg::Int(send.unit_weights as i32),
            Arg::Ptr(send.recv_base),
            Arg::Ptr(send.row_src),
            Arg::Ptr(send.row_slots),
            Arg::Ptr(send.exp_rows),
            Arg::Ptr(send.side),
            Arg::Int(send.side_mode),
            Arg::Ptr(send.offsets),
            Arg::Int(send.rows_given),
        ];
        let rest = [
            Arg::Int(skip_entry as i32),
            Arg::Int(send_warps),
            Arg::Int(ring_vecs as i32),
            Arg::Ptr(done),
            Arg::Ptr(err),
        ];
        let args = sends.into_iter().chain(reduce.args()).chain(rest).collect();
        let shared = send_warps as u32 * ring_vecs * RING_BYTES_PER_VEC;
        let f = &self.typed(elem).combine;
        self.launch(s, f, grid, shared, args, "ep_combine")
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn combine_reduce(
        &self,
        s: &Stream,
        elem: Elem,
        grid: Grid,
        dm: EpDims,
        reduce: &CombineReduce,
        sig: i32,
        err: u64,
    ) -> Result<(), String> {
        let args = [Arg::Dims(dm)]
            .into_iter()
            .chain(reduce.args())
            .chain([Arg::Int(sig), Arg::Ptr(err)])
            .collect();
        self.launch(
            s,
            &self.typed(elem).combine_reduce,
            grid,
            0,
            args,
            "ep_combine_reduce",
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn combine_backward_expert(
        &self,
        s: &Stream,
        elem: Elem,
        grid: Grid,
        peers: &EpPeers,
        dm: EpDims,
        stage_g: u64,
        y: u64,
        row_weights: u64,
        recv_base: u64,
        row_src: u64,
        exp_rows: u64,
        offsets: u64,
        rows_given: i32,
        grad_y: u64,
        done: u64,
        err: u64,
    ) -> Result<(), String> {
        let args = vec![
            Arg::Peers(Box::new(*peers)),
            Arg::Dims(dm),
            Arg::Ptr(stage_g),
            Arg::Ptr(y),
            Arg::Ptr(row_weights),
            Arg::Ptr(recv_base),
            Arg::Ptr(row_src),
            Arg::Ptr(exp_rows),
            Arg::Ptr(offsets),
            Arg::Int(rows_given),
            Arg::Ptr(grad_y),
            Arg::Ptr(done),
            Arg::Ptr(err),
        ];
        self.launch(
            s,
            &self.typed(elem).combine_backward_expert,
            grid,
            0,
            args,
            "ep_combine_backward_expert",
        )
    }
}
