//! [`Timer`]: how long a span of calls takes as the device sees it. On the CUDA backend, two CUDA
//! events recorded on the stream the calls run on (so the time excludes the host's wait for the
//! result and includes everything queued between them); on the CPU backend, where every call is
//! complete when it returns, the host clock.

use crate::dispatcher::Dispatcher;
use crate::error::{EpError, Result};
use crate::ffi::cuda_event::{primary_context, Event};
use crate::tensor::Device;
use std::time::{Duration, Instant};

mod sealed {
    pub trait Sealed {}
}

/// Work a [`Timer`] can time: a [`Dispatcher`]'s calls, or a benchmark baseline's
/// ([`crate::baseline`]). Implemented inside this crate only.
pub trait Timed: sealed::Sealed {
    /// The device ordinal and raw `CUstream` the calls run on; `None` when they run on the host.
    #[doc(hidden)]
    fn timing_stream(&self) -> Option<(u32, u64)>;
}

impl sealed::Sealed for Dispatcher {}

impl Timed for Dispatcher {
    fn timing_stream(&self) -> Option<(u32, u64)> {
        match (self.device(), self.cuda_stream()) {
            (Device::Cuda(ordinal), Some(stream)) => Some((ordinal, stream)),
            _ => None,
        }
    }
}

impl sealed::Sealed for crate::baseline::NcclBaselines {}
impl sealed::Sealed for crate::baseline::Ceiling {}

/// A started measurement: [`Timer::start`] (or [`Dispatcher::timer`]) before the calls,
/// [`Timer::stop`] after them.
pub struct Timer {
    inner: Inner,
    /// The hold of [`Dispatcher::timer_held`], opened once the span's end is queued.
    gate: Option<StreamGate>,
}

/// A held stream ([`Dispatcher::hold_stream`]): the work queued behind the hold runs once this is
/// opened or dropped.
pub struct StreamGate {
    open: Option<Box<dyn FnOnce() + Send>>,
}

impl StreamGate {
    pub(crate) fn new(open: impl FnOnce() + Send + 'static) -> StreamGate {
        StreamGate {
            open: Some(Box::new(open)),
        }
    }

    /// Lets the held stream run.
    pub fn open(self) {}
}

impl Drop for StreamGate {
    fn drop(&mut self) {
        if let Some(open) = self.open.take() {
            open();
        }
    }
}

impl std::fmt::Debug for StreamGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StreamGate")
    }
}

enum Inner {
    Host(Instant),
    Cuda {
        ordinal: u32,
        start: Event,
        end: Event,
    },
}

fn device_error(reason: String) -> EpError {
    EpError::BackendUnavailable {
        backend: "cuda",
        reason,
    }
}

impl Timer {
    /// Starts timing the work `on` queues from now: records a CUDA event on its stream, or reads
    /// the host clock.
    pub fn start(on: &impl Timed) -> Result<Timer> {
        let inner = match on.timing_stream() {
            None => Inner::Host(Instant::now()),
            Some((ordinal, _)) => {
                // Both events exist before the span starts, so creating them is not timed.
                let ctx = primary_context(ordinal).map_err(device_error)?;
                let start = Event::timing(&ctx).map_err(device_error)?;
                let end = Event::timing(&ctx).map_err(device_error)?;
                start.record_on(on).map_err(device_error)?;
                Inner::Cuda {
                    ordinal,
                    start,
                    end,
                }
            }
        };
        Ok(Timer { inner, gate: None })
    }

    /// Ends the span after the work `on` queued so far, waits for that work, and returns the time
    /// from the start. `on` is what the timer was started on (another object of the same device
    /// works too: events of one device compare).
    pub fn stop(mut self, on: &impl Timed) -> Result<Duration> {
        let gate = self.gate.take();
        match self.inner {
            Inner::Host(start) => Ok(start.elapsed()),
            Inner::Cuda {
                ordinal,
                start,
                end,
            } => {
                match on.timing_stream() {
                    Some((o, _)) if o == ordinal => {}
                    other => {
                        return Err(EpError::Device {
                            arg: "on",
                            expected: Device::Cuda(ordinal).to_string(),
                            actual: other
                                .map_or(Device::Host, |(o, _)| Device::Cuda(o))
                                .to_string(),
                        })
                    }
                }
                end.record_on(on).map_err(device_error)?;
                drop(gate);
                end.synchronize().map_err(device_error)?;
                end.elapsed_since(&start).map_err(device_error)
            }
        }
    }
}

impl Timer {
    /// Starts timing `on` once every rank of `ep`'s group reached this point
    /// ([`Dispatcher::barrier`]): the ranks' timed work then starts together on the devices, not
    /// when each host arrives, and the host's queuing of it overlaps the barrier. On the CPU
    /// backend, the host rendezvous, then the host clock.
    pub fn start_together(on: &impl Timed, ep: &mut Dispatcher) -> Result<Timer> {
        ep.barrier()?;
        if let (Some((ordinal, theirs)), Some((_, ours))) = (on.timing_stream(), ep.timing_stream())
        {
            if theirs != ours {
                let ctx = primary_context(ordinal).map_err(device_error)?;
                let met = Event::ordering(&ctx).map_err(device_error)?;
                met.record_on(ep).map_err(device_error)?;
                met.make_wait_on(on).map_err(device_error)?;
            }
        }
        Timer::start(on)
    }
}

impl Dispatcher {
    /// [`Timer::start_together`] for this dispatcher's own calls.
    pub fn timer_together(&mut self) -> Result<Timer> {
        self.barrier()?;
        Timer::start(self)
    }

    /// [`Dispatcher::timer_together`] behind a hold of this dispatcher's stream
    /// ([`Dispatcher::hold_stream`]) that [`Timer::stop`] opens once the span's end is queued: the
    /// device then runs the timed calls back to back, as a stream that runs ahead of its host
    /// does, so the time is the device's, without the host's launch latency. Without a stream
    /// (the CPU backend), as [`Dispatcher::timer_together`].
    pub fn timer_held(&mut self) -> Result<Timer> {
        let gate = self.hold_stream()?;
        let mut timer = self.timer_together()?;
        timer.gate = gate;
        Ok(timer)
    }

    /// Starts a [`Timer`] on this dispatcher's stream: `let t = ep.timer()?; ep.dispatch(..)?;
    /// let took = t.stop(&ep)?;`. The time is what the device spent from the start event to the
    /// end event, so a caller's host-side barrier before the span is not counted; errors the
    /// device found are still returned by [`Dispatcher::synchronize`].
    pub fn timer(&self) -> Result<Timer> {
        Timer::start(self)
    }
}

impl std::fmt::Debug for Timer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            Inner::Host(_) => f.write_str("Timer(host clock)"),
            Inner::Cuda { ordinal, .. } => write!(f, "Timer(cuda:{ordinal} events)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::{Dispatcher, EpConfig, Group};

    fn tiny_config() -> EpConfig {
        EpConfig::builder()
            .num_experts(2)
            .topk(1)
            .hidden(4)
            .max_tokens_per_rank(1)
            .build()
            .unwrap()
    }

    #[test]
    fn cpu_timers_read_the_host_clock() {
        let config = tiny_config();
        let group = Group::cpu_world(1).unwrap().remove(0);
        let ep = Dispatcher::new(&group, config).unwrap();
        let timer = ep.timer().unwrap();
        assert_eq!(format!("{timer:?}"), "Timer(host clock)");
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(timer.stop(&ep).unwrap() >= std::time::Duration::from_millis(2));
    }

    #[test]
    fn cpu_timers_started_together_wait_for_every_rank() {
        let config = tiny_config();
        let groups = Group::cpu_world(2).unwrap();
        let late = std::time::Duration::from_millis(20);
        let waited: Vec<std::time::Duration> = std::thread::scope(|s| {
            let ranks: Vec<_> = groups
                .iter()
                .map(|g| {
                    let config = config.clone();
                    s.spawn(move || {
                        let mut ep = Dispatcher::new(g, config).unwrap();
                        if ep.rank() == 1 {
                            std::thread::sleep(late);
                        }
                        let arrived = std::time::Instant::now();
                        let timer = ep.timer_together().unwrap();
                        timer.stop(&ep).unwrap();
                        arrived.elapsed()
                    })
                })
                .collect();
            ranks.into_iter().map(|r| r.join().unwrap()).collect()
        });
        // Rank 0 arrived first and waited for rank 1 at the barrier.
        assert!(waited[0] >= late / 2, "rank 0 waited {:?}", waited[0]);
    }
}
