//! The buffers each rank shares with its peers, at fixed addresses for the dispatcher's life.

use crate::config::EpConfig;
use crate::ffi::cuda_kernels::{meta_ints, CHUNK_TOKENS, MAX_WORLD, NUM_SIGNALS};
use crate::ffi::cuda_memory::{SharedBuffer, IPC_HANDLE_BYTES};
use crate::ffi::cuda_stream::Stream;

/// Receive slots: each call's rows land in one slot of the staging buffers, which the receiver
/// picks and tells its peers. A token-major output can then be handed out as the slot itself
/// (no copy) while another slot takes the next calls; see `CudaBackend::pick_slot`.
pub(crate) const STAGE_SLOTS: usize = 2;

pub(crate) struct SharedBuffers {
    /// u64 [NUM_SIGNALS][MAX_WORLD]: the epoch each peer last raised each flag to; then the
    /// arrival counters (combine, expert-major dispatch), u32 [world][ceil(max_tokens /
    /// CHUNK_TOKENS)].
    pub signals: SharedBuffer,
    /// u64 [2][world][inbox_row(world, E)]: every rank's counts and receive slot, double-buffered
    /// by call parity, each word tagged with its call number (EP_INBOX_ROW in moe_ep.h).
    pub inbox: SharedBuffer,
    /// [STAGE_SLOTS][world * max_tokens][stage_row_bytes]: rows sent here, token-major.
    pub stage_x: SharedBuffer,
    /// f32 [STAGE_SLOTS][world * max_tokens][S].
    pub stage_scales: SharedBuffer,
    /// i32 [STAGE_SLOTS][world * max_tokens][2 + 3K]: (source, token, local slot ids, weights,
    /// expert-major ranks).
    pub stage_meta: SharedBuffer,
    /// combine dtype [world][max_tokens][H]: rows sent back here, per destination.
    pub back: SharedBuffer,
    /// f32 [world][max_tokens][K].
    pub back_side: SharedBuffer,
    /// Bytes of a staged row: room for a row of either the dispatch or the combine dtype.
    pub stage_row_bytes: usize,
    /// Rows of one receive slot: world * max_tokens.
    pub slot_rows: usize,
    scale_columns: usize,
    meta_ints: usize,
}

/// Words of a rank's row in the inbox: its count per destination and per expert, then the receive
/// slot it picked for the call (EP_INBOX_ROW in moe_ep.h).
pub(crate) fn inbox_row(world: usize, num_experts: usize) -> usize {
    world + num_experts + 1
}

/// Addresses of one receive slot's staging rows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SlotAddresses {
    pub x: u64,
    pub scales: u64,
    pub meta: u64,
}

impl SharedBuffers {
    pub(crate) fn new(stream: &Stream, c: &EpConfig, world: usize) -> Result<Self, String> {
        let rows = world * c.max_tokens_per_rank;
        let staged = STAGE_SLOTS * rows;
        let stage_row_bytes = c.hidden * c.dtype.size().max(c.combine_dtype.size());
        Ok(SharedBuffers {
            signals: SharedBuffer::zeroed(
                stream,
                NUM_SIGNALS * MAX_WORLD * 8
                    + world * c.max_tokens_per_rank.div_ceil(CHUNK_TOKENS) * 4,
            )?,
            inbox: SharedBuffer::zeroed(stream, 2 * world * inbox_row(world, c.num_experts) * 8)?,
            stage_x: SharedBuffer::zeroed(stream, staged * stage_row_bytes)?,
            stage_scales: SharedBuffer::zeroed(stream, staged * c.scale_columns * 4)?,
            stage_meta: SharedBuffer::zeroed(stream, staged * meta_ints(c.topk) * 4)?,
            back: SharedBuffer::zeroed(stream, rows * c.hidden * c.combine_dtype.size())?,
            back_side: SharedBuffer::zeroed(stream, rows * c.topk * 4)?,
            stage_row_bytes,
            slot_rows: rows,
            scale_columns: c.scale_columns,
            meta_ints: meta_ints(c.topk),
        })
    }

    /// Where receive slot `slot` starts in each staging buffer.
    pub(crate) fn slot(&self, slot: usize) -> SlotAddresses {
        let rows = (slot * self.slot_rows) as u64;
        SlotAddresses {
            x: self.stage_x.ptr() + rows * self.stage_row_bytes as u64,
            scales: self.stage_scales.ptr() + rows * self.scale_columns as u64 * 4,
            meta: self.stage_meta.ptr() + rows * self.meta_ints as u64 * 4,
        }
    }

    /// Byte offsets of receive slot `slot` in stage_x and stage_scales.
    pub(crate) fn slot_offsets(&self, slot: usize) -> (usize, usize) {
        let rows = slot * self.slot_rows;
        (rows * self.stage_row_bytes, rows * self.scale_columns * 4)
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
