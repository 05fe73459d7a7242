//! CUDA streams (the library's own, or one a caller lends, such as PyTorch's current stream) and
//! graphs recorded from them.

use super::cuda_memory::describe;
use cudarc::driver::{result, sys, CudaContext, CudaStream, DriverError};
use std::sync::Arc;

/// A stream work is queued on, with the context it belongs to.
#[derive(Clone)]
pub(crate) struct Stream {
    /// The `CUstream` handle, kept as an integer so the type is `Send` (it is a driver handle).
    raw: u64,
    ctx: Arc<CudaContext>,
    /// Set when the library made the stream: keeps it alive as long as any user of it.
    _owned: Option<Arc<CudaStream>>,
}

impl Stream {
    pub(crate) fn owned(stream: Arc<CudaStream>) -> Self {
        Stream {
            raw: stream.cu_stream() as u64,
            ctx: stream.context().clone(),
            _owned: Some(stream),
        }
    }

    /// A stream the caller made.
    ///
    /// # Safety
    /// `raw` must be a `CUstream` of `ctx` (the device's primary context) that stays valid as long
    /// as the returned value, its clones and every buffer ordered on it live.
    pub(crate) unsafe fn borrowed(raw: u64, ctx: Arc<CudaContext>) -> Self {
        Stream {
            raw,
            ctx,
            _owned: None,
        }
    }

    pub(crate) fn raw(&self) -> sys::CUstream {
        self.raw as sys::CUstream
    }

    pub(crate) fn handle(&self) -> u64 {
        self.raw
    }

    pub(crate) fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub(crate) fn ordinal(&self) -> u32 {
        self.ctx.ordinal() as u32
    }

    /// Waits for the work queued so far.
    pub(crate) fn synchronize(&self) -> Result<(), String> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| describe("binding the context", e))?;
        // SAFETY: the stream is valid (the invariant of `owned`/`borrowed`).
        unsafe { result::stream::synchronize(self.raw()) }
            .map_err(|e| describe("cuStreamSynchronize", e))
    }

    /// Starts recording the work queued on this stream (from this thread) into a graph.
    pub(crate) fn begin_capture(&self) -> Result<(), DriverError> {
        self.ctx.bind_to_thread()?;
        // SAFETY: the stream is valid. Thread-local mode: other threads (the other ranks) keep
        // making CUDA calls of their own meanwhile.
        unsafe {
            result::stream::begin_capture(
                self.raw(),
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
        }
    }

    /// Stops recording and instantiates what was recorded; `None` when nothing was.
    pub(crate) fn end_capture(&self) -> Result<Option<RecordedGraph>, DriverError> {
        self.ctx.bind_to_thread()?;
        // SAFETY: the stream is valid and capturing (begin_capture succeeded on this thread).
        let graph = unsafe { result::stream::end_capture(self.raw()) }?;
        if graph.is_null() {
            return Ok(None);
        }
        // SAFETY: `graph` was just returned by the driver; allocations it makes and does not free
        // are freed before each relaunch (AUTO_FREE_ON_LAUNCH).
        let exec = unsafe {
            result::graph::instantiate(
                graph,
                sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
            )
        };
        match exec {
            Ok(exec) => Ok(Some(RecordedGraph {
                graph: graph as u64,
                exec: exec as u64,
                stream: self.clone(),
            })),
            Err(e) => {
                // SAFETY: `graph` is ours and not used after this.
                let _ = unsafe { result::graph::destroy(graph) };
                Err(e)
            }
        }
    }
}

/// An instantiated graph, launched on the stream it was recorded from.
pub(crate) struct RecordedGraph {
    graph: u64,
    exec: u64,
    stream: Stream,
}

impl RecordedGraph {
    pub(crate) fn launch(&self) -> Result<(), String> {
        self.stream
            .ctx
            .bind_to_thread()
            .map_err(|e| describe("binding the context", e))?;
        // SAFETY: `exec` is a live instantiated graph and the stream is valid.
        unsafe { result::graph::launch(self.exec as sys::CUgraphExec, self.stream.raw()) }
            .map_err(|e| describe("cuGraphLaunch", e))
    }
}

impl Drop for RecordedGraph {
    fn drop(&mut self) {
        if self.stream.ctx.bind_to_thread().is_ok() {
            // SAFETY: both handles are ours, destroyed once, here.
            unsafe {
                let _ = result::graph::exec_destroy(self.exec as sys::CUgraphExec);
                let _ = result::graph::destroy(self.graph as sys::CUgraph);
            }
        }
    }
}
