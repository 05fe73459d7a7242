//! NCCL (libnccl, loaded at run time through cudarc's `result`/`sys` layers) for the benchmark
//! baselines: one communicator per rank, grouped point-to-point transfers (an all-to-all with
//! host-side splits), all-gathers and a reduce-scatter, each queued on a stream of the
//! communicator's device.
//!
//! The transfer functions are crate-internal and take device addresses: the callers
//! (`crate::baseline`) pass buffers of at least the stated bytes on the communicator's device that
//! stay allocated until the stream has run the operation (their own stream-ordered buffers, freed
//! on that stream after it, or the caller's tensors, borrowed for the call and read on the stream
//! before the call returns its outputs).

use super::cuda_memory::describe as describe_driver;
use super::cuda_stream::Stream;
use cudarc::driver::CudaContext;
use cudarc::nccl::{result, sys};
use std::ffi::{c_void, CStr};
use std::sync::Arc;

/// Bytes of an `ncclUniqueId`.
pub(crate) const UNIQUE_ID_BYTES: usize = 128;

/// Whether libnccl can be loaded. cudarc panics on first use of a missing library, so every NCCL
/// call below is guarded by this.
pub(crate) fn library_present() -> bool {
    // SAFETY: this only tries `dlopen` on NCCL's library names.
    unsafe { sys::is_culib_present() }
}

/// NCCL's version as major.minor.patch, for messages.
pub(crate) fn version() -> Result<String, String> {
    let v = result::get_nccl_version().map_err(|e| describe("ncclGetVersion", e.0, None))?;
    Ok(format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100))
}

fn describe(what: &str, code: sys::ncclResult_t, comm: Option<sys::ncclComm_t>) -> String {
    // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any result code.
    let text = unsafe { CStr::from_ptr(sys::ncclGetErrorString(code)) }
        .to_string_lossy()
        .into_owned();
    let last = comm
        // SAFETY: `c` is a live communicator; the returned string is NUL-terminated and owned by
        // NCCL until its next call on this thread.
        .map(|c| {
            unsafe { CStr::from_ptr(sys::ncclGetLastError(c)) }
                .to_string_lossy()
                .into_owned()
        })
        .filter(|s| !s.is_empty());
    match last {
        Some(last) => format!("{what}: {code:?} ({text}: {last})"),
        None => format!("{what}: {code:?} ({text})"),
    }
}

/// A new unique id for rank 0 to hand to every rank (`ncclGetUniqueId`).
pub(crate) fn unique_id() -> Result<[u8; UNIQUE_ID_BYTES], String> {
    let id = result::get_uniqueid().map_err(|e| describe("ncclGetUniqueId", e.0, None))?;
    Ok(id.internal.map(|c| c as u8))
}

/// Element types of the reduce-scatter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReduceType {
    Bf16,
    F16,
    F32,
}

/// One grouped point-to-point transfer: `bytes` bytes at device address `ptr`, to or from `peer`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Transfer {
    pub peer: usize,
    pub ptr: u64,
    pub bytes: usize,
}

/// An NCCL communicator of one rank, on the device of `ctx`. Destroyed when dropped.
pub(crate) struct Comm {
    /// The `ncclComm_t`, kept as an integer so the type is `Send` (it is a library handle, used
    /// by one thread at a time: the owner takes `&mut self` or `&self` from its rank's thread).
    raw: usize,
    ctx: Arc<CudaContext>,
}

impl Comm {
    /// Joins the communicator `id` as `rank` of `world` (`ncclCommInitRank`): blocks until every
    /// rank joined. `id` must come from [`unique_id`] on one rank, the same bytes on every rank.
    pub(crate) fn init(
        ctx: &Arc<CudaContext>,
        world: usize,
        rank: usize,
        id: &[u8; UNIQUE_ID_BYTES],
    ) -> Result<Self, String> {
        // NCCL takes the device from the thread's current context.
        ctx.bind_to_thread()
            .map_err(|e| describe_driver("binding the context", e))?;
        let id = sys::ncclUniqueId {
            internal: id.map(|b| b as std::ffi::c_char),
        };
        let mut comm = std::ptr::null_mut();
        // SAFETY: `comm` is a valid place for the handle; `id` is a unique id shared by all ranks
        // (the caller's contract); world and rank fit in i32 (world <= the dispatcher's world).
        unsafe { result::comm_init_rank(&mut comm, world as i32, id, rank as i32) }
            .map_err(|e| describe("ncclCommInitRank", e.0, None))?;
        Ok(Comm {
            raw: comm as usize,
            ctx: ctx.clone(),
        })
    }

    fn raw(&self) -> sys::ncclComm_t {
        self.raw as sys::ncclComm_t
    }

    fn check(
        &self,
        what: &str,
        r: Result<result::NcclStatus, result::NcclError>,
    ) -> Result<(), String> {
        r.map(|_| ())
            .map_err(|e| describe(what, e.0, Some(self.raw())))
    }

    /// Runs `enqueue` between `ncclGroupStart` and `ncclGroupEnd`, so the operations it queues
    /// progress together (an all-to-all out of sends and receives, or several all-gathers).
    fn group(&self, enqueue: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| describe_driver("binding the context", e))?;
        self.check("ncclGroupStart", result::group_start())?;
        let queued = enqueue();
        // The group is closed even when queuing failed, so this thread's NCCL state stays usable.
        let ended = self.check("ncclGroupEnd", result::group_end());
        queued.and(ended)
    }

    /// Grouped `ncclSend`s and `ncclRecv`s of bytes on `stream`. Every peer's matching call
    /// must name the same byte counts; zero-byte transfers are skipped (both sides know them).
    pub(crate) fn send_recv(
        &self,
        stream: &Stream,
        sends: &[Transfer],
        recvs: &[Transfer],
    ) -> Result<(), String> {
        let s = stream.raw() as sys::cudaStream_t;
        self.group(|| {
            for t in sends.iter().filter(|t| t.bytes > 0) {
                // SAFETY: the module's contract: `ptr` holds `bytes` bytes on this device until the
                // stream has run the send; the stream belongs to this communicator's device.
                let r = unsafe {
                    result::send(
                        t.ptr as *const c_void,
                        t.bytes,
                        sys::ncclDataType_t::ncclUint8,
                        t.peer as i32,
                        self.raw(),
                        s,
                    )
                };
                self.check("ncclSend", r)?;
            }
            for t in recvs.iter().filter(|t| t.bytes > 0) {
                // SAFETY: as for the sends; `ptr` is writable for `bytes` bytes.
                let r = unsafe {
                    result::recv(
                        t.ptr as *mut c_void,
                        t.bytes,
                        sys::ncclDataType_t::ncclUint8,
                        t.peer as i32,
                        self.raw(),
                        s,
                    )
                };
                self.check("ncclRecv", r)?;
            }
            Ok(())
        })
    }

    /// Grouped `ncclAllGather`s of bytes: each `(send, recv, bytes)` gathers `bytes` bytes from
    /// every rank into `recv` (`world * bytes` bytes, rank order). Every rank passes the same counts.
    pub(crate) fn all_gather(
        &self,
        stream: &Stream,
        parts: &[(u64, u64, usize)],
    ) -> Result<(), String> {
        let s = stream.raw() as sys::cudaStream_t;
        self.group(|| {
            for &(send, recv, bytes) in parts.iter().filter(|p| p.2 > 0) {
                // SAFETY: the module's contract: `send` holds `bytes` bytes and `recv` `world *
                // bytes` bytes on this device until the stream has run the operation.
                let r = unsafe {
                    result::all_gather(
                        send as *const c_void,
                        recv as *mut c_void,
                        bytes,
                        sys::ncclDataType_t::ncclUint8,
                        self.raw(),
                        s,
                    )
                };
                self.check("ncclAllGather", r)?;
            }
            Ok(())
        })
    }

    /// `ncclReduceScatter` with a sum: `send` holds `world * count` elements, `recv` gets this
    /// rank's `count` (the sum over ranks of their block number `rank`). Every rank passes the
    /// same count.
    pub(crate) fn reduce_scatter(
        &self,
        stream: &Stream,
        send: u64,
        recv: u64,
        count: usize,
        elem: ReduceType,
    ) -> Result<(), String> {
        if count == 0 {
            return Ok(());
        }
        self.ctx
            .bind_to_thread()
            .map_err(|e| describe_driver("binding the context", e))?;
        let dtype = match elem {
            ReduceType::Bf16 => sys::ncclDataType_t::ncclBfloat16,
            ReduceType::F16 => sys::ncclDataType_t::ncclFloat16,
            ReduceType::F32 => sys::ncclDataType_t::ncclFloat32,
        };
        // SAFETY: the module's contract: `send` holds `world * count` and `recv` `count`
        // elements of `elem` on this device until the stream has run the operation.
        let r = unsafe {
            result::reduce_scatter(
                send as *const c_void,
                recv as *mut c_void,
                count,
                dtype,
                sys::ncclRedOp_t::ncclSum,
                self.raw(),
                stream.raw() as sys::cudaStream_t,
            )
        };
        self.check("ncclReduceScatter", r)
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: the communicator is ours and destroyed once, here; its owner waited for the
            // stream its operations ran on before dropping it.
            let _ = unsafe { result::comm_destroy(self.raw()) };
        }
    }
}
