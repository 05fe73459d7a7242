//! Device memory for the benchmark baselines and the copy-engine ceiling (libcuda through cudarc):
//! stream-ordered buffers that are *not* filled when allocated (a baseline's timed call must not
//! pay for a memset that the path it imitates does not do), copies between device addresses, and
//! views of these buffers as the library's tensor views.

use super::cuda_memory::{describe, read_device};
use super::cuda_stream::Stream;
use crate::dtype::DType;
use crate::error::Result;
use crate::tensor::TensorRef;
use cudarc::driver::result;

/// Stream-ordered device memory (`cuMemAllocAsync`, from the device's default pool), with
/// unspecified content, freed on the same stream when dropped.
pub(crate) struct DeviceBuffer {
    ptr: u64,
    bytes: usize,
    stream: Stream,
}

impl DeviceBuffer {
    /// `bytes` bytes (at least 1, so every buffer has an address) ordered on `stream`.
    pub(crate) fn new(stream: &Stream, bytes: usize) -> Result<Self, String> {
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| describe("binding the context", e))?;
        let bytes = bytes.max(1);
        // SAFETY: the stream belongs to the current context; the memory is owned by the returned
        // value and freed once, in Drop, on the same stream.
        let ptr = unsafe { result::malloc_async(stream.raw(), bytes) }
            .map_err(|e| describe("cuMemAllocAsync", e))?;
        Ok(DeviceBuffer {
            ptr,
            bytes,
            stream: stream.clone(),
        })
    }

    /// A buffer holding a copy of host bytes (waits for the copy).
    pub(crate) fn from_host(stream: &Stream, data: &[u8]) -> Result<Self, String> {
        let buf = DeviceBuffer::new(stream, data.len())?;
        if !data.is_empty() {
            // SAFETY: the destination holds at least data.len() bytes; the source slice outlives
            // the copy because the stream is synchronized before returning.
            unsafe { result::memcpy_htod_async(buf.ptr, data, stream.raw()) }
                .map_err(|e| describe("cuMemcpyHtoDAsync", e))?;
        }
        stream.synchronize()?;
        Ok(buf)
    }

    pub(crate) fn ptr(&self) -> u64 {
        self.ptr
    }

    pub(crate) fn ordinal(&self) -> u32 {
        self.stream.ordinal()
    }

    /// Copies the first `out.len()` bytes to the host once the stream's queued work is done.
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
    pub(crate) fn view(&self, shape: &[usize], dtype: DType) -> Result<TensorRef<'_>> {
        let need = shape.iter().product::<usize>() * dtype.size();
        assert!(
            need <= self.bytes,
            "a view of {need} bytes over a buffer of {}",
            self.bytes
        );
        // SAFETY: the buffer holds at least the view's bytes on device `ordinal` (checked above),
        // and the view borrows the buffer, so the memory outlives it.
        unsafe { TensorRef::from_device_ptr(self.ptr, self.ordinal(), shape, dtype) }
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.stream.context().bind_to_thread().is_ok() {
            // SAFETY: allocated with cuMemAllocAsync on this stream and freed only here; work queued
            // on the stream before this point (kernels, NCCL operations) still sees the memory.
            let _ = unsafe { result::free_async(self.ptr, self.stream.raw()) };
        }
    }
}

/// Queues a copy of `bytes` bytes from device address `src` to device address `dst` on `stream`
/// (a copy-engine transfer when they lie on different GPUs).
///
/// Callers pass addresses of at least `bytes` bytes that stay mapped until the stream has run the
/// copy: buffers owned by the caller, or a peer's buffer that stays allocated until every rank met
/// after its last copy (the ceiling's `close`).
pub(crate) fn copy_async(stream: &Stream, dst: u64, src: u64, bytes: usize) -> Result<(), String> {
    if bytes == 0 {
        return Ok(());
    }
    stream
        .context()
        .bind_to_thread()
        .map_err(|e| describe("binding the context", e))?;
    // SAFETY: the caller's contract above; with unified addressing the driver resolves on which
    // device each address lives (peer access is enabled, or the IPC mapping was opened with it).
    unsafe { result::memcpy_dtod_async(dst, src, bytes, stream.raw()) }
        .map_err(|e| describe("cuMemcpyDtoDAsync", e))
}
