// Types shared by moe-ep's kernels and mirrored, field for field, by the Rust side
// (crates/moe-ep/src/ffi/cuda_kernels.rs). Change both together.
#pragma once
#include <stdint.h>

#define EP_MAX_WORLD 16

// Flags each rank keeps, one u64 per (flag, source rank), holding the epoch last raised; except
// EP_SIG_DATA, a counter.
#define EP_SIG_ENTER 0  // a rank entered the call (dispatch: its counts are in the inbox)
#define EP_SIG_DATA 1   // the units of the rows a rank stored here in the running token-major send
                        // (kTokenRowUnits per row in moe_ep.cu), zeroed by the kernel that waited
#define EP_SIG_DATA2 2  // the second data phase of a call (combine_backward's weight gradients)
#define EP_NUM_SIGNALS 3

// After the flags, each rank's signals buffer holds its arrival counters: u32
// [world][ceil(max_tokens / EP_CHUNK_TOKENS)]. In a combine, counter (d, c) counts the rows rank d
// sent back for this rank's tokens c * EP_CHUNK_TOKENS .. + EP_CHUNK_TOKENS of the running call; in
// an expert-major dispatch, the rows d sent of its chunk c. Each row counts 8 units (kRowUnits in
// moe_ep.cu), added in shares when it travels in pieces. The kernel that waits on them resets
// them at its end.
#define EP_CHUNK_TOKENS 32
#define EP_ARRIVALS_OFFSET (EP_NUM_SIGNALS * EP_MAX_WORLD * 8)

// Error record: int[4] = {code, a, b, c}; the first error of a call wins.
#define EP_ERR_EXPERT_ID 1  // a = token, b = slot, c = id
#define EP_ERR_TIMEOUT 2    // a = waiting rank, b = missing rank, c = flag
#define EP_ERR_CAPACITY 3   // a = rank, b = rows needed, c = capacity
#define EP_ERR_ROWS 4       // a = rows needed, b = rows given (combine's y and the other per-row inputs)

// A rank's row in the inbox: its count per destination rank, per expert, then the receive slot it
// picked for the call (which part of its staging buffers peers write this call's rows into). Each
// a u64 word: the call number in the high half, the value in the low half, so a reader knows a word
// is this call's from the word alone.
#define EP_INBOX_ROW(world, E) ((world) + (E) + 1)

// Staged row metadata: source rank, token, K local slot ids (-1 elsewhere), K weights (f32 bits),
// K ranks (expert-major: slot k's place among the source's slots of its expert, in (t, k) order).
#define EP_META_INTS(K) (2 + 3 * (K))

// The route kernel ranks each slot among the source's slots of its expert with a per-warp
// histogram of every expert in shared memory (later its copy of the inbox, when that fits):
// int [warps][E] within this many ints (fewer warps as E grows); past one warp's worth, in a
// global scratch of int [32][E] the caller provides.
#define EP_RANK_SHARED_INTS 11264

// Addresses of every rank's shared buffers, as this rank maps them.
struct EpPeers {
    uint64_t signals[EP_MAX_WORLD];       // u64 [EP_NUM_SIGNALS][EP_MAX_WORLD]
    uint64_t inbox[EP_MAX_WORLD];         // u64 [2][world][EP_INBOX_ROW]
    uint64_t stage_x[EP_MAX_WORLD];       // [slots][world * max_tokens][stage_row_bytes]
    uint64_t stage_scales[EP_MAX_WORLD];  // f32 [slots][world * max_tokens][S]
    uint64_t stage_meta[EP_MAX_WORLD];    // i32 [slots][world * max_tokens][EP_META_INTS(K)]
    uint64_t back[EP_MAX_WORLD];          // combine dtype [world][max_tokens][H]
    uint64_t back_side[EP_MAX_WORLD];     // f32 [world][max_tokens][K]
};

// Expert-major rows laid out by the send kernel's receiving warps as each source's rows arrive
// (ep_dispatch_send). Addresses are this rank's; 0 for absent ones.
struct EpExpand {
    uint64_t stage_x;           // this call's receive slot: payload rows
    uint64_t stage_scales;      //   and their scales
    uint64_t stage_meta;        //   and their metadata (a dispatch, not a replay)
    uint64_t recv_base;         // i32 [world + 1]: first staged row of each source
    uint64_t group_base;        // i32 [world][E_local]: first row of (source, local expert) in the
                                // output; 0 in a replay, which reads exp_rows instead
    uint64_t offsets;           // i32 [E_local + 1]: the aligned group starts
    uint64_t per_expert;        // i32 [E_local]: rows of each group
    uint64_t exp_rows;          // i32 [world * max_tokens][K]: output row of each staged slot
    uint64_t out_x;             // [out_rows][out_row_bytes]
    uint64_t out_scales;        // f32 [out_rows][S], or 0
    uint64_t out_src;           // i32 [out_rows][3] (dispatch only, as the next four)
    uint64_t out_local_expert;  // i32 [out_rows]
    uint64_t out_weights;       // f32 [out_rows], or 0
    uint64_t row_weights;       // f32 [out_rows]: the handle's weights (1 without weights)
    uint64_t row_src;           // i32 [world * max_tokens][2]: (source, token) of each staged row
    int out_row_bytes;
    int out_rows;
    int has_weights;
    int send_warps;  // warps of each block that send; the others lay out. 0: no layout here
};

// A token-major layout run by ep_dispatch_send's blocks once their rows are out and every rank's
// rows arrived (enabled 1): the staged rows copied out (unless the output is the receive slot
// itself: out_x 0) with their metadata (unless payload_only). Addresses are this rank's.
struct EpTokenLayout {
    uint64_t stage_x;       // this call's receive slot: payload rows
    uint64_t stage_scales;  //   and their scales
    uint64_t stage_meta;    //   and their metadata
    uint64_t recv_base;     // i32 [world + 1]: first staged row of each source
    uint64_t out_x;         // [out_rows][out_row_bytes], or 0: the output is the slot
    uint64_t out_scales;    // f32 [out_rows][S], or 0
    uint64_t out_topk;      // i32 [out_rows][K] (with the next four, a dispatch only)
    uint64_t out_weights;   // f32 [out_rows][K], or 0
    uint64_t out_src;       // i32 [out_rows][2]
    uint64_t row_src;       // i32 [world * max_tokens][2]: the handle's (source, token) of each row
    uint64_t row_slots;     // i32 [world * max_tokens][K]: the handle's local slot ids of each row
    int out_row_bytes;
    int out_rows;
    int payload_only;
    int enabled;
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
