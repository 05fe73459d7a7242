//! CUDA driver calls for memory, copies, peer access and modules (libcuda through cudarc's
//! `result`/`sys` layers). Every type here owns what it allocated and frees it on drop.

use super::cuda_stream::Stream;
use cudarc::driver::{result, sys, CudaContext, CudaFunction, CudaModule, DriverError};
use std::sync::Arc;

/// A driver error as text, with what was being done.
pub(crate) fn describe(what: &str, e: DriverError) -> String {
    format!("{what}: {e:?}")
}

/// Device memory with a fixed address, allocated with `cuMemAlloc`, so peers can be given its
/// address (peer access in one process; IPC export later). Used for the buffers peers write into.
pub(crate) struct SharedBuffer {
    ptr: sys::CUdeviceptr,
    bytes: usize,
    ctx: Arc<CudaContext>,
}

impl SharedBuffer {
    /// `bytes` zeroed bytes on `stream`'s device (at least 1, so every buffer has an address),
    /// zeroed before this returns. The zeroing is ordered on `stream` and waited for there: the
    /// synchronous `cuMemsetD8` returns before device memory is written, and runs on the legacy
    /// stream, which may start after a peer was given the address and wrote its first signal.
    pub(crate) fn zeroed(stream: &Stream, bytes: usize) -> Result<Self, String> {
        let ctx = stream.context();
        ctx.bind_to_thread()
            .map_err(|e| describe("binding the context", e))?;
        let bytes = bytes.max(1);
        // SAFETY: the context is current on this thread; the allocation is owned by the returned
        // value and freed once, in Drop.
        let ptr = unsafe { result::malloc_sync(bytes) }.map_err(|e| describe("cuMemAlloc", e))?;
        let buffer = SharedBuffer {
            ptr,
            bytes,
            ctx: ctx.clone(),
        };
        // SAFETY: `ptr` points to `bytes` bytes just allocated on this stream's context.
        unsafe { result::memset_d8_async(ptr, 0, bytes, stream.raw()) }
            .map_err(|e| describe("cuMemsetD8Async", e))?;
        stream.synchronize()?;
        Ok(buffer)
    }

    pub(crate) fn ptr(&self) -> u64 {
        self.ptr
    }
}

/// Bytes of a CUDA IPC memory handle.
pub(crate) const IPC_HANDLE_BYTES: usize = 64;

impl SharedBuffer {
    /// A handle another process can open to map this memory (legacy CUDA IPC: the memory came from
    /// cuMemAlloc, which it requires).
    pub(crate) fn ipc_handle(&self) -> Result<[u8; IPC_HANDLE_BYTES], String> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| describe("binding the context", e))?;
        let mut handle = std::mem::MaybeUninit::<sys::CUipcMemHandle>::uninit();
        // SAFETY: `ptr` is a live cuMemAlloc allocation of the current context; the driver fills
        // the whole handle before it is read.
        let handle = unsafe {
            sys::cuIpcGetMemHandle(handle.as_mut_ptr(), self.ptr)
                .result()
                .map_err(|e| describe("cuIpcGetMemHandle", e))?;
            handle.assume_init()
        };
        Ok(handle.reserved.map(|c| c as u8))
    }
}

/// Another process's shared buffer mapped into this one (CUDA IPC); unmapped when dropped.
pub(crate) struct PeerMapping {
    ptr: sys::CUdeviceptr,
    ctx: Arc<CudaContext>,
}

impl PeerMapping {
    pub(crate) fn open(
        ctx: &Arc<CudaContext>,
        handle: &[u8; IPC_HANDLE_BYTES],
    ) -> Result<Self, String> {
        ctx.bind_to_thread()
            .map_err(|e| describe("binding the context", e))?;
        let handle = sys::CUipcMemHandle {
            reserved: handle.map(|b| b as std::ffi::c_char),
        };
        let mut ptr = 0;
        // SAFETY: the handle was made by cuIpcGetMemHandle in a live peer process of this node;
        // the mapping is owned by the returned value and closed once, in Drop.
        unsafe {
            sys::cuIpcOpenMemHandle_v2(
                &mut ptr,
                handle,
                sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
            )
            .result()
            .map_err(|e| describe("cuIpcOpenMemHandle", e))?;
        }
        Ok(PeerMapping {
            ptr,
            ctx: ctx.clone(),
        })
    }

    pub(crate) fn ptr(&self) -> u64 {
        self.ptr
    }
}

impl Drop for PeerMapping {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: `ptr` came from cuIpcOpenMemHandle and is closed only here, after this rank's
            // last use of it (the dispatcher synchronized its stream first).
            let _ = unsafe { sys::cuIpcCloseMemHandle(self.ptr) };
        }
    }
}

impl Drop for SharedBuffer {
    fn drop(&mut self) {
        // A failure here means the context is already gone; nothing is left to free.
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: `ptr` came from cuMemAlloc on this context and is freed only here. Peers stop
            // using it before the dispatcher owning it is dropped (the last call waited for them).
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}

/// Device memory used on one stream: either its own stream-ordered allocation (from a [`Pool`],
/// freed on the same stream when dropped: the outputs and handle state of each call, which only
/// this rank touches), or a region of a [`SharedBuffer`] that something else
/// owns and this value keeps alive (an output handed out straight from where peers wrote it).
pub(crate) struct StreamBuffer {
    ptr: sys::CUdeviceptr,
    bytes: usize,
    stream: Stream,
    /// Set for a region of memory owned elsewhere: what keeps it alive; nothing is freed.
    owner: Option<Arc<dyn std::any::Any + Send + Sync>>,
}

impl StreamBuffer {
    /// `bytes` bytes of unspecified content from the library's pool, ordered on `stream`: for
    /// outputs the kernels write in full (a memset would be one more operation on the stream per
    /// buffer and call).
    pub(crate) fn uninit(stream: &Stream, bytes: usize) -> Result<Self, String> {
        StreamBuffer::uninit_in(stream, bytes, Pool::Library)
    }

    /// [`Self::uninit`] from the given pool.
    pub(crate) fn uninit_in(stream: &Stream, bytes: usize, pool: Pool) -> Result<Self, String> {
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| describe("binding the context", e))?;
        let bytes = bytes.max(1);
        let ptr = match pool {
            // SAFETY: the stream belongs to the current context; the memory is owned by the
            // returned value and freed once, in Drop, on the same stream.
            Pool::DeviceDefault => unsafe { result::malloc_async(stream.raw(), bytes) }
                .map_err(|e| describe("cuMemAllocAsync", e))?,
            Pool::Library => {
                let pool = library_pool(stream.context())?;
                let mut ptr = 0;
                // SAFETY: as above; `pool` is a live pool of this stream's device (never
                // destroyed) and the driver writes `ptr` before it is read.
                unsafe { sys::cuMemAllocFromPoolAsync(&mut ptr, bytes, pool, stream.raw()) }
                    .result()
                    .map_err(|e| describe("cuMemAllocFromPoolAsync", e))?;
                ptr
            }
        };
        Ok(StreamBuffer {
            ptr,
            bytes,
            stream: stream.clone(),
            owner: None,
        })
    }

    /// Buffers of the given sizes carved from one allocation of the library's pool (each start
    /// 256-byte aligned): one stream-ordered allocation instead of one per buffer, for the many
    /// small buffers of one call. The allocation is freed once every buffer carved from it is
    /// dropped.
    pub(crate) fn carve<const N: usize>(
        stream: &Stream,
        sizes: [usize; N],
    ) -> Result<[Self; N], String> {
        const ALIGN: usize = 256;
        let mut starts = [0usize; N];
        let mut total = 0usize;
        for (start, &size) in starts.iter_mut().zip(&sizes) {
            *start = total;
            total += size.max(1).div_ceil(ALIGN) * ALIGN;
        }
        let arena: Arc<StreamBuffer> = Arc::new(StreamBuffer::uninit(stream, total)?);
        // Every carved range lies inside the arena (the starts and sizes above sum to its size),
        // and each buffer keeps the arena alive.
        Ok(std::array::from_fn(|i| StreamBuffer {
            ptr: arena.ptr + starts[i] as u64,
            bytes: sizes[i],
            stream: stream.clone(),
            owner: Some(arena.clone()),
        }))
    }

    /// `bytes` bytes at `offset` in the shared buffer `region(&owner)`, kept alive by `owner` as
    /// long as the returned value lives; `None` when the range does not fit in the region.
    pub(crate) fn region_of<O: Send + Sync + 'static>(
        stream: &Stream,
        owner: Arc<O>,
        region: impl Fn(&O) -> &SharedBuffer,
        offset: usize,
        bytes: usize,
    ) -> Option<Self> {
        // Every use of a StreamBuffer's address relies on this: the range lies inside the region,
        // which `owner` keeps allocated as long as the value lives.
        let r = region(&owner);
        let (base, size) = (r.ptr(), r.bytes);
        (offset.checked_add(bytes)? <= size).then(|| StreamBuffer {
            ptr: base + offset as u64,
            bytes,
            stream: stream.clone(),
            owner: Some(owner),
        })
    }

    /// `bytes` bytes, every byte set to `fill`, ordered on `stream`.
    pub(crate) fn filled(stream: &Stream, bytes: usize, fill: u8) -> Result<Self, String> {
        let buf = StreamBuffer::uninit(stream, bytes)?;
        // SAFETY: `buf.ptr` points to `buf.bytes` bytes ordered on this stream.
        unsafe { result::memset_d8_async(buf.ptr, fill, buf.bytes, stream.raw()) }
            .map_err(|e| describe("cuMemsetD8Async", e))?;
        Ok(buf)
    }

    /// A copy of host bytes, in the library's pool.
    pub(crate) fn from_host(stream: &Stream, data: &[u8]) -> Result<Self, String> {
        StreamBuffer::from_host_in(stream, data, Pool::Library)
    }

    /// A copy of host bytes, in the given pool.
    pub(crate) fn from_host_in(stream: &Stream, data: &[u8], pool: Pool) -> Result<Self, String> {
        let buf = StreamBuffer::uninit_in(stream, data.len(), pool)?;
        if !data.is_empty() {
            // SAFETY: the destination holds at least data.len() bytes; the source slice outlives
            // the copy because the stream is synchronized before returning.
            unsafe { result::memcpy_htod_async(buf.ptr, data, stream.raw()) }
                .map_err(|e| describe("cuMemcpyHtoDAsync", e))?;
            stream.synchronize()?;
        }
        Ok(buf)
    }

    pub(crate) fn ptr(&self) -> u64 {
        self.ptr
    }

    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    pub(crate) fn ordinal(&self) -> u32 {
        self.stream.ordinal()
    }

    /// Copies the first `out.len()` bytes to the host, waiting for the stream.
    pub(crate) fn read(&self, out: &mut [u8]) -> Result<(), String> {
        if out.len() > self.bytes {
            return Err(format!("reading {} bytes of {}", out.len(), self.bytes));
        }
        read_device(&self.stream, self.ptr, out)
    }

    /// The first `n` i32 values, read to the host (waits for the stream).
    pub(crate) fn read_i32(&self, n: usize) -> Result<Vec<i32>, String> {
        let mut bytes = vec![0u8; n * 4];
        self.read(&mut bytes)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect())
    }

    /// A view of the first `shape`'s bytes as a tensor of `dtype`.
    pub(crate) fn view(
        &self,
        shape: &[usize],
        dtype: crate::dtype::DType,
    ) -> crate::error::Result<crate::tensor::TensorRef<'_>> {
        let need = shape.iter().product::<usize>() * dtype.size();
        assert!(
            need <= self.bytes,
            "a view of {need} bytes over a buffer of {}",
            self.bytes
        );
        // SAFETY: the buffer holds at least the view's bytes on device `ordinal` (checked above),
        // and the view borrows the buffer, so the memory outlives it.
        unsafe { crate::tensor::TensorRef::from_device_ptr(self.ptr, self.ordinal(), shape, dtype) }
    }

    /// Overwrites the first `data.len()` bytes from the host, waiting for the stream.
    pub(crate) fn write(&self, data: &[u8]) -> Result<(), String> {
        if data.len() > self.bytes {
            return Err(format!("writing {} bytes into {}", data.len(), self.bytes));
        }
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| describe("binding the context", e))?;
        // SAFETY: the destination holds at least data.len() bytes (checked); the source slice
        // outlives the copy because the stream is synchronized before returning.
        unsafe { result::memcpy_htod_async(self.ptr, data, self.stream.raw()) }
            .map_err(|e| describe("cuMemcpyHtoDAsync", e))?;
        self.stream.synchronize()
    }

    /// Copies `bytes` bytes from device address `src` on this buffer's stream (asynchronous, so
    /// it can be recorded into a graph).
    pub(crate) fn copy_from_device(&self, src: u64, bytes: usize) -> Result<(), String> {
        if bytes > self.bytes {
            return Err(format!("copying {bytes} bytes into {}", self.bytes));
        }
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: the destination holds at least `bytes` bytes (checked); the caller passes a
        // source of at least `bytes` bytes that stays alive until the stream has run the copy.
        unsafe { result::memcpy_dtod_async(self.ptr, src, bytes, self.stream.raw()) }
            .map_err(|e| describe("cuMemcpyDtoDAsync", e))
    }
}

impl Drop for StreamBuffer {
    fn drop(&mut self) {
        if self.owner.is_none() && self.stream.context().bind_to_thread().is_ok() {
            // SAFETY: allocated with cuMemAllocAsync on this stream and freed only here; work
            // queued on the stream before this point still sees the memory.
            let _ = unsafe { result::free_async(self.ptr, self.stream.raw()) };
        }
    }
}

/// Copies `out.len()` bytes from device address `ptr` to the host once `stream`'s work is done.
pub(crate) fn read_device(stream: &Stream, ptr: u64, out: &mut [u8]) -> Result<(), String> {
    stream
        .context()
        .bind_to_thread()
        .map_err(|e| describe("binding the context", e))?;
    if out.is_empty() {
        return stream.synchronize();
    }
    // SAFETY: callers pass an address holding at least out.len() bytes on this stream's device;
    // the stream is synchronized before `out` is used.
    unsafe { result::memcpy_dtoh_async(out, ptr, stream.raw()) }
        .map_err(|e| describe("cuMemcpyDtoHAsync", e))?;
    stream.synchronize()
}

/// One u64 of pinned host memory that a device reads through its mapping (a gate the host opens
/// for a kernel that waits on it). The host writes it with volatile stores; it starts at 0.
pub(crate) struct HostWord {
    host: *mut u64,
    device: sys::CUdeviceptr,
    ctx: Arc<CudaContext>,
}

// SAFETY: the word is pinned memory owned by this value, written only through `store` (a volatile
// store of a whole u64, which the device reads as either value) and freed once, in Drop.
unsafe impl Send for HostWord {}
unsafe impl Sync for HostWord {}

impl HostWord {
    pub(crate) fn new(ctx: &Arc<CudaContext>) -> Result<Self, String> {
        ctx.bind_to_thread()
            .map_err(|e| describe("binding the context", e))?;
        let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
        // SAFETY: the context is current; the allocation is owned by the returned value.
        let host = unsafe { result::malloc_host(8, flags) }
            .map_err(|e| describe("cuMemHostAlloc", e))? as *mut u64;
        // SAFETY: `host` is 8 bytes just allocated, 8-byte aligned (the driver aligns to pages).
        unsafe { host.write_volatile(0) };
        // Owned from here on, so that an error below frees it.
        let mut word = HostWord {
            host,
            device: 0,
            ctx: ctx.clone(),
        };
        // SAFETY: `host` was allocated with CU_MEMHOSTALLOC_DEVICEMAP on the current context.
        unsafe { sys::cuMemHostGetDevicePointer_v2(&mut word.device, host.cast(), 0) }
            .result()
            .map_err(|e| describe("cuMemHostGetDevicePointer", e))?;
        Ok(word)
    }

    /// The word's address on the device.
    pub(crate) fn device_ptr(&self) -> u64 {
        self.device
    }

    pub(crate) fn store(&self, value: u64) {
        // SAFETY: `host` is live pinned memory of this value (see the Send/Sync note).
        unsafe { self.host.write_volatile(value) };
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for HostWord {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: allocated by malloc_host in `new`, freed once here.
            let _ = unsafe { result::free_host(self.host.cast()) };
        }
    }
}

/// Lets `ctx`'s device read and write memory of `peer`'s device (a no-op for the same device).
pub(crate) fn enable_peer_access(
    ctx: &Arc<CudaContext>,
    peer: &Arc<CudaContext>,
) -> Result<(), String> {
    if ctx.ordinal() == peer.ordinal() {
        return Ok(());
    }
    ctx.bind_to_thread()
        .map_err(|e| describe("binding the context", e))?;
    // SAFETY: both contexts are live primary contexts; enabling access twice is reported as
    // CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED, which is success for us.
    let status = unsafe { sys::cuCtxEnablePeerAccess(peer.cu_ctx(), 0) };
    match status {
        sys::CUresult::CUDA_SUCCESS | sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED => {
            Ok(())
        }
        other => Err(format!(
            "cuCtxEnablePeerAccess(cuda:{} -> cuda:{}): {other:?}",
            ctx.ordinal(),
            peer.ordinal()
        )),
    }
}

/// Keeps freed stream-ordered memory in the device's default pool instead of returning it to the
/// driver at every synchronization (for the benchmark baselines, which allocate there; the
/// library's own pool does the same for its outputs).
pub(crate) fn keep_pool_memory(ctx: &Arc<CudaContext>) -> Result<(), String> {
    ctx.bind_to_thread()
        .map_err(|e| describe("binding the context", e))?;
    let dev = result::device::get(ctx.ordinal() as i32).map_err(|e| describe("cuDeviceGet", e))?;
    let mut pool = std::mem::MaybeUninit::uninit();
    // SAFETY: `dev` is a valid device; the driver writes the pool handle before it is read.
    let pool = unsafe {
        sys::cuDeviceGetDefaultMemPool(pool.as_mut_ptr(), dev)
            .result()
            .map_err(|e| describe("cuDeviceGetDefaultMemPool", e))?;
        pool.assume_init()
    };
    keep_freed_memory(pool)
}

/// Pool attribute values by the type the driver documents for each.
enum PoolAttribute {
    /// Bytes the pool keeps when it could give memory back (`u64`).
    ReleaseThreshold(u64),
    /// Whether reusing freed memory may make a stream wait for another (`i32`, 0 or 1).
    ReuseAllowInternalDependencies(bool),
}

fn set_pool_attribute(pool: sys::CUmemoryPool, attribute: PoolAttribute) -> Result<(), String> {
    use sys::CUmemPool_attribute as A;
    // SAFETY (both calls): `pool` is a live pool handle, and the value points to a local of the
    // type the driver documents for that attribute, alive through the call.
    match attribute {
        PoolAttribute::ReleaseThreshold(mut bytes) => unsafe {
            let value: *mut u64 = &mut bytes;
            sys::cuMemPoolSetAttribute(pool, A::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, value.cast())
        },
        PoolAttribute::ReuseAllowInternalDependencies(allow) => unsafe {
            let mut flag = i32::from(allow);
            let value: *mut i32 = &mut flag;
            let id = A::CU_MEMPOOL_ATTR_REUSE_ALLOW_INTERNAL_DEPENDENCIES;
            sys::cuMemPoolSetAttribute(pool, id, value.cast())
        },
    }
    .result()
    .map_err(|e| describe("cuMemPoolSetAttribute", e))
}

/// Never gives freed memory back to the driver: later allocations reuse it without mapping anew.
fn keep_freed_memory(pool: sys::CUmemoryPool) -> Result<(), String> {
    set_pool_attribute(pool, PoolAttribute::ReleaseThreshold(u64::MAX))
}

/// Where a [`StreamBuffer`]'s memory comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pool {
    /// The library's own pool on the device: other users of the device's default pool (other
    /// libraries, the benchmark baselines) cannot fragment it, so the large capacity-sized outputs
    /// of each call are taken from memory it already holds.
    Library,
    /// The device's default pool (`cuMemAllocAsync`).
    DeviceDefault,
}

/// The library's pool on `ctx`'s device: made on first use, kept for the life of the process,
/// holding on to freed memory (release threshold: never) so calls do not map memory anew.
fn library_pool(ctx: &Arc<CudaContext>) -> Result<sys::CUmemoryPool, String> {
    use std::sync::{Mutex, OnceLock};
    // Pool handles by device ordinal, as integers so the registry is Send.
    static POOLS: OnceLock<Mutex<Vec<(usize, usize)>>> = OnceLock::new();
    let ordinal = ctx.ordinal();
    let mut pools = POOLS
        .get_or_init(|| Mutex::new(Vec::new()))
        .lock()
        .map_err(|_| "the pool registry was poisoned by a panic".to_string())?;
    if let Some(&(_, pool)) = pools.iter().find(|(o, _)| *o == ordinal) {
        return Ok(pool as sys::CUmemoryPool);
    }
    // SAFETY: a zeroed CUmemPoolProps is the documented default (then the fields below are set).
    let mut props: sys::CUmemPoolProps = unsafe { std::mem::zeroed() };
    props.allocType = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
    props.handleTypes = sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_NONE;
    props.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
    props.location.id = ordinal as i32;
    let mut pool = std::ptr::null_mut();
    // SAFETY: `props` describes this device; the driver writes `pool` before it is used.
    unsafe { sys::cuMemPoolCreate(&mut pool, &props) }
        .result()
        .map_err(|e| describe("cuMemPoolCreate", e))?;
    keep_freed_memory(pool)?;
    // Ranks sharing a GPU share this pool. Left to itself, the driver may hand one rank's freed
    // memory to another rank's stream by making that stream wait for the first one; with both
    // ranks' kernels waiting for each other, that wait would last until the timeout. Reuse stays
    // allowed where the free is already done or already ordered.
    set_pool_attribute(pool, PoolAttribute::ReuseAllowInternalDependencies(false))?;
    pools.push((ordinal, pool as usize));
    Ok(pool)
}

/// Loads an embedded fatbin and its kernels by name.
pub(crate) fn load_kernels(
    ctx: &Arc<CudaContext>,
    fatbin: &[u8],
    names: &[&str],
) -> Result<(Arc<CudaModule>, Vec<CudaFunction>), String> {
    let module = ctx
        .load_module(cudarc::nvrtc::Ptx::from_binary(fatbin.to_vec()))
        .map_err(|e| describe("loading the kernel fatbin", e))?;
    let functions = names
        .iter()
        .map(|n| {
            module
                .load_function(n)
                .map_err(|e| describe(&format!("finding kernel {n}"), e))
        })
        .collect::<Result<_, _>>()?;
    Ok((module, functions))
}
