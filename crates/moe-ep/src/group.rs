//! A group of ranks that dispatch among themselves.

use crate::backend::cpu::Exchange;
use crate::backend::cuda::{ControlPlane, CudaExchange, CudaRank};
use crate::backend::tcp_rendezvous::TcpRendezvous;
use crate::error::{EpError, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
    /// Ranks each drive a GPU, from threads of this process or from processes of this node;
    /// they set up through the control plane and then meet in device memory.
    Cuda {
        control: ControlPlane,
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
                        control: ControlPlane::Local(exchange.clone()),
                        device: Arc::new(CudaRank::new(ordinal)?),
                    },
                })
            })
            .collect()
    }

    /// This process's rank of a group of processes on one node, launched torchrun-style: RANK,
    /// WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT. The rank drives GPU
    /// `LOCAL_RANK % (GPUs on the node)`; ranks meet over TCP at MASTER_ADDR:MASTER_PORT (rank 0
    /// listens) within MOE_EP_RENDEZVOUS_TIMEOUT_S seconds (default 60) and then share memory
    /// through CUDA IPC.
    pub fn from_env() -> Result<Group> {
        fn var(name: &'static str) -> Result<String> {
            std::env::var(name).map_err(|_| EpError::Group {
                arg: name,
                expected: "set (a torchrun-style launch sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT)".into(),
                actual: "unset".into(),
            })
        }
        fn number<T: std::str::FromStr>(name: &'static str) -> Result<T> {
            let v = var(name)?;
            v.parse().map_err(|_| EpError::Group {
                arg: name,
                expected: "a non-negative integer".into(),
                actual: v,
            })
        }
        let rank: usize = number("RANK")?;
        let world: usize = number("WORLD_SIZE")?;
        let local_rank: usize = number("LOCAL_RANK")?;
        let local_world: usize = number("LOCAL_WORLD_SIZE")?;
        let port: u16 = number("MASTER_PORT")?;
        let addr = var("MASTER_ADDR")?;
        if local_world != world {
            return Err(EpError::Group {
                arg: "LOCAL_WORLD_SIZE",
                expected: format!(
                    "WORLD_SIZE = {world}: one node (across nodes moe-ep will use NCCL)"
                ),
                actual: local_world.to_string(),
            });
        }
        if rank >= world || local_rank != rank {
            return Err(EpError::Group {
                arg: "RANK",
                expected: format!("LOCAL_RANK = {local_rank}, below WORLD_SIZE = {world}"),
                actual: rank.to_string(),
            });
        }
        let devices =
            crate::probe::cuda_devices().map_err(|reason| EpError::BackendUnavailable {
                backend: "cuda",
                reason,
            })?;
        if devices.is_empty() {
            return Err(EpError::BackendUnavailable {
                backend: "cuda",
                reason: "no CUDA device on this node".into(),
            });
        }
        let timeout = std::env::var("MOE_EP_RENDEZVOUS_TIMEOUT_S")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(Duration::from_secs(60), Duration::from_secs);
        let ordinal = devices[local_rank % devices.len()].ordinal;
        let device = Arc::new(CudaRank::new(ordinal)?);
        let tcp = TcpRendezvous::connect(rank, world, &addr, port, timeout)?;
        Ok(Group {
            rank,
            world,
            next_channel: AtomicU64::new(0),
            kind: GroupKind::Cuda {
                control: ControlPlane::Tcp(Arc::new(tcp)),
                device,
            },
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// Where this rank's dispatchers keep their tensors: the host, or the rank's GPU. Known before
    /// any dispatcher exists, so a caller can make the streams it will pass to
    /// [`crate::Dispatcher::set_cuda_stream`] first (see that method).
    pub fn device(&self) -> crate::tensor::Device {
        match &self.kind {
            GroupKind::Cpu(_) => crate::tensor::Device::Host,
            GroupKind::Cuda { device, .. } => {
                crate::tensor::Device::Cuda(device.ctx.ordinal() as u32)
            }
        }
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
