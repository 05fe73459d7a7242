//! The control plane of ranks in separate processes of one node: a small TCP rendezvous (the
//! torchrun convention: rank 0 listens on MASTER_ADDR:MASTER_PORT). It only carries what ranks
//! exchange when a dispatcher is built or dropped (configs, memory handles, a farewell barrier);
//! data never goes through it.
//!
//! An all-gather is one round trip: every rank sends its frame to rank 0, rank 0 answers each with
//! every rank's frame. Every read has a deadline, so a rank that never comes is an error naming it.

use super::rendezvous::Op;
use crate::error::{EpError, Result};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A frame: the round's key and op, so ranks in different rounds are caught, and the payload.
struct Frame {
    key: (u64, u64),
    op: u8,
    payload: Vec<u8>,
}

fn op_code(op: Op) -> u8 {
    op as u8
}

fn write_frame(s: &mut TcpStream, f: &Frame) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(21 + f.payload.len());
    buf.extend_from_slice(&f.key.0.to_le_bytes());
    buf.extend_from_slice(&f.key.1.to_le_bytes());
    buf.push(f.op);
    buf.extend_from_slice(&(f.payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(&f.payload);
    s.write_all(&buf)
}

fn read_exact_by(s: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> std::io::Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(std::io::ErrorKind::TimedOut.into());
    }
    s.set_read_timeout(Some(left))?;
    s.read_exact(buf)
}

fn read_frame(s: &mut TcpStream, deadline: Instant) -> std::io::Result<Frame> {
    let mut head = [0u8; 21];
    read_exact_by(s, &mut head, deadline)?;
    let word = |i: usize| u64::from_le_bytes(head[i..i + 8].try_into().expect("8 bytes"));
    let len = u32::from_le_bytes(head[17..21].try_into().expect("4 bytes")) as usize;
    let mut payload = vec![0u8; len];
    read_exact_by(s, &mut payload, deadline)?;
    Ok(Frame {
        key: (word(0), word(8)),
        op: head[16],
        payload,
    })
}

enum Role {
    /// Rank 0: one connection per other rank, indexed by rank (index 0 unused).
    Root(Vec<Option<TcpStream>>),
    Leaf(TcpStream),
}

pub(crate) struct TcpRendezvous {
    rank: usize,
    world: usize,
    role: Mutex<Role>,
}

fn group_error(expected: String, actual: String) -> EpError {
    EpError::Group {
        arg: "MASTER_ADDR:MASTER_PORT",
        expected,
        actual,
    }
}

impl TcpRendezvous {
    /// Rank 0 listens on `addr:port` and waits for the others; the others connect (retrying until
    /// rank 0 is up). Each rank announces itself with its rank and the world size.
    pub(crate) fn connect(
        rank: usize,
        world: usize,
        addr: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let role = if rank == 0 {
            let listener = TcpListener::bind((addr, port)).map_err(|e| {
                group_error(
                    format!("a free port to listen on at {addr}:{port}"),
                    e.to_string(),
                )
            })?;
            listener
                .set_nonblocking(true)
                .map_err(|e| group_error("a listening socket".into(), e.to_string()))?;
            let mut peers: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
            while peers.iter().skip(1).any(Option::is_none) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false)
                            .map_err(|e| group_error("a blocking socket".into(), e.to_string()))?;
                        let mut hello = [0u8; 16];
                        read_exact_by(&mut s, &mut hello, deadline)
                            .map_err(|e| group_error("a rank's hello".into(), e.to_string()))?;
                        let r =
                            u64::from_le_bytes(hello[..8].try_into().expect("8 bytes")) as usize;
                        let w =
                            u64::from_le_bytes(hello[8..].try_into().expect("8 bytes")) as usize;
                        if w != world || r == 0 || r >= world || peers[r].is_some() {
                            return Err(group_error(
                                format!("a new rank in [1, {world}) of a world of {world}"),
                                format!("rank {r} of a world of {w}"),
                            ));
                        }
                        let _ = s.set_nodelay(true);
                        peers[r] = Some(s);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() >= deadline {
                            return Err(EpError::Timeout {
                                rank,
                                missing: (1..world).filter(|&r| peers[r].is_none()).collect(),
                                waited: timeout,
                            });
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => {
                        return Err(group_error("incoming connections".into(), e.to_string()))
                    }
                }
            }
            Role::Root(peers)
        } else {
            let target = (addr, port)
                .to_socket_addrs()
                .map_err(|e| group_error("a resolvable address".into(), e.to_string()))?
                .next()
                .ok_or_else(|| group_error("a resolvable address".into(), "no address".into()))?;
            let mut stream = loop {
                match TcpStream::connect_timeout(&target, Duration::from_millis(200)) {
                    Ok(s) => break s,
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(_) => {
                        return Err(EpError::Timeout {
                            rank,
                            missing: vec![0],
                            waited: timeout,
                        })
                    }
                }
            };
            let _ = stream.set_nodelay(true);
            let mut hello = (rank as u64).to_le_bytes().to_vec();
            hello.extend_from_slice(&(world as u64).to_le_bytes());
            stream
                .write_all(&hello)
                .map_err(|e| group_error("a connection to rank 0".into(), e.to_string()))?;
            Role::Leaf(stream)
        };
        Ok(TcpRendezvous {
            rank,
            world,
            role: Mutex::new(role),
        })
    }

    /// Every rank's payload for round `key`, indexed by rank.
    pub(crate) fn all_gather(
        &self,
        key: (u64, u64),
        op: Op,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<Vec<u8>>> {
        let deadline = Instant::now() + timeout;
        let (rank, world) = (self.rank, self.world);
        let timed_out = |missing: usize| EpError::Timeout {
            rank,
            missing: vec![missing],
            waited: timeout,
        };
        let mine = Frame {
            key,
            op: op_code(op),
            payload,
        };
        let mut role = self.role.lock().unwrap_or_else(|e| e.into_inner());
        let frames: Vec<Frame> = match &mut *role {
            Role::Leaf(s) => {
                write_frame(s, &mine).map_err(|_| timed_out(0))?;
                (0..world)
                    .map(|_| read_frame(s, deadline).map_err(|_| timed_out(0)))
                    .collect::<Result<_>>()?
            }
            Role::Root(peers) => {
                let mut frames = Vec::with_capacity(world);
                frames.push(mine);
                for (r, s) in peers.iter_mut().enumerate().skip(1) {
                    let s = s.as_mut().expect("every rank connected");
                    frames.push(read_frame(s, deadline).map_err(|_| timed_out(r))?);
                }
                for (r, s) in peers.iter_mut().enumerate().skip(1) {
                    let s = s.as_mut().expect("every rank connected");
                    for f in &frames {
                        write_frame(s, f).map_err(|_| timed_out(r))?;
                    }
                }
                frames
            }
        };
        for (peer, f) in frames.iter().enumerate() {
            if f.key != key || f.op != op_code(op) {
                return Err(EpError::CollectiveMismatch {
                    rank,
                    peer,
                    expected: op.name(),
                    actual: if f.op == op_code(op) {
                        "the same call of another dispatcher or sequence"
                    } else {
                        "another call"
                    },
                });
            }
        }
        Ok(frames.into_iter().map(|f| f.payload).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        TcpListener::bind(("127.0.0.1", 0))
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port()
    }

    #[test]
    fn ranks_gather_each_others_payloads() {
        let port = free_port();
        let timeout = Duration::from_secs(10);
        let results: Vec<Vec<Vec<u8>>> = std::thread::scope(|s| {
            let ranks: Vec<_> = (0..3)
                .map(|r| {
                    s.spawn(move || {
                        let tcp = TcpRendezvous::connect(r, 3, "127.0.0.1", port, timeout).unwrap();
                        let mut all = Vec::new();
                        for seq in 0..2u64 {
                            let payload = vec![r as u8; r + seq as usize];
                            all.extend(
                                tcp.all_gather((7, seq), Op::Create, payload, timeout)
                                    .unwrap(),
                            );
                        }
                        all
                    })
                })
                .collect();
            ranks.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for got in results {
            assert_eq!(got[..3], [vec![], vec![1], vec![2, 2]]);
            assert_eq!(got[3..], [vec![0], vec![1, 1], vec![2, 2, 2]]);
        }
    }

    #[test]
    fn a_missing_rank_is_named() {
        let port = free_port();
        let err = TcpRendezvous::connect(0, 3, "127.0.0.1", port, Duration::from_millis(200))
            .err()
            .expect("ranks 1 and 2 never connect");
        assert!(matches!(err, EpError::Timeout { rank: 0, ref missing, .. } if missing == &[1, 2]));
    }

    #[test]
    fn ranks_in_different_calls_are_a_mismatch() {
        let port = free_port();
        let timeout = Duration::from_secs(10);
        let results: Vec<Result<Vec<Vec<u8>>>> = std::thread::scope(|s| {
            let ranks: Vec<_> = (0..2)
                .map(|r| {
                    s.spawn(move || {
                        let tcp = TcpRendezvous::connect(r, 2, "127.0.0.1", port, timeout).unwrap();
                        let op = if r == 0 { Op::Create } else { Op::Drop };
                        tcp.all_gather((0, 0), op, Vec::new(), timeout)
                    })
                })
                .collect();
            ranks.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(matches!(
            results[0],
            Err(EpError::CollectiveMismatch {
                rank: 0,
                peer: 1,
                ..
            })
        ));
        assert!(matches!(
            results[1],
            Err(EpError::CollectiveMismatch {
                rank: 1,
                peer: 0,
                ..
            })
        ));
    }
}
