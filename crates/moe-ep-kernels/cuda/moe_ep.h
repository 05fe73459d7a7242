// Types shared by moe-ep's kernels and mirrored, field for field, by the Rust side
// (crates/moe-ep/src/ffi/cuda_kernels.rs). Change both together.
#pragma once
#include <stdint.h>

#define EP_MAX_WORLD 16

// Flags each rank keeps, one u64 per (flag, source rank), holding the epoch last raised.
#define EP_SIG_ENTER 0  // a rank entered the call (dispatch: its counts are in the inbox)
#define EP_SIG_DATA 1   // a rank's rows of this call are in the receiver's buffers
#define EP_SIG_DATA2 2  // the second data phase of a call (combine_backward's weight gradients)
#define EP_NUM_SIGNALS 3

// After the flags, each rank's signals buffer holds its combine arrival counters: u32
// [world][ceil(max_tokens / EP_CHUNK_TOKENS)], counter (d, c) = rows rank d sent back for this
// rank's tokens c * EP_CHUNK_TOKENS .. + EP_CHUNK_TOKENS of the running call. The combine reduces a
// chunk as soon as its counters are full, and resets them at its end.
#define EP_CHUNK_TOKENS 32
#define EP_ARRIVALS_OFFSET (EP_NUM_SIGNALS * EP_MAX_WORLD * 8)

// Error record: int[4] = {code, a, b, c}; the first error of a call wins.
#define EP_ERR_EXPERT_ID 1  // a = token, b = slot, c = id
#define EP_ERR_TIMEOUT 2    // a = waiting rank, b = missing rank, c = flag
#define EP_ERR_CAPACITY 3   // a = rank, b = rows needed, c = capacity
#define EP_ERR_ROWS 4       // a = rows needed, b = rows given (combine's y and the other per-row inputs)

// A rank's row in the inbox: its count per destination rank, per expert, then the receive slot it
// picked for the call (which part of its staging buffers peers write this call's rows into).
#define EP_INBOX_ROW(world, E) ((world) + (E) + 1)

// Staged row metadata: source rank, token, K local slot ids (-1 elsewhere), K weights (f32 bits).
#define EP_META_INTS(K) (2 + 2 * (K))

// Addresses of every rank's shared buffers, as this rank maps them.
struct EpPeers {
    uint64_t signals[EP_MAX_WORLD];       // u64 [EP_NUM_SIGNALS][EP_MAX_WORLD]
    uint64_t inbox[EP_MAX_WORLD];         // i32 [2][world][EP_INBOX_ROW]
    uint64_t stage_x[EP_MAX_WORLD];       // [slots][world * max_tokens][stage_row_bytes]
    uint64_t stage_scales[EP_MAX_WORLD];  // f32 [slots][world * max_tokens][S]
    uint64_t stage_meta[EP_MAX_WORLD];    // i32 [slots][world * max_tokens][EP_META_INTS(K)]
    uint64_t back[EP_MAX_WORLD];          // combine dtype [world][max_tokens][H]
    uint64_t back_side[EP_MAX_WORLD];     // f32 [world][max_tokens][K]
};

struct EpDims {
    int rank;
    int world;
    int num_experts;
    int num_local;
    int topk;
    int hidden;
    int scale_cols;
    int max_tokens;
    int x_row_bytes;      // H * sizeof(dispatch dtype)
    int stage_row_bytes;  // H * max(sizeof(dispatch dtype), sizeof(combine dtype))
    int begins_call;      // 1: this kernel is its call's first: the call number is the counter + 1,
                          // and the kernel's last block stores it (see call_epoch)
    int reserved;
    uint64_t epoch_ptr;   // u64 on this rank's device: the call number, the same on every rank
    uint64_t my_signals;  // this rank's flags (peers.signals[rank]), for kernels that only wait
    uint64_t timeout_ns;
};
