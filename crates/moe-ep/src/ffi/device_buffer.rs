//! Device memory for the benchmark baselines and the copy-engine ceiling (libcuda through cudarc):
//! stream-ordered buffers that are *not* filled when allocated (a baseline's timed call must not
//! pay for a memset that the path it imitates does not do), and copies between device addresses.

use super::cuda_memory::{describe, Pool, StreamBuffer};
use super::cuda_stream::Stream;
use cudarc::driver::result;

/// Memory of the baselines and the ceiling: stream-ordered buffers from the device's default pool,
/// apart from the library's own pool, so neither fragments the other's memory.
pub(crate) type DeviceBuffer = StreamBuffer;

/// `bytes` bytes of unspecified content, ordered on `stream`.
pub(crate) fn device_buffer(stream: &Stream, bytes: usize) -> Result<DeviceBuffer, String> {
    StreamBuffer::uninit_in(stream, bytes, Pool::DeviceDefault)
}

/// A buffer holding a copy of host bytes (waits for the copy).
pub(crate) fn device_buffer_from_host(
    stream: &Stream,
    data: &[u8],
) -> Result<DeviceBuffer, String> {
    StreamBuffer::from_host_in(stream, data, Pool::DeviceDefault)
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
