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
        check_queues_for_shared_gpus(devices)?;
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

/// Ranks on one GPU wait for each other inside kernels, so their streams must not share a hardware
/// queue: a kernel queued behind a peer's waiting kernel would never start. The driver spreads
/// streams over `CUDA_DEVICE_MAX_CONNECTIONS` queues (8 unless set before the first CUDA call);
/// asking for twice the ranks on the busiest GPU leaves room for the other streams of the process.
fn check_queues_for_shared_gpus(devices: &[u32]) -> Result<()> {
    let busiest = devices
        .iter()
        .map(|d| devices.iter().filter(|&e| e == d).count())
        .max()
        .unwrap_or(0);
    if busiest <= 1 {
        return Ok(());
    }
    let queues: usize = std::env::var("CUDA_DEVICE_MAX_CONNECTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    if queues < 2 * busiest {
        return Err(EpError::Group {
            arg: "devices",
            expected: format!(
                "CUDA_DEVICE_MAX_CONNECTIONS >= {} (set before the first CUDA call) for {busiest} ranks sharing one GPU",
                2 * busiest
            ),
            actual: format!("{queues} hardware queues"),
        });
    }
    Ok(())
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
