//! The buffers each rank shares with its peers, at fixed addresses for the dispatcher's life.

use crate::config::EpConfig;
use crate::ffi::cuda_kernels::{meta_ints, MAX_WORLD, NUM_SIGNALS};
use crate::ffi::cuda_memory::{SharedBuffer, IPC_HANDLE_BYTES};
use cudarc::driver::CudaContext;
use std::sync::Arc;

pub(crate) struct SharedBuffers {
    /// u64 [NUM_SIGNALS][MAX_WORLD]: the epoch each peer last raised each flag to.
    pub signals: SharedBuffer,
    /// i32 [2][world][world + E]: every rank's counts, double-buffered by call parity.
    pub inbox: SharedBuffer,
    /// [world * max_tokens][stage_row_bytes]: rows sent here, token-major.
    pub stage_x: SharedBuffer,
    /// f32 [world * max_tokens][S].
    pub stage_scales: SharedBuffer,
    /// i32 [world * max_tokens][2 + 2K]: (source, token, local slot ids, weights).
    pub stage_meta: SharedBuffer,
    /// combine dtype [world][max_tokens][H]: rows sent back here, per destination.
    pub back: SharedBuffer,
    /// f32 [world][max_tokens][K].
    pub back_side: SharedBuffer,
    /// Bytes of a staged row: room for a row of either the dispatch or the combine dtype.
    pub stage_row_bytes: usize,
}

impl SharedBuffers {
    pub(crate) fn new(ctx: &Arc<CudaContext>, c: &EpConfig, world: usize) -> Result<Self, String> {
        let rows = world * c.max_tokens_per_rank;
        let stage_row_bytes = c.hidden * c.dtype.size().max(c.combine_dtype.size());
        Ok(SharedBuffers {
            signals: SharedBuffer::zeroed(ctx, NUM_SIGNALS * MAX_WORLD * 8)?,
            inbox: SharedBuffer::zeroed(ctx, 2 * world * (world + c.num_experts) * 4)?,
            stage_x: SharedBuffer::zeroed(ctx, rows * stage_row_bytes)?,
            stage_scales: SharedBuffer::zeroed(ctx, rows * c.scale_columns * 4)?,
            stage_meta: SharedBuffer::zeroed(ctx, rows * meta_ints(c.topk) * 4)?,
            back: SharedBuffer::zeroed(ctx, rows * c.hidden * c.combine_dtype.size())?,
            back_side: SharedBuffer::zeroed(ctx, rows * c.topk * 4)?,
            stage_row_bytes,
        })
    }

    fn in_order(&self) -> [&SharedBuffer; 7] {
        [
            &self.signals,
            &self.inbox,
            &self.stage_x,
            &self.stage_scales,
            &self.stage_meta,
            &self.back,
            &self.back_side,
        ]
    }

    /// Addresses in the order of `EpPeers`' fields.
    pub(crate) fn addresses(&self) -> [u64; 7] {
        self.in_order().map(SharedBuffer::ptr)
    }

    /// CUDA IPC handles in the order of `EpPeers`' fields, for ranks in other processes.
    pub(crate) fn ipc_handles(&self) -> Result<Vec<[u8; IPC_HANDLE_BYTES]>, String> {
        self.in_order().iter().map(|b| b.ipc_handle()).collect()
    }
}
