//! [`Ceiling`]: the all-to-all ceiling of the copy engines. Every rank copies, at once, to every
//! peer the bytes it is given (the bytes a dispatch must move there), with one `cuMemcpyDtoDAsync`
//! per peer on a stream of its own so that the peers' copies run side by side, into a receive
//! buffer the peer allocated with `cuMemAlloc`: mapped by peer access when the peer is a thread of
//! this process, by CUDA IPC when it is another process.

use super::{cpu_reason, device_error};
use crate::dispatcher::Dispatcher;
use crate::error::{EpError, Result};
use crate::ffi::cuda_event::{primary_context, Event};
use crate::ffi::cuda_memory::{
    describe, enable_peer_access, PeerMapping, SharedBuffer, IPC_HANDLE_BYTES,
};
use crate::ffi::cuda_stream::Stream;
use crate::ffi::device_buffer::copy_async;
use crate::tensor::Device;
use crate::timer::{Timed, Timer};
use cudarc::driver::CudaContext;
use std::sync::Arc;

/// One rank's side of the copy-engine all-to-all.
pub struct Ceiling {
    rank: usize,
    ordinal: u32,
    /// (stream index, destination address, source address, bytes) per peer with bytes to copy.
    copies: Vec<(usize, u64, u64, usize)>,
    bytes_out: usize,
    fork: Event,
    joins: Vec<Event>,
    /// One stream per copy, so the copies to different peers overlap.
    copy_streams: Vec<Stream>,
    stream: Stream,
    /// Other processes' receive buffers, mapped here (closed when dropped).
    _mapped: Vec<PeerMapping>,
    /// What this rank copies from (content irrelevant: the copy engines' speed does not depend on it).
    _src: SharedBuffer,
    /// This rank's receive buffer; `None` once given up (see `Drop`).
    recv: Option<SharedBuffer>,
    closed: bool,
    _ctx: Arc<CudaContext>,
}

/// What a rank publishes about its receive buffer.
struct Published {
    pid: u32,
    ordinal: u32,
    ptr: u64,
    handle: [u8; IPC_HANDLE_BYTES],
}

impl Published {
    const BYTES: usize = 1 + 4 + 4 + 8 + IPC_HANDLE_BYTES;

    fn encode(&self) -> Vec<u8> {
        let mut v = vec![1u8];
        v.extend_from_slice(&self.pid.to_le_bytes());
        v.extend_from_slice(&self.ordinal.to_le_bytes());
        v.extend_from_slice(&self.ptr.to_le_bytes());
        v.extend_from_slice(&self.handle);
        v
    }

    /// The published buffer, or the reason the rank gave for having none.
    fn decode(b: &[u8]) -> std::result::Result<Published, String> {
        if b.len() != Self::BYTES || b[0] != 1 {
            return Err(String::from_utf8_lossy(b.get(1..).unwrap_or_default()).into_owned());
        }
        Ok(Published {
            pid: u32::from_le_bytes(b[1..5].try_into().expect("4 bytes")),
            ordinal: u32::from_le_bytes(b[5..9].try_into().expect("4 bytes")),
            ptr: u64::from_le_bytes(b[9..17].try_into().expect("8 bytes")),
            handle: b[17..].try_into().expect("a whole handle"),
        })
    }
}

fn fresh_stream(ctx: &Arc<CudaContext>) -> std::result::Result<Stream, String> {
    let s = ctx
        .new_stream()
        .map_err(|e| describe("creating a stream", e))?;
    Ok(Stream::owned(s))
}

/// Where rank `src`'s bytes start in rank `dst`'s receive buffer: after those of the ranks before
/// it (other than `dst` itself). `matrix[s][d]` is the bytes rank s copies to rank d.
pub(crate) fn receive_offset(matrix: &[Vec<usize>], src: usize, dst: usize) -> usize {
    (0..src).filter(|&s| s != dst).map(|s| matrix[s][dst]).sum()
}

impl Ceiling {
    /// Sets up this rank's side: `bytes_to[d]` bytes to copy to rank d (its own entry is
    /// ignored). Collective: every rank of `ep`'s group calls it, in the same order relative to the
    /// group's other host collectives; an error on one rank is returned on every rank.
    pub fn new(ep: &mut Dispatcher, bytes_to: &[usize]) -> Result<Ceiling> {
        let (rank, world) = (ep.rank(), ep.world());
        if bytes_to.len() != world {
            return Err(EpError::Shape {
                arg: "bytes_to",
                expected: format!("[{world}] (one entry per rank)"),
                actual: format!("[{}]", bytes_to.len()),
            });
        }
        let Device::Cuda(ordinal) = ep.device() else {
            // Every rank of a group has the same backend: all of them stop here.
            return Err(device_error(cpu_reason()));
        };
        let mine: Vec<u8> = bytes_to
            .iter()
            .flat_map(|&b| (b as u64).to_le_bytes())
            .collect();
        let matrix: Vec<Vec<usize>> = ep
            .all_gather_host(mine)?
            .iter()
            .map(|b| {
                b.chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")) as usize)
                    .collect()
            })
            .collect();
        let incoming: usize = (0..world)
            .filter(|&s| s != rank)
            .map(|s| matrix[s][rank])
            .sum();
        let outgoing: usize = (0..world).filter(|&d| d != rank).map(|d| bytes_to[d]).sum();
        let prepared = (|| -> std::result::Result<_, String> {
            let ctx = primary_context(ordinal)?;
            let stream = fresh_stream(&ctx)?;
            let src = SharedBuffer::zeroed(&stream, outgoing)?;
            let recv = SharedBuffer::zeroed(&stream, incoming)?;
            // Only peers in other processes need the handle; a failure shows when one opens it.
            let handle = recv.ipc_handle().unwrap_or([0; IPC_HANDLE_BYTES]);
            let published = Published {
                pid: std::process::id(),
                ordinal,
                ptr: recv.ptr(),
                handle,
            };
            Ok((ctx, stream, src, recv, published))
        })();
        let post = match &prepared {
            Ok((.., published)) => published.encode(),
            Err(why) => [&[0u8][..], why.as_bytes()].concat(),
        };
        let all = ep.all_gather_host(post)?;
        let peers: Vec<Published> = all
            .iter()
            .enumerate()
            .map(|(r, b)| {
                Published::decode(b).map_err(|why| device_error(format!("rank {r}: {why}")))
            })
            .collect::<Result<_>>()?;
        let (ctx, stream, src, recv, _) = prepared.expect("this rank published");

        let mut copies = Vec::new();
        let mut mapped = Vec::new();
        let mut copy_streams = Vec::new();
        let mut src_offset = 0usize;
        for (d, peer) in peers.iter().enumerate() {
            if d == rank || bytes_to[d] == 0 {
                continue;
            }
            let base = if peer.pid == std::process::id() {
                // A thread of this process: its memory is reachable at its own address once this
                // device may access the peer's (the dispatcher enabled it already; again is fine).
                let peer_ctx = primary_context(peer.ordinal).map_err(device_error)?;
                enable_peer_access(&ctx, &peer_ctx).map_err(device_error)?;
                peer.ptr
            } else {
                let m = PeerMapping::open(&ctx, &peer.handle).map_err(device_error)?;
                let ptr = m.ptr();
                mapped.push(m);
                ptr
            };
            let dst = base + receive_offset(&matrix, rank, d) as u64;
            copies.push((
                copy_streams.len(),
                dst,
                src.ptr() + src_offset as u64,
                bytes_to[d],
            ));
            copy_streams.push(fresh_stream(&ctx).map_err(device_error)?);
            src_offset += bytes_to[d];
        }
        let fork = Event::ordering(&ctx).map_err(device_error)?;
        let joins = copy_streams
            .iter()
            .map(|_| Event::ordering(&ctx))
            .collect::<std::result::Result<_, _>>()
            .map_err(device_error)?;
        Ok(Ceiling {
            rank,
            ordinal,
            copies,
            bytes_out: outgoing,
            fork,
            joins,
            copy_streams,
            stream,
            _mapped: mapped,
            _src: src,
            recv: Some(recv),
            closed: false,
            _ctx: ctx,
        })
    }
}

impl Ceiling {
    /// Queues one all-to-all round: every copy on its own stream, all after the work queued on
    /// this ceiling's stream so far, and that stream's later work after all of them (so a
    /// [`Timer`] on it spans the whole round). Every rank runs its round at the same time (the
    /// caller's host barrier before).
    pub fn run(&mut self) -> Result<()> {
        self.fork.record(&self.stream).map_err(device_error)?;
        for (&(i, dst, src, bytes), join) in self.copies.iter().zip(&self.joins) {
            let s = &self.copy_streams[i];
            self.fork.make_wait(s).map_err(device_error)?;
            copy_async(s, dst, src, bytes).map_err(device_error)?;
            join.record(s).map_err(device_error)?;
            join.make_wait(&self.stream).map_err(device_error)?;
        }
        Ok(())
    }

    /// Bytes this rank copies to its peers in one round.
    pub fn bytes_out(&self) -> usize {
        self.bytes_out
    }

    /// Starts a [`Timer`] on this ceiling's stream.
    pub fn timer(&self) -> Result<Timer> {
        Timer::start(self)
    }

    /// Waits for the rounds queued so far.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(device_error)
    }

    /// Frees this rank's buffers once every rank finished copying into them. Collective (a host
    /// barrier). Dropping a ceiling without closing it keeps its receive buffer allocated, since a
    /// peer may still be copying into it.
    pub fn close(mut self, ep: &mut Dispatcher) -> Result<()> {
        self.synchronize()?;
        ep.all_gather_host(Vec::new())?;
        self.closed = true;
        Ok(())
    }
}

impl Timed for Ceiling {
    fn timing_stream(&self) -> Option<(u32, u64)> {
        Some((self.ordinal, self.stream.handle()))
    }
}

impl Drop for Ceiling {
    fn drop(&mut self) {
        // This rank's copies into peers end before its mappings of them close and its source
        // buffer is freed.
        let _ = self.stream.synchronize();
        if !self.closed {
            // Peers may still copy into it: leave it allocated rather than free it under them.
            std::mem::forget(self.recv.take());
        }
    }
}

impl std::fmt::Debug for Ceiling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ceiling")
            .field("rank", &self.rank)
            .field("device", &Device::Cuda(self.ordinal))
            .field("peers", &self.copies.len())
            .field("bytes_out", &self.bytes_out)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_source_writes_after_the_sources_before_it() {
        // matrix[s][d]: bytes s copies to d (the diagonal is never copied).
        let m = vec![vec![9, 10, 20], vec![30, 9, 40], vec![50, 60, 9]];
        assert_eq!(receive_offset(&m, 0, 1), 0);
        assert_eq!(receive_offset(&m, 2, 1), 10);
        assert_eq!(receive_offset(&m, 1, 0), 0);
        assert_eq!(receive_offset(&m, 2, 0), 30);
        assert_eq!(receive_offset(&m, 1, 2), 20);
    }

    #[test]
    fn published_buffers_round_trip_and_failures_carry_the_reason() {
        let p = Published {
            pid: 7,
            ordinal: 3,
            ptr: 0xdead_beef,
            handle: [5; IPC_HANDLE_BYTES],
        };
        let q = Published::decode(&p.encode()).unwrap();
        assert_eq!(
            (q.pid, q.ordinal, q.ptr, q.handle),
            (7, 3, 0xdead_beef, [5; IPC_HANDLE_BYTES])
        );
        let why = Published::decode(&[&[0u8][..], b"out of memory"].concat()).err();
        assert_eq!(why.as_deref(), Some("out of memory"));
    }
}
