//! The CUDA driver API (libcuda, loaded at run time through cudarc), used here only to find devices.

use cudarc::driver::{result, sys};

/// A CUDA device as the driver describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaDeviceInfo {
    pub ordinal: u32,
    pub name: String,
    pub total_memory: usize,
    pub compute_capability: (i32, i32),
}

/// Whether libcuda can be loaded. cudarc panics on first use of a missing library, so every
/// driver call below is guarded by this.
pub(crate) fn driver_present() -> bool {
    // SAFETY: this only tries `dlopen` on the driver's library names; loading libcuda runs its
    // initializers, which have no preconditions.
    unsafe { sys::is_culib_present() }
}

/// How device `src` reaches device `dst`: whether it can access its memory directly (peer access
/// over NVLink or PCIe) and the driver's performance rank of that link (lower is better).
pub(crate) fn peer_link(src: u32, dst: u32) -> Result<(bool, i32), String> {
    let dev =
        |o: u32| result::device::get(o as i32).map_err(|e| format!("cuDeviceGet({o}): {e:?}"));
    let (s, d) = (dev(src)?, dev(dst)?);
    let (mut access, mut rank) = (0i32, 0i32);
    use sys::CUdevice_P2PAttribute::*;
    // SAFETY: both handles come from cuDeviceGet; the outputs are i32s that live through the calls.
    unsafe {
        sys::cuDeviceGetP2PAttribute(&mut access, CU_DEVICE_P2P_ATTRIBUTE_ACCESS_SUPPORTED, s, d)
            .result()
            .map_err(|e| format!("cuDeviceGetP2PAttribute: {e:?}"))?;
        sys::cuDeviceGetP2PAttribute(&mut rank, CU_DEVICE_P2P_ATTRIBUTE_PERFORMANCE_RANK, s, d)
            .result()
            .map_err(|e| format!("cuDeviceGetP2PAttribute: {e:?}"))?;
    }
    Ok((access != 0, rank))
}

/// The devices the driver sees, or why there are none.
pub(crate) fn devices() -> Result<Vec<CudaDeviceInfo>, String> {
    if !driver_present() {
        return Err("libcuda could not be loaded (no NVIDIA driver on this machine)".into());
    }
    result::init().map_err(|e| format!("cuInit failed: {e:?}"))?;
    let count =
        result::device::get_count().map_err(|e| format!("cuDeviceGetCount failed: {e:?}"))?;
    (0..count)
        .map(|ordinal| {
            let dev = result::device::get(ordinal)
                .map_err(|e| format!("cuDeviceGet({ordinal}): {e:?}"))?;
            let name =
                result::device::get_name(dev).map_err(|e| format!("cuDeviceGetName: {e:?}"))?;
            use sys::CUdevice_attribute::*;
            // SAFETY: `dev` is a handle the driver just returned for an ordinal below its count.
            let (total_memory, major, minor) = unsafe {
                (
                    result::device::total_mem(dev),
                    result::device::get_attribute(
                        dev,
                        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                    ),
                    result::device::get_attribute(
                        dev,
                        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                    ),
                )
            };
            let err = |e| format!("device {ordinal} attributes: {e:?}");
            Ok(CudaDeviceInfo {
                ordinal: ordinal as u32,
                name,
                total_memory: total_memory.map_err(err)?,
                compute_capability: (major.map_err(err)?, minor.map_err(err)?),
            })
        })
        .collect()
}
