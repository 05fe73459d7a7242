//! CUDA events (libcuda through cudarc's `result` layer): timing a span of a stream's work, and
//! ordering one stream after another (the fork and join of the copy-engine ceiling's streams).

use super::cuda_memory::describe;
use super::cuda_stream::Stream;
use cudarc::driver::{result, sys, CudaContext};
use std::sync::Arc;
use std::time::Duration;

/// A CUDA event of one context, destroyed when dropped.
pub(crate) struct Event {
    /// The `CUevent`, kept as an integer so the type is `Send` (it is a driver handle).
    raw: u64,
    ctx: Arc<CudaContext>,
}

impl Event {
    /// An event that records time (for [`Event::elapsed_since`]).
    pub(crate) fn timing(ctx: &Arc<CudaContext>) -> Result<Self, String> {
        Self::create(ctx, sys::CUevent_flags::CU_EVENT_DEFAULT)
    }

    /// An event only for ordering streams (cheaper: no timestamp).
    pub(crate) fn ordering(ctx: &Arc<CudaContext>) -> Result<Self, String> {
        Self::create(ctx, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
    }

    fn create(ctx: &Arc<CudaContext>, flags: sys::CUevent_flags) -> Result<Self, String> {
        ctx.bind_to_thread()
            .map_err(|e| describe("binding the context", e))?;
        let raw = result::event::create(flags).map_err(|e| describe("cuEventCreate", e))?;
        Ok(Event {
            raw: raw as u64,
            ctx: ctx.clone(),
        })
    }

    fn raw(&self) -> sys::CUevent {
        self.raw as sys::CUevent
    }

    /// Records the event after the work queued so far on `stream`.
    pub(crate) fn record(&self, stream: &Stream) -> Result<(), String> {
        // SAFETY: `stream` is a live stream (Stream's invariant) and the event is ours and alive.
        unsafe { self.record_raw(stream.raw()) }
    }

    /// Records the event after the work queued so far on the stream a [`crate::Timed`] value's
    /// calls run on.
    pub(crate) fn record_on(&self, on: &impl crate::timer::Timed) -> Result<(), String> {
        let (_, stream) = on
            .timing_stream()
            .ok_or("recording an event for work that does not run on a CUDA stream")?;
        // SAFETY: `Timed` is sealed: its implementations (the dispatcher, the baselines) return
        // the stream their calls run on, which stays alive at least as long as they are borrowed
        // here (their own stream, or one the caller promised to keep alive as long as the
        // dispatcher, see `Dispatcher::set_cuda_stream`).
        unsafe { self.record_raw(stream as sys::CUstream) }
    }

    /// # Safety
    /// `stream` must be a live `CUstream` of this event's context.
    unsafe fn record_raw(&self, stream: sys::CUstream) -> Result<(), String> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| describe("binding the context", e))?;
        // SAFETY: the event is alive (destroyed only in Drop); the caller guarantees the stream.
        unsafe { result::event::record(self.raw(), stream) }
            .map_err(|e| describe("cuEventRecord", e))
    }

    /// Makes the work queued later on `stream` wait until this event's work is done (no host wait).
    pub(crate) fn make_wait(&self, stream: &Stream) -> Result<(), String> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| describe("binding the context", e))?;
        // SAFETY: both the stream (Stream's invariant) and the event are alive.
        unsafe {
            result::stream::wait_event(
                stream.raw(),
                self.raw(),
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        }
        .map_err(|e| describe("cuStreamWaitEvent", e))
    }

    /// Makes the work queued later on the stream of a [`crate::Timed`] value wait until this
    /// event's work is done (no host wait).
    pub(crate) fn make_wait_on(&self, on: &impl crate::timer::Timed) -> Result<(), String> {
        let (_, stream) = on
            .timing_stream()
            .ok_or("ordering work that does not run on a CUDA stream")?;
        self.ctx
            .bind_to_thread()
            .map_err(|e| describe("binding the context", e))?;
        // SAFETY: the event is alive; the stream is as in `record_on` (Timed is sealed).
        unsafe {
            result::stream::wait_event(
                stream as sys::CUstream,
                self.raw(),
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        }
        .map_err(|e| describe("cuStreamWaitEvent", e))
    }

    /// Waits on the host until the recorded work is done.
    pub(crate) fn synchronize(&self) -> Result<(), String> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| describe("binding the context", e))?;
        // SAFETY: the event is alive.
        unsafe { result::event::synchronize(self.raw()) }
            .map_err(|e| describe("cuEventSynchronize", e))
    }

    /// The device time from `start` to this event; both must be recorded timing events of one
    /// context, this one complete (after [`Event::synchronize`]).
    pub(crate) fn elapsed_since(&self, start: &Event) -> Result<Duration, String> {
        if self.ctx.cu_ctx() != start.ctx.cu_ctx() {
            return Err(format!(
                "timing events of two devices (cuda:{} and cuda:{})",
                start.ctx.ordinal(),
                self.ctx.ordinal()
            ));
        }
        // SAFETY: both events are alive, made by `Event::timing` in the same context.
        let ms = unsafe { result::event::elapsed(start.raw(), self.raw()) }
            .map_err(|e| describe("cuEventElapsedTime", e))?;
        Ok(Duration::from_secs_f64(f64::from(ms.max(0.0)) / 1e3))
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: the event is ours and destroyed once, here; an event still pending on a
            // stream may be destroyed (the driver frees it once the work completes).
            let _ = unsafe { result::event::destroy(self.raw()) };
        }
    }
}

/// The primary context of device `ordinal` (the one every stream of the library belongs to).
pub(crate) fn primary_context(ordinal: u32) -> Result<Arc<CudaContext>, String> {
    CudaContext::new(ordinal as usize).map_err(|e| describe("retaining the primary context", e))
}
