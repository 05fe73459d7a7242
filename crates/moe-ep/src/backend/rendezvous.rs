//! Where ranks of one process meet (the CPU backend's data exchange, and the CUDA backend's
//! control plane). Each collective step is a round keyed by (channel,
//! sequence number): every rank posts one message, and once all have posted each rank takes a
//! reference to all of them. Messages are reference-counted, so a rank never waits for its peers to
//! finish reading; a round is dropped once every rank has taken it. A rank that does not post
//! within the timeout turns into an error naming it, never a hang.

use crate::error::{EpError, Result};
use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// What a collective step is, so ranks making different calls are caught rather than mixed up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Create,
    Dispatch,
    DispatchCached,
    Combine,
    DispatchBackward,
    CombineBackward,
    CombineBackwardWeights,
    Drop,
    Host,
}

impl Op {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Op::Create => "Dispatcher::new",
            Op::Dispatch => "dispatch",
            Op::DispatchCached => "dispatch_cached",
            Op::Combine => "combine",
            Op::DispatchBackward => "dispatch_backward",
            Op::CombineBackward => "combine_backward",
            Op::CombineBackwardWeights => "combine_backward (weights)",
            Op::Drop => "dropping the dispatcher",
            Op::Host => "all_gather_host",
        }
    }
}

struct Round<M> {
    posts: Vec<Option<(Op, Arc<M>)>>,
    taken: usize,
}

/// A rendezvous for `world` ranks exchanging messages of type `M`.
pub(crate) struct Rendezvous<M> {
    world: usize,
    rounds: Mutex<HashMap<(u64, u64), Round<M>>>,
    arrived: Condvar,
}

impl<M> Rendezvous<M> {
    pub(crate) fn new(world: usize) -> Self {
        Rendezvous {
            world,
            rounds: Mutex::new(HashMap::new()),
            arrived: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<(u64, u64), Round<M>>> {
        // A rank thread that panicked cannot leave the map inconsistent: every update is one insert
        // or one field write, so the data behind a poisoned lock is still sound.
        self.rounds.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Posts `message` as `rank`'s part of round `key` and returns every rank's message, indexed by
    /// rank, once all have posted.
    pub(crate) fn all_gather(
        &self,
        rank: usize,
        key: (u64, u64),
        op: Op,
        message: M,
        timeout: Duration,
    ) -> Result<Vec<Arc<M>>> {
        let deadline = Instant::now() + timeout;
        let world = self.world;
        let mut rounds = self.lock();
        rounds
            .entry(key)
            .or_insert_with(|| Round {
                posts: (0..world).map(|_| None).collect(),
                taken: 0,
            })
            .posts[rank] = Some((op, Arc::new(message)));
        self.arrived.notify_all();
        loop {
            let round = rounds
                .get(&key)
                .expect("a round lives until every rank took it");
            if round.posts.iter().all(Option::is_some) {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                let missing = round
                    .posts
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| p.is_none())
                    .map(|(r, _)| r)
                    .collect();
                return Err(EpError::Timeout {
                    rank,
                    missing,
                    waited: timeout,
                });
            }
            rounds = self
                .arrived
                .wait_timeout(rounds, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let round = rounds.get_mut(&key).expect("checked above");
        let mut out = Vec::with_capacity(world);
        let mut mismatch = None;
        for (peer, post) in round.posts.iter().enumerate() {
            let (peer_op, msg) = post.as_ref().expect("all posted");
            if *peer_op != op && mismatch.is_none() {
                mismatch = Some((peer, *peer_op));
            }
            out.push(msg.clone());
        }
        round.taken += 1;
        if round.taken == world {
            rounds.remove(&key);
        }
        match mismatch {
            Some((peer, peer_op)) => Err(EpError::CollectiveMismatch {
                rank,
                peer,
                expected: op.name(),
                actual: peer_op.name(),
            }),
            None => Ok(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_ranks_see_all_posts() {
        let rv = Arc::new(Rendezvous::<usize>::new(3));
        let results: Vec<Vec<usize>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|r| {
                    let rv = rv.clone();
                    s.spawn(move || {
                        (0..5u64)
                            .flat_map(|seq| {
                                rv.all_gather(
                                    r,
                                    (0, seq),
                                    Op::Dispatch,
                                    r * 10 + seq as usize,
                                    Duration::from_secs(5),
                                )
                                .unwrap()
                                .into_iter()
                                .map(|m| *m)
                                .collect::<Vec<_>>()
                            })
                            .collect()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for r in results {
            assert_eq!(&r[..3], &[0, 10, 20]);
            assert_eq!(&r[12..], &[4, 14, 24]);
        }
        assert!(rv.lock().is_empty(), "finished rounds are dropped");
    }

    #[test]
    fn a_missing_rank_times_out_by_name() {
        let rv = Rendezvous::<()>::new(3);
        let start = Instant::now();
        let err = rv
            .all_gather(1, (0, 0), Op::Combine, (), Duration::from_millis(50))
            .unwrap_err();
        assert!(start.elapsed() >= Duration::from_millis(50));
        assert_eq!(
            err,
            EpError::Timeout {
                rank: 1,
                missing: vec![0, 2],
                waited: Duration::from_millis(50)
            }
        );
    }

    #[test]
    fn different_calls_are_a_mismatch() {
        let rv = Arc::new(Rendezvous::<()>::new(2));
        let rv2 = rv.clone();
        let t = std::thread::spawn(move || {
            rv2.all_gather(1, (0, 0), Op::Combine, (), Duration::from_secs(5))
        });
        let mine = rv.all_gather(0, (0, 0), Op::Dispatch, (), Duration::from_secs(5));
        assert!(matches!(
            mine,
            Err(EpError::CollectiveMismatch {
                rank: 0,
                peer: 1,
                expected: "dispatch",
                actual: "combine"
            })
        ));
        assert!(matches!(
            t.join().unwrap(),
            Err(EpError::CollectiveMismatch { peer: 0, .. })
        ));
    }
}
