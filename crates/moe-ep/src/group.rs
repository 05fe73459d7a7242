//! A group of ranks that dispatch among themselves.

use crate::backend::cpu::Exchange;
use crate::error::{EpError, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// One rank's membership in a group. Create one per rank; each rank then builds its dispatchers
/// from it, in the same order on every rank (the n-th dispatcher of every rank forms one
/// collective, as with NCCL communicators).
pub struct Group {
    rank: usize,
    world: usize,
    next_channel: AtomicU64,
    pub(crate) kind: GroupKind,
}

pub(crate) enum GroupKind {
    /// Ranks are threads of this process; they meet in a shared exchange.
    Cpu(Arc<Exchange>),
}

/// Which backend a group runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Cpu,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
        }
    }
}

impl Group {
    /// `world` CPU ranks, one [`Group`] per rank: move each to its own thread.
    pub fn cpu_world(world: usize) -> Result<Vec<Group>> {
        if world == 0 {
            return Err(EpError::Group {
                arg: "world",
                expected: "at least 1 rank".into(),
                actual: "0".into(),
            });
        }
        let exchange = Arc::new(Exchange::new(world));
        Ok((0..world)
            .map(|rank| Group {
                rank,
                world,
                next_channel: AtomicU64::new(0),
                kind: GroupKind::Cpu(exchange.clone()),
            })
            .collect())
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    pub fn backend(&self) -> BackendKind {
        match self.kind {
            GroupKind::Cpu(_) => BackendKind::Cpu,
        }
    }

    /// The collective channel of the next dispatcher built on this rank.
    pub(crate) fn take_channel(&self) -> u64 {
        self.next_channel.fetch_add(1, Ordering::Relaxed)
    }
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Group({} rank {}/{})",
            self.backend().name(),
            self.rank,
            self.world
        )
    }
}
