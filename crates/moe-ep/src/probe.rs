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
