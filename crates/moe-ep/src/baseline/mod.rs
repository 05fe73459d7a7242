//! Benchmark baselines, not for production: what `moe-ep bench` compares the dispatcher against,
//! on the same GPUs and the same inputs. They run on the CUDA backend only; built from a CPU
//! dispatcher they return [`EpError::BackendUnavailable`] saying why.
//!
//! - [`NcclBaselines`], two paths over one NCCL communicator (cudarc's NCCL, the system libnccl):
//!   - **the NCCL all-to-all path**, what Megatron-LM's all-to-all token dispatcher does: permute
//!     one row per (token, expert) sorted by destination rank (then expert, token, slot), an
//!     all-to-all of the per-rank row counts, a copy of those counts to the host (Megatron's
//!     host-side splits), then `all_to_all_single` as grouped `ncclSend`/`ncclRecv`. Combine is the
//!     reverse all-to-all and the weighted un-permute, `out[t] = sum over k of w[t, k] * y(t, k)`.
//!   - **the all-gather-then-select path**, the naive baseline of Iris' benchmark: every rank
//!     all-gathers every rank's `x`, `topk_idx` and weights (`ncclAllGather`), then selects locally
//!     one row per slot whose expert it owns. Combine: each rank computes, for every token of every
//!     rank, the weighted partial sum of its experts' rows (zero where it has none), and
//!     `ncclReduceScatter` sums the partials back onto each token's rank.
//! - [`Ceiling`]: the copy engines moving the bytes the dispatcher's wire rule moves (one row per
//!   (token, destination rank)) from every rank to every peer at once: the all-to-all ceiling.
//!
//! Everything a path needs per call is inside the call, given `x`, `topk_idx` and the weights in
//! device memory: the routing-derived index computation (a stable counting sort on the device),
//! the count exchange, the transfers and the (un)permutation. Both NCCL paths copy a few counts to
//! the host inside dispatch, as the frameworks they imitate do (the all-to-all's splits, the
//! all-gather path's output size). Rows carry `x` only (no fp8 scales). Their exact layouts and
//! results are in [`reference`], which also checks a path's outputs.

mod ceiling;
pub mod reference;

pub use ceiling::Ceiling;

use crate::dispatcher::Dispatcher;
use crate::dtype::DType;
use crate::error::{EpError, Result};
use crate::ffi::baseline_kernels::{num_chunks, BaselineKernels, SumType, MAX_SHARED_BYTES};
use crate::ffi::cuda_event::primary_context;
use crate::ffi::cuda_memory::describe;
use crate::ffi::cuda_stream::Stream;
use crate::ffi::device_buffer::{device_buffer, device_buffer_from_host, DeviceBuffer};
use crate::ffi::nccl::{self, Comm, ReduceType, Transfer, UNIQUE_ID_BYTES};
use crate::placement::Placement;
use crate::tensor::{Device, Tensor, TensorRef};
use crate::timer::{Timed, Timer};
use crate::validate;
use cudarc::driver::CudaContext;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn device_error(reason: String) -> EpError {
    EpError::BackendUnavailable {
        backend: "cuda",
        reason,
    }
}

fn nccl_error(reason: String) -> EpError {
    EpError::BackendUnavailable {
        backend: "nccl",
        reason,
    }
}

/// Why baselines cannot run on a dispatcher of the CPU backend.
pub(crate) fn cpu_reason() -> String {
    "the cpu backend runs its ranks on the host; the baselines (NCCL paths, copy-engine ceiling) \
     need the cuda backend"
        .into()
}

/// Rows of device memory a baseline returned: `[rows, cols]` of `dtype`.
pub struct DeviceTensor {
    buf: DeviceBuffer,
    dims: [usize; 2],
    dtype: DType,
}

impl DeviceTensor {
    pub fn dims(&self) -> &[usize] {
        &self.dims
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// A view to pass on (e.g. as a combine's `y`).
    pub fn view(&self) -> TensorRef<'_> {
        self.buf
            .view(&self.dims, self.dtype)
            .expect("a two-dimensional shape")
    }

    /// A host copy (waits for the work queued on the baseline's stream).
    pub fn to_host(&self) -> Result<Tensor> {
        let mut t = Tensor::zeros(&self.dims, self.dtype)?;
        self.buf.read(t.host_bytes_mut()).map_err(device_error)?;
        Ok(t)
    }
}

impl std::fmt::Debug for DeviceTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceTensor([{}, {}] {} on cuda:{})",
            self.dims[0],
            self.dims[1],
            self.dtype,
            self.buf.ordinal()
        )
    }
}

/// The NCCL all-to-all path's dispatch on one rank: the received rows and what combine needs.
pub struct AllToAllDispatch {
    /// `[rows received, H]`: by source rank, then each source's send order (expert's rank, local
    /// expert, token, slot); see [`reference::alltoall_received`].
    pub x: DeviceTensor,
    /// Rows this rank sent to each rank (one per slot with an expert there).
    pub send_counts: Vec<usize>,
    /// Rows this rank received from each rank.
    pub recv_counts: Vec<usize>,
    /// i32 `[T * K]`: each slot's row in the send order, -1 for a slot without an expert.
    slot_row: DeviceBuffer,
    num_tokens: usize,
    owner: u64,
}

impl AllToAllDispatch {
    pub fn num_tokens(&self) -> usize {
        self.num_tokens
    }
}

/// Every rank's agreement on the token count of the all-gather path (NCCL's all-gather moves the
/// same count from every rank): [`NcclBaselines::allgather_shape`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllGatherShape {
    num_tokens: usize,
    owner: u64,
}

impl AllGatherShape {
    pub fn num_tokens(&self) -> usize {
        self.num_tokens
    }
}

/// The all-gather path's dispatch on one rank.
pub struct AllGatherDispatch {
    /// `[rows selected, H]`: by local expert, then source rank, token, slot; see
    /// [`reference::allgather_selected`].
    pub x: DeviceTensor,
    /// i32 `[world * T * K]`: each gathered slot's row in `x`, -1 where this rank owns no expert.
    slot_row: DeviceBuffer,
    /// f32 `[world * T * K]`: every rank's weights.
    weights: DeviceBuffer,
    num_tokens: usize,
    owner: u64,
}

/// The two NCCL baselines of one rank, over one communicator and one stream of their own.
pub struct NcclBaselines {
    id: u64,
    rank: usize,
    world: usize,
    ordinal: u32,
    hidden: usize,
    topk: usize,
    num_experts: usize,
    dtype: DType,
    combine_dtype: DType,
    placement: Placement,
    version: String,
    // Field order is drop order: the communicator goes before the stream its work ran on.
    comm: Comm,
    kernels: BaselineKernels,
    /// i32 `[E]`: the all-to-all's bucket of each expert (rank-major: its rank's first bucket
    /// plus its local index), and `[world + 1]`: the first bucket of each rank.
    a2a_buckets: DeviceBuffer,
    a2a_groups: DeviceBuffer,
    /// i32 `[E]`: the all-gather path's bucket of each expert, its local index when this rank owns
    /// it, else -1; and `[2]` = [0, E_local], the one group.
    ag_buckets: DeviceBuffer,
    ag_groups: DeviceBuffer,
    stream: Stream,
    /// Keeps the device's primary context alive as long as the baselines.
    _ctx: Arc<CudaContext>,
}

/// What a rank tells the others when the baselines are built: its device, or why it cannot.
fn readiness(ep: &Dispatcher) -> std::result::Result<u32, String> {
    let Device::Cuda(ordinal) = ep.device() else {
        return Err(cpu_reason());
    };
    if moe_ep_kernels::FATBIN.is_none() {
        return Err(format!(
            "moe-ep was built without CUDA kernels: {}",
            moe_ep_kernels::NOT_BUILT
        ));
    }
    if !nccl::library_present() {
        return Err(
            "libnccl could not be loaded (install NCCL where the loader finds libnccl.so)".into(),
        );
    }
    Ok(ordinal)
}

fn i32_table(stream: &Stream, values: impl IntoIterator<Item = i64>) -> Result<DeviceBuffer> {
    let bytes: Vec<u8> = values
        .into_iter()
        .flat_map(|v| (v as i32).to_le_bytes())
        .collect();
    device_buffer_from_host(stream, &bytes).map_err(device_error)
}

impl NcclBaselines {
    /// Builds this rank's baselines. Collective: every rank of `ep`'s group calls it, in the same
    /// order relative to the group's other host collectives. Every rank returns the same error
    /// when one of them cannot run them (CPU backend, no libnccl, ranks sharing a GPU, which NCCL
    /// refuses); rank 0's NCCL unique id reaches the others through
    /// [`Dispatcher::all_gather_host`].
    pub fn new(ep: &mut Dispatcher) -> Result<NcclBaselines> {
        let (rank, world) = (ep.rank(), ep.world());
        if ep.device() == Device::Host {
            // Every rank of a group has the same backend: all of them stop here.
            return Err(nccl_error(cpu_reason()));
        }
        // The counting sort keeps one int per expert in shared memory (every rank has the same
        // config, so all of them stop here).
        let e = ep.config().num_experts();
        if e * 4 > MAX_SHARED_BYTES {
            return Err(EpError::InvalidConfig {
                field: "num_experts",
                expected: format!(
                    "at most {} for the baselines' counting sort",
                    MAX_SHARED_BYTES / 4
                ),
                actual: e.to_string(),
            });
        }
        // What every rank needs before the communicator, so a rank that cannot go on says so to
        // the others instead of leaving them waiting inside NCCL.
        let prepared = readiness(ep).and_then(|ordinal| {
            let ctx = primary_context(ordinal)?;
            // The baselines' buffers come from the device's default pool: keep what they free
            // there, as the library's pool does, so no timed call maps memory anew.
            crate::ffi::cuda_memory::keep_pool_memory(&ctx)?;
            let stream = Stream::owned(
                ctx.new_stream()
                    .map_err(|e| describe("creating a stream", e))?,
            );
            let fatbin = moe_ep_kernels::FATBIN.expect("checked by readiness");
            let kernels = BaselineKernels::load(&ctx, fatbin)?;
            let version = nccl::version()?;
            Ok((ordinal, ctx, stream, kernels, version))
        });
        let post = match &prepared {
            Ok((ordinal, ..)) => format!("ok {ordinal}"),
            Err(why) => format!("no {why}"),
        };
        let all = ep.all_gather_host(post.into_bytes())?;
        let mut owner_of: Vec<Option<usize>> = Vec::new();
        for (r, post) in all.iter().enumerate() {
            let post = String::from_utf8_lossy(post);
            match post.split_once(' ') {
                Some(("ok", o)) => {
                    let o: usize = o.parse().expect("every rank runs this code");
                    if owner_of.len() <= o {
                        owner_of.resize(o + 1, None);
                    }
                    if let Some(first) = owner_of[o] {
                        return Err(nccl_error(format!(
                            "ranks {first} and {r} share cuda:{o}; NCCL needs one GPU per rank"
                        )));
                    }
                    owner_of[o] = Some(r);
                }
                Some((_, why)) => return Err(nccl_error(format!("rank {r}: {why}"))),
                None => unreachable!("every rank posts a word and a value"),
            }
        }
        let (ordinal, ctx, stream, kernels, version) = prepared.expect("this rank posted ok");
        // Rank 0's unique id for everyone (empty when it could not make one).
        let id_post = if rank == 0 {
            nccl::unique_id().map(|id| id.to_vec()).unwrap_or_default()
        } else {
            Vec::new()
        };
        let ids = ep.all_gather_host(id_post)?;
        let id: [u8; UNIQUE_ID_BYTES] = ids[0].as_slice().try_into().map_err(|_| {
            nccl_error("rank 0 could not make an NCCL unique id (ncclGetUniqueId failed)".into())
        })?;
        let comm = Comm::init(&ctx, world, rank, &id).map_err(nccl_error)?;

        let config = ep.config();
        let placement = ep.placement().clone();
        let e = config.num_experts();
        let first_bucket: Vec<usize> = (0..=world)
            .map(|d| (0..d).map(|r| placement.num_local(r)).sum())
            .collect();
        let a2a_buckets = i32_table(
            &stream,
            (0..e).map(|x| (first_bucket[placement.rank_of(x)] + placement.local_index(x)) as i64),
        )?;
        let a2a_groups = i32_table(&stream, first_bucket.iter().map(|&b| b as i64))?;
        let ag_buckets = i32_table(
            &stream,
            (0..e).map(|x| match placement.rank_of(x) == rank {
                true => placement.local_index(x) as i64,
                false => -1,
            }),
        )?;
        let ag_groups = i32_table(&stream, [0, placement.num_local(rank) as i64])?;
        Ok(NcclBaselines {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            rank,
            world,
            ordinal,
            hidden: config.hidden(),
            topk: config.topk(),
            num_experts: e,
            dtype: config.dtype(),
            combine_dtype: config.combine_dtype(),
            placement,
            version,
            comm,
            kernels,
            a2a_buckets,
            a2a_groups,
            ag_buckets,
            ag_groups,
            stream,
            _ctx: ctx,
        })
    }

    /// The NCCL version the communicator runs, e.g. "2.28.3".
    pub fn nccl_version(&self) -> &str {
        &self.version
    }

    /// Starts a [`Timer`] on the baselines' stream.
    pub fn timer(&self) -> Result<Timer> {
        Timer::start(self)
    }

    /// Waits for the work queued on the baselines' stream.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(device_error)
    }

    fn dev(&self) -> Device {
        Device::Cuda(self.ordinal)
    }

    fn check<T>(&self, r: std::result::Result<T, String>) -> Result<T> {
        r.map_err(device_error)
    }

    fn buffer(&self, bytes: usize) -> Result<DeviceBuffer> {
        self.check(device_buffer(&self.stream, bytes))
    }

    fn sum_type(&self) -> (SumType, ReduceType) {
        match self.combine_dtype {
            DType::BF16 => (SumType::Bf16, ReduceType::Bf16),
            DType::F16 => (SumType::F16, ReduceType::F16),
            DType::F32 => (SumType::F32, ReduceType::F32),
            other => {
                unreachable!("{other} is not a combine dtype; the config admits bf16, f16, f32")
            }
        }
    }

    /// Checks `x [T, H]` (dispatch dtype) and `topk_idx [T, K]` (i32), both on this device; T.
    fn check_inputs(&self, x: &TensorRef<'_>, topk_idx: &TensorRef<'_>) -> Result<usize> {
        validate::device("x", x, self.dev())?;
        validate::dtype("x", x, self.dtype)?;
        let t = validate::matrix("x", x, self.hidden, "T")?;
        validate::exact(
            "topk_idx",
            topk_idx,
            DType::I32,
            t,
            Some(self.topk),
            self.dev(),
        )?;
        Ok(t)
    }

    /// The counting sort of `n` slots of `idx` by the given buckets: (slot rows, group rows).
    fn sort(
        &self,
        idx: u64,
        n: usize,
        buckets: &DeviceBuffer,
        num_buckets: usize,
        groups: &DeviceBuffer,
        num_groups: usize,
    ) -> Result<(DeviceBuffer, DeviceBuffer)> {
        let chunk_counts = self.buffer(num_chunks(n) * num_buckets * 4)?;
        let bucket_start = self.buffer((num_buckets + 1) * 4)?;
        let group_rows = self.buffer(num_groups * 4)?;
        let slot_row = self.buffer(n * 4)?;
        let r = self.kernels.bucket_sort(
            &self.stream,
            idx,
            n,
            buckets.ptr(),
            self.num_experts,
            num_buckets,
            groups.ptr(),
            num_groups,
            chunk_counts.ptr(),
            bucket_start.ptr(),
            group_rows.ptr(),
            slot_row.ptr(),
        );
        self.check(r)?;
        Ok((slot_row, group_rows))
    }

    /// The NCCL all-to-all path's dispatch (Megatron's): permute, count exchange, host-side splits,
    /// all-to-all. Collective. `x`: `[T, H]` of the dispatch dtype; `topk_idx`: `[T, K]` i32; both
    /// on this rank's GPU. T may differ between ranks.
    pub fn alltoall_dispatch(
        &mut self,
        x: TensorRef<'_>,
        topk_idx: TensorRef<'_>,
    ) -> Result<AllToAllDispatch> {
        let t = self.check_inputs(&x, &topk_idx)?;
        let (world, n) = (self.world, t * self.topk);
        let row_bytes = self.hidden * self.dtype.size();
        let num_buckets = self.num_experts;
        let (slot_row, send_rows) = self.sort(
            topk_idx.device_ptr().expect("on the device"),
            n,
            &self.a2a_buckets,
            num_buckets,
            &self.a2a_groups,
            world,
        )?;
        let send = self.buffer(n * row_bytes)?;
        let r = self.kernels.permute(
            &self.stream,
            x.device_ptr().expect("on the device"),
            row_bytes,
            slot_row.ptr(),
            n,
            self.topk,
            send.ptr(),
        );
        self.check(r)?;
        // The count exchange: each rank's rows for every rank, as an all-to-all of one i32 each.
        let recv_rows = self.buffer(world * 4)?;
        let one = |base: u64, peer: usize| Transfer {
            peer,
            ptr: base + 4 * peer as u64,
            bytes: 4,
        };
        let sends: Vec<Transfer> = (0..world).map(|d| one(send_rows.ptr(), d)).collect();
        let recvs: Vec<Transfer> = (0..world).map(|s| one(recv_rows.ptr(), s)).collect();
        let r = self.comm.send_recv(&self.stream, &sends, &recvs);
        r.map_err(nccl_error)?;
        // Host-side splits, as all_to_all_single takes them (one synchronization).
        let to_usize = |v: Vec<i32>| v.into_iter().map(|c| c as usize).collect::<Vec<_>>();
        let send_counts = to_usize(self.check(send_rows.read_i32(world))?);
        let recv_counts = to_usize(self.check(recv_rows.read_i32(world))?);
        let received: usize = recv_counts.iter().sum();
        let recv = self.buffer(received * row_bytes)?;
        let (sends, recvs) = split_transfers(
            send.ptr(),
            &send_counts,
            recv.ptr(),
            &recv_counts,
            row_bytes,
        );
        self.comm
            .send_recv(&self.stream, &sends, &recvs)
            .map_err(nccl_error)?;
        Ok(AllToAllDispatch {
            x: DeviceTensor {
                buf: recv,
                dims: [received, self.hidden],
                dtype: self.dtype,
            },
            send_counts,
            recv_counts,
            slot_row,
            num_tokens: t,
            owner: self.id,
        })
    }

    /// The NCCL all-to-all path's combine: the reverse all-to-all of the expert outputs `y`
    /// (`[at least the rows received, H]` of the combine dtype, in the dispatch's row order), then
    /// the weighted un-permute with `topk_weights` (`[T, K]` f32). Collective.
    pub fn alltoall_combine(
        &mut self,
        dispatched: &AllToAllDispatch,
        y: TensorRef<'_>,
        topk_weights: TensorRef<'_>,
    ) -> Result<DeviceTensor> {
        self.check_owner(dispatched.owner)?;
        let (t, h) = (dispatched.num_tokens, self.hidden);
        let received: usize = dispatched.recv_counts.iter().sum();
        self.check_rows_back(&y, received)?;
        validate::exact(
            "topk_weights",
            &topk_weights,
            DType::F32,
            t,
            Some(self.topk),
            self.dev(),
        )?;
        let row_bytes = h * self.combine_dtype.size();
        let sent: usize = dispatched.send_counts.iter().sum();
        let back = self.buffer(sent * row_bytes)?;
        // The reverse: the rows received from each rank go back to it, into the send order.
        let (sends, recvs) = split_transfers(
            y.device_ptr().expect("on the device"),
            &dispatched.recv_counts,
            back.ptr(),
            &dispatched.send_counts,
            row_bytes,
        );
        self.comm
            .send_recv(&self.stream, &sends, &recvs)
            .map_err(nccl_error)?;
        let out = self.buffer(t * row_bytes)?;
        let r = self.kernels.weighted_sum(
            &self.stream,
            self.sum_type().0,
            back.ptr(),
            dispatched.slot_row.ptr(),
            topk_weights.device_ptr().expect("on the device"),
            t,
            self.topk,
            h,
            out.ptr(),
        );
        self.check(r)?;
        Ok(DeviceTensor {
            buf: out,
            dims: [t, h],
            dtype: self.combine_dtype,
        })
    }

    /// Agrees with every rank on the all-gather path's token count (each passes its own; they must
    /// be equal, since NCCL's all-gather moves the same count from every rank). Collective, on the
    /// host, outside any timed span: call it once per token count.
    pub fn allgather_shape(
        &mut self,
        ep: &mut Dispatcher,
        num_tokens: usize,
    ) -> Result<AllGatherShape> {
        let all = ep.all_gather_host((num_tokens as u64).to_le_bytes().to_vec())?;
        let counts: Vec<u64> = all
            .iter()
            .map(|b| u64::from_le_bytes(b.as_slice().try_into().expect("8 bytes")))
            .collect();
        if let Some(r) = counts.iter().position(|&c| c != counts[0]) {
            return Err(EpError::Shape {
                arg: "num_tokens",
                expected: format!(
                    "the same T on every rank for the all-gather path (rank 0 has {})",
                    counts[0]
                ),
                actual: format!("{} on rank {r}", counts[r]),
            });
        }
        Ok(AllGatherShape {
            num_tokens,
            owner: self.id,
        })
    }

    /// The all-gather-then-select path's dispatch: all-gather `x`, `topk_idx` and `topk_weights`
    /// from every rank, then select the rows of this rank's experts (the row count is read to the
    /// host to size the output). Collective. Shapes as [`NcclBaselines::alltoall_dispatch`], with
    /// T = `shape`'s and `topk_weights` `[T, K]` f32.
    pub fn allgather_dispatch(
        &mut self,
        shape: &AllGatherShape,
        x: TensorRef<'_>,
        topk_idx: TensorRef<'_>,
        topk_weights: TensorRef<'_>,
    ) -> Result<AllGatherDispatch> {
        self.check_owner(shape.owner)?;
        let t = self.check_inputs(&x, &topk_idx)?;
        if t != shape.num_tokens {
            return Err(EpError::Shape {
                arg: "x",
                expected: format!(
                    "[{}, {}] (T as agreed by allgather_shape)",
                    shape.num_tokens, self.hidden
                ),
                actual: x.shape().to_string(),
            });
        }
        validate::exact(
            "topk_weights",
            &topk_weights,
            DType::F32,
            t,
            Some(self.topk),
            self.dev(),
        )?;
        let (world, k) = (self.world, self.topk);
        let row_bytes = self.hidden * self.dtype.size();
        let n = world * t * k;
        let gx = self.buffer(world * t * row_bytes)?;
        let gidx = self.buffer(n * 4)?;
        let gw = self.buffer(n * 4)?;
        let ptr = |v: &TensorRef<'_>| v.device_ptr().expect("on the device");
        let parts = [
            (ptr(&x), gx.ptr(), t * row_bytes),
            (ptr(&topk_idx), gidx.ptr(), t * k * 4),
            (ptr(&topk_weights), gw.ptr(), t * k * 4),
        ];
        self.comm
            .all_gather(&self.stream, &parts)
            .map_err(nccl_error)?;
        let num_local = self.placement.num_local(self.rank);
        let (slot_row, rows) = self.sort(
            gidx.ptr(),
            n,
            &self.ag_buckets,
            num_local,
            &self.ag_groups,
            1,
        )?;
        let selected = self.check(rows.read_i32(1))?[0] as usize;
        let out = self.buffer(selected * row_bytes)?;
        let r = self.kernels.permute(
            &self.stream,
            gx.ptr(),
            row_bytes,
            slot_row.ptr(),
            n,
            k,
            out.ptr(),
        );
        self.check(r)?;
        Ok(AllGatherDispatch {
            x: DeviceTensor {
                buf: out,
                dims: [selected, self.hidden],
                dtype: self.dtype,
            },
            slot_row,
            weights: gw,
            num_tokens: t,
            owner: self.id,
        })
    }

    /// The all-gather path's combine: the weighted partial sums of this rank's expert outputs `y`
    /// (`[at least the rows selected, H]` of the combine dtype, in the dispatch's row order) for
    /// every token of every rank, then `ncclReduceScatter` (sum) back to each token's rank.
    /// Collective.
    pub fn allgather_combine(
        &mut self,
        dispatched: &AllGatherDispatch,
        y: TensorRef<'_>,
    ) -> Result<DeviceTensor> {
        self.check_owner(dispatched.owner)?;
        self.check_rows_back(&y, dispatched.x.dims[0])?;
        let (t, h) = (dispatched.num_tokens, self.hidden);
        let tokens = self.world * t;
        let elem = self.combine_dtype.size();
        let partial = self.buffer(tokens * h * elem)?;
        let (sum, reduce) = self.sum_type();
        let r = self.kernels.weighted_sum(
            &self.stream,
            sum,
            y.device_ptr().expect("on the device"),
            dispatched.slot_row.ptr(),
            dispatched.weights.ptr(),
            tokens,
            self.topk,
            h,
            partial.ptr(),
        );
        self.check(r)?;
        let out = self.buffer(t * h * elem)?;
        self.comm
            .reduce_scatter(&self.stream, partial.ptr(), out.ptr(), t * h, reduce)
            .map_err(nccl_error)?;
        Ok(DeviceTensor {
            buf: out,
            dims: [t, h],
            dtype: self.combine_dtype,
        })
    }

    fn check_owner(&self, owner: u64) -> Result<()> {
        if owner != self.id {
            return Err(EpError::ForeignHandle {
                expected: self.id,
                actual: owner,
            });
        }
        Ok(())
    }

    fn check_rows_back(&self, y: &TensorRef<'_>, rows: usize) -> Result<()> {
        validate::device("y", y, self.dev())?;
        validate::dtype("y", y, self.combine_dtype)?;
        validate::rows_at_least("y", y, rows, Some(self.hidden))
    }
}

/// The transfers of an all-to-all with splits: rows `send_counts[d]` from `send` (packed by
/// destination) to each rank d, rows `recv_counts[s]` into `recv` (packed by source) from each s.
fn split_transfers(
    send: u64,
    send_counts: &[usize],
    recv: u64,
    recv_counts: &[usize],
    row_bytes: usize,
) -> (Vec<Transfer>, Vec<Transfer>) {
    let packed = |base: u64, counts: &[usize]| -> Vec<Transfer> {
        let mut offset = 0u64;
        counts
            .iter()
            .enumerate()
            .map(|(peer, &rows)| {
                let bytes = rows * row_bytes;
                let t = Transfer {
                    peer,
                    ptr: base + offset,
                    bytes,
                };
                offset += bytes as u64;
                t
            })
            .collect()
    };
    (packed(send, send_counts), packed(recv, recv_counts))
}

impl Timed for NcclBaselines {
    fn timing_stream(&self) -> Option<(u32, u64)> {
        Some((self.ordinal, self.stream.handle()))
    }
}

impl Drop for NcclBaselines {
    fn drop(&mut self) {
        // The communicator and the tables are freed after the work queued on the stream.
        let _ = self.stream.synchronize();
    }
}

impl std::fmt::Debug for NcclBaselines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclBaselines")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("device", &self.dev())
            .field("nccl", &self.version)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_pack_rows_by_peer() {
        let (s, r) = split_transfers(1000, &[2, 0, 3], 5000, &[1, 4, 0], 10);
        let view = |v: &[Transfer]| {
            v.iter()
                .map(|t| (t.peer, t.ptr, t.bytes))
                .collect::<Vec<_>>()
        };
        assert_eq!(view(&s), vec![(0, 1000, 20), (1, 1020, 0), (2, 1020, 30)]);
        assert_eq!(view(&r), vec![(0, 5000, 10), (1, 5010, 40), (2, 5050, 0)]);
    }

    #[test]
    fn cpu_dispatchers_get_the_reason() {
        let config = crate::EpConfig::builder()
            .num_experts(4)
            .topk(2)
            .hidden(8)
            .max_tokens_per_rank(2)
            .build()
            .unwrap();
        let groups = crate::Group::cpu_world(2).unwrap();
        std::thread::scope(|s| {
            for g in groups {
                let config = config.clone();
                s.spawn(move || {
                    let mut ep = Dispatcher::new(&g, config).unwrap();
                    let err = NcclBaselines::new(&mut ep).unwrap_err();
                    assert!(
                        matches!(&err, EpError::BackendUnavailable { backend: "nccl", reason } if reason.contains("cpu backend")),
                        "{err}"
                    );
                    let err = Ceiling::new(&mut ep, &[0, 0]).unwrap_err();
                    assert!(err.to_string().contains("cpu backend"), "{err}");
                    // A timer on the CPU backend reads the host clock.
                    let timer = ep.timer().unwrap();
                    assert!(timer.stop(&ep).unwrap() < std::time::Duration::from_secs(60));
                });
            }
        });
    }
}
