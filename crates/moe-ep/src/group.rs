//! A group of ranks that dispatch among themselves.

use crate::backend::cpu::Exchange;
use crate::backend::cuda::{CudaExchange, CudaRank};
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
    /// Ranks are threads of this process, each driving a GPU; they exchange buffer addresses
    /// through the control plane and then meet in device memory.
    Cuda {
        exchange: Arc<CudaExchange>,
        device: Arc<CudaRank>,
    },
}

/// Which backend a group runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Cpu,
    Cuda,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Cuda => "cuda",
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

    /// One rank per entry of `devices` (CUDA ordinals; repeat one to put several ranks on a GPU),
    /// all driven by threads of this process: move each [`Group`] to its own thread.
    pub fn cuda_local(devices: &[u32]) -> Result<Vec<Group>> {
        if devices.is_empty() {
            return Err(EpError::Group {
                arg: "devices",
                expected: "at least 1 device".into(),
                actual: "none".into(),
            });
        }
        let world = devices.len();
        let exchange = Arc::new(CudaExchange::new(world));
        devices
            .iter()
            .enumerate()
            .map(|(rank, &ordinal)| {
                Ok(Group {
                    rank,
                    world,
                    next_channel: AtomicU64::new(0),
                    kind: GroupKind::Cuda {
                        exchange: exchange.clone(),
                        device: Arc::new(CudaRank::new(ordinal)?),
                    },
                })
            })
            .collect()
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
            GroupKind::Cuda { .. } => BackendKind::Cuda,
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
