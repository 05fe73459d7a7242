//! Which backends this build can run here, and why not when it cannot (for `moe-ep info`).

pub use crate::ffi::cuda_driver::CudaDeviceInfo;

/// One backend's availability on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendStatus {
    pub name: &'static str,
    pub available: bool,
    /// What it runs on, or why it is unavailable.
    pub detail: String,
}

/// The CUDA devices the driver reports, or why there are none.
pub fn cuda_devices() -> Result<Vec<CudaDeviceInfo>, String> {
    crate::ffi::cuda_driver::devices()
}

/// How one GPU reaches another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerLink {
    /// It can load and store the other's memory directly.
    pub access: bool,
    /// The driver's performance rank of the link (lower is better).
    pub perf_rank: i32,
}

/// The link between each pair of CUDA devices (`links[i][j]`, `None` on the diagonal).
pub fn cuda_peer_links() -> Result<Vec<Vec<Option<PeerLink>>>, String> {
    let devs = cuda_devices()?;
    devs.iter()
        .map(|a| {
            devs.iter()
                .map(|b| {
                    (a.ordinal != b.ordinal)
                        .then(|| crate::ffi::cuda_driver::peer_link(a.ordinal, b.ordinal))
                        .transpose()
                        .map(|l| l.map(|(access, perf_rank)| PeerLink { access, perf_rank }))
                })
                .collect()
        })
        .collect()
}

/// Every backend, best first.
pub fn backends() -> Vec<BackendStatus> {
    let cuda = match cuda_devices() {
        Err(why) => BackendStatus {
            name: "cuda",
            available: false,
            detail: why,
        },
        Ok(devs) if devs.is_empty() => BackendStatus {
            name: "cuda",
            available: false,
            detail: "the driver loaded but reports no CUDA device".into(),
        },
        Ok(devs) => match moe_ep_kernels::FATBIN {
            None => BackendStatus {
                name: "cuda",
                available: false,
                detail: format!(
                    "{} CUDA device(s) found, but moe-ep was built without its kernels: {}",
                    devs.len(),
                    moe_ep_kernels::NOT_BUILT
                ),
            },
            Some(_) => BackendStatus {
                name: "cuda",
                available: true,
                detail: format!(
                    "{} device(s): {}",
                    devs.len(),
                    devs.iter()
                        .map(|d| format!("cuda:{} {}", d.ordinal, d.name))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            },
        },
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    vec![
        cuda,
        BackendStatus {
            name: "cpu",
            available: true,
            detail: format!("ranks as threads of one process ({threads} hardware threads here)"),
        },
    ]
}
