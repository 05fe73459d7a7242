// moe-ep's CUDA kernels: dispatch and combine over memory shared with peer GPUs (NVLink stores).
//
// One call of the library is a short sequence of these kernels on the caller's stream. Ranks meet
// through epoch-valued flags in each other's memory (no memset per call): a rank raises its flag on
// a peer with a system-scope release store after its data, and the peer waits for it with acquire
// loads, giving up after a deadline measured on %globaltimer and reporting which peer is missing.
//
// Arithmetic follows docs/semantics.md to the bit: widen to f32, fmaf / plain adds in the stated
// order from +0.0, one round-to-nearest-even at the end (the build passes -fmad=false so the
// compiler never fuses a product and a sum on its own).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "moe_ep.h"

namespace {

// ------------------------------------------------------------------------------------------------
// Flags, errors, timing

__device__ __forceinline__ void st_release_sys(uint64_t* p, uint64_t v) {
    asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ uint64_t ld_acquire_sys(const uint64_t* p) {
    uint64_t v;
    asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ uint64_t global_timer_ns() {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// This call's number. The first kernel of every call advances the rank's counter on the device
// (ep_route, or ep_signal_wait with begin_call), so a replayed CUDA graph numbers its calls anew.
__device__ __forceinline__ uint64_t call_epoch(const EpDims& dm) {
    return *reinterpret_cast<const volatile uint64_t*>(dm.epoch_ptr);
}

__device__ __forceinline__ uint64_t* signal_slot(uint64_t base, int sig, int src) {
    return reinterpret_cast<uint64_t*>(base) + sig * EP_MAX_WORLD + src;
}

// First error wins; later ones are dropped so the host sees the cause, not its consequences.
__device__ void report(int* err, int code, int a, int b, int c) {
    if (atomicCAS(err, 0, code) == 0) {
        err[1] = a;
        err[2] = b;
        err[3] = c;
    }
}

// Whether this rank's call must stop. A bad expert id is not such an error: the slot is dropped
// like -1 on every rank, so the call goes on consistently and only the offending rank reports it.
__device__ __forceinline__ bool failed(const int* err) {
    const int code = *reinterpret_cast<const volatile int*>(err);
    return code != 0 && code != EP_ERR_EXPERT_ID;
}

// Waits until this rank's flag `sig` from every rank reached `epoch`; one thread per peer.
// Returns false (and reports the first missing peer) on timeout.
__device__ bool wait_all(const EpDims& dm, uint64_t my_signals, int sig, int* err) {
    __shared__ int timed_out;
    if (threadIdx.x == 0) timed_out = 0;
    __syncthreads();
    if (threadIdx.x < dm.world) {
        const uint64_t* flag = signal_slot(my_signals, sig, threadIdx.x);
        const uint64_t deadline = global_timer_ns() + dm.timeout_ns;
        const uint64_t epoch = call_epoch(dm);
        while (ld_acquire_sys(flag) < epoch) {
            if (failed(err)) break;  // another wait of this call already gave up
            if (global_timer_ns() > deadline) {
                report(err, EP_ERR_TIMEOUT, dm.rank, threadIdx.x, sig);
                timed_out = 1;
                break;
            }
            __nanosleep(32);
        }
    }
    __syncthreads();
    return !timed_out && !failed(err);
}

// Raises flag `sig` of this rank on every peer (one thread per peer).
__device__ void signal_all(const EpPeers& peers, const EpDims& dm, int sig) {
    if (threadIdx.x < dm.world) {
        st_release_sys(signal_slot(peers.signals[threadIdx.x], sig, dm.rank), call_epoch(dm));
    }
}

// Called by every block at its end: once all blocks of the grid have fenced their stores, the
// last one raises `sig` on every peer. `done` returns to 0 for the next launch.
__device__ void last_block_signals(const EpPeers& peers, const EpDims& dm, unsigned* done, int sig) {
    __threadfence_system();
    __syncthreads();
    __shared__ unsigned last;
    if (threadIdx.x == 0) {
        last = atomicAdd(done, 1u) == gridDim.x - 1;
        if (last) {
            *done = 0;
            __threadfence_system();
        }
    }
    __syncthreads();
    if (last) signal_all(peers, dm, sig);
}

// ------------------------------------------------------------------------------------------------
// Block scan (exclusive), blockDim.x a multiple of 32 and at most 1024

__device__ int block_exclusive_scan(int value, int* total) {
    __shared__ int warp_sums[32];
    __shared__ int sum;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    int inclusive = value;
    for (int off = 1; off < 32; off <<= 1) {
        int v = __shfl_up_sync(0xffffffffu, inclusive, off);
        if (lane >= off) inclusive += v;
    }
    if (lane == 31) warp_sums[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
        int w = lane < warps ? warp_sums[lane] : 0;
        int wi = w;
        for (int off = 1; off < 32; off <<= 1) {
            int v = __shfl_up_sync(0xffffffffu, wi, off);
            if (lane >= off) wi += v;
        }
        if (lane < warps) warp_sums[lane] = wi - w;
        if (lane == 31) sum = wi;
    }
    __syncthreads();
    int result = warp_sums[warp] + inclusive - value;
    *total = sum;
    __syncthreads();
    return result;
}

// ------------------------------------------------------------------------------------------------
// Rows

// Copies `bytes` bytes with one warp, 16 bytes a lane when alignment allows.
__device__ __forceinline__ void warp_copy(uint8_t* dst, const uint8_t* src, int64_t bytes, int lane) {
    if (((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) | bytes) & 15) == 0) {
        int4* d = reinterpret_cast<int4*>(dst);
        const int4* s = reinterpret_cast<const int4*>(src);
        for (int64_t i = lane; i < bytes / 16; i += 32) d[i] = s[i];
    } else if (((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) | bytes) & 3) == 0) {
        int* d = reinterpret_cast<int*>(dst);
        const int* s = reinterpret_cast<const int*>(src);
        for (int64_t i = lane; i < bytes / 4; i += 32) d[i] = s[i];
    } else {
        for (int64_t i = lane; i < bytes; i += 32) dst[i] = src[i];
    }
}

__device__ __forceinline__ int64_t load_expert(const void* topk, int idx64, int64_t i) {
    return idx64 ? reinterpret_cast<const long long*>(topk)[i]
                 : static_cast<int64_t>(reinterpret_cast<const int*>(topk)[i]);
}

// The id of a slot if it is a valid expert, else -1 (invalid ids are reported by ep_route).
__device__ __forceinline__ int slot_expert(const void* topk, int idx64, int64_t i, int num_experts) {
    int64_t e = load_expert(topk, idx64, i);
    return (e >= 0 && e < num_experts) ? static_cast<int>(e) : -1;
}

template <typename T> __device__ __forceinline__ float widen(T v);
template <> __device__ __forceinline__ float widen<float>(float v) { return v; }
template <> __device__ __forceinline__ float widen<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float widen<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T narrow(float v);
template <> __device__ __forceinline__ float narrow<float>(float v) { return v; }
template <> __device__ __forceinline__ __half narrow<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

}  // namespace

// ------------------------------------------------------------------------------------------------
// Dispatch

// Source side routing. Blocks 0..world-1: block d finds, for each token t in ascending order,
// its position among the tokens going to rank d (-1 if none), and their count. Block `world`
// counts the slots of each expert and reports ids out of range. counts = [world + E].
extern "C" __global__ void ep_route(EpDims dm, const void* topk, int idx64, int num_tokens,
                                    const int* expert_rank, int* pos, int* counts, int* err) {
    const int K = dm.topk;
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        *reinterpret_cast<uint64_t*>(dm.epoch_ptr) += 1;  // a new call begins (see call_epoch)
    }
    if (blockIdx.x == dm.world) {
        for (int e = threadIdx.x; e < dm.num_experts; e += blockDim.x) counts[dm.world + e] = 0;
        __syncthreads();
        for (int64_t i = threadIdx.x; i < static_cast<int64_t>(num_tokens) * K; i += blockDim.x) {
            int64_t e = load_expert(topk, idx64, i);
            if (e >= 0 && e < dm.num_experts) {
                atomicAdd(&counts[dm.world + e], 1);
            } else if (e != -1) {
                report(err, EP_ERR_EXPERT_ID, static_cast<int>(i / K), static_cast<int>(i % K),
                       static_cast<int>(e < INT32_MIN ? INT32_MIN : (e > INT32_MAX ? INT32_MAX : e)));
            }
        }
        return;
    }
    const int d = blockIdx.x;
    int running = 0;
    for (int base = 0; base < num_tokens; base += blockDim.x) {
        const int t = base + threadIdx.x;
        int goes = 0;
        if (t < num_tokens) {
            for (int k = 0; k < K; ++k) {
                int e = slot_expert(topk, idx64, static_cast<int64_t>(t) * K + k, dm.num_experts);
                goes |= (e >= 0 && expert_rank[e] == d);
            }
        }
        int total;
        int prefix = block_exclusive_scan(goes, &total);
        if (t < num_tokens) pos[static_cast<int64_t>(t) * dm.world + d] = goes ? running + prefix : -1;
        running += total;
    }
    if (threadIdx.x == 0) counts[d] = running;
}

// One block. Publishes this rank's counts row to every rank's inbox (double-buffered by epoch
// parity), waits for every rank's row, then derives: where each source's rows start here
// (recv_base[world+1]), where this rank's rows start on each destination (my_base_on[world]), the
// count tensors of the output, the aligned expert-major offsets, and every rank's capacity check
// (all ranks compute the same verdict, so an overflow stops all of them alike).
extern "C" __global__ void ep_notify(EpPeers peers, EpDims dm, const int* counts, const int* expert_rank,
                                     const int* local_experts, const int* capacity, int align,
                                     int* recv_base, int* my_base_on, int* out_per_src,
                                     int* out_per_expert, int* out_offsets, int* err) {
    const int row = dm.world + dm.num_experts;
    const int parity = static_cast<int>(call_epoch(dm) & 1);
    for (int p = 0; p < dm.world; ++p) {
        int* inbox = reinterpret_cast<int*>(peers.inbox[p]) + (parity * dm.world + dm.rank) * row;
        for (int i = threadIdx.x; i < row; i += blockDim.x) inbox[i] = counts[i];
    }
    __threadfence_system();
    __syncthreads();
    signal_all(peers, dm, EP_SIG_ENTER);
    if (!wait_all(dm, peers.signals[dm.rank], EP_SIG_ENTER, err)) return;

    const int* in = reinterpret_cast<const int*>(peers.inbox[dm.rank]) + parity * dm.world * row;
    __shared__ int need[EP_MAX_WORLD];
    if (threadIdx.x < dm.world) {
        const int d = threadIdx.x;
        int base = 0, total = 0;
        for (int s = 0; s < dm.world; ++s) {
            if (s == dm.rank) base = total;
            total += in[s * row + d];
        }
        my_base_on[d] = base;
        need[d] = align > 0 ? 0 : total;
    }
    if (threadIdx.x == 0) {
        int at = 0;
        for (int s = 0; s < dm.world; ++s) {
            recv_base[s] = at;
            out_per_src[s] = in[s * row + dm.rank];
            at += in[s * row + dm.rank];
        }
        recv_base[dm.world] = at;
    }
    __syncthreads();
    // Expert rows: every expert's slot total, aligned, added to its owner's need.
    for (int e = threadIdx.x; align > 0 && e < dm.num_experts; e += blockDim.x) {
        int c = 0;
        for (int s = 0; s < dm.world; ++s) c += in[s * row + dm.world + e];
        atomicAdd(&need[expert_rank[e]], (c + align - 1) / align * align);
    }
    for (int g = threadIdx.x; g < dm.num_local; g += blockDim.x) {
        int c = 0;
        for (int s = 0; s < dm.world; ++s) c += in[s * row + dm.world + local_experts[g]];
        out_per_expert[g] = c;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        if (align > 0) {
            int at = 0;
            for (int g = 0; g < dm.num_local; ++g) {
                out_offsets[g] = at;
                at += (out_per_expert[g] + align - 1) / align * align;
            }
            out_offsets[dm.num_local] = at;
        }
        for (int d = 0; d < dm.world; ++d) {
            if (need[d] > capacity[d]) {
                report(err, EP_ERR_CAPACITY, d, need[d], capacity[d]);
                break;
            }
        }
    }
}

// Sends every token once to each of its destination ranks: the x row, the scales row (when
// `scales` is given: replays of gradients carry none), and (unless
// `payload_only`, i.e. a replay) the row's metadata, straight into the destination's staging
// buffers at the row the routing gave it. One warp per token.
extern "C" __global__ void ep_dispatch_send(EpPeers peers, EpDims dm, const uint8_t* x, const float* scales,
                                            const void* topk, int idx64, const float* weights,
                                            const int* expert_rank, const int* local_index, const int* pos,
                                            const int* my_base_on, int num_tokens, int payload_only,
                                            unsigned* done, int* err) {
    const int lane = threadIdx.x & 31;
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int warps = (gridDim.x * blockDim.x) >> 5;
    const int K = dm.topk, S = dm.scale_cols;
    if (!failed(err)) {
        for (int t = warp; t < num_tokens; t += warps) {
            for (int d = 0; d < dm.world; ++d) {
                const int p = pos[static_cast<int64_t>(t) * dm.world + d];
                if (p < 0) continue;
                const int64_t row = my_base_on[d] + p;
                warp_copy(reinterpret_cast<uint8_t*>(peers.stage_x[d]) + row * dm.stage_row_bytes,
                          x + static_cast<int64_t>(t) * dm.x_row_bytes, dm.x_row_bytes, lane);
                if (S > 0 && scales) {
                    float* dst = reinterpret_cast<float*>(peers.stage_scales[d]) + row * S;
                    for (int i = lane; i < S; i += 32) dst[i] = scales[static_cast<int64_t>(t) * S + i];
                }
                if (!payload_only) {
                    int* meta = reinterpret_cast<int*>(peers.stage_meta[d]) + row * EP_META_INTS(K);
                    if (lane == 0) {
                        meta[0] = dm.rank;
                        meta[1] = t;
                    }
                    for (int k = lane; k < K; k += 32) {
                        int e = slot_expert(topk, idx64, static_cast<int64_t>(t) * K + k, dm.num_experts);
                        bool here = e >= 0 && expert_rank[e] == d;
                        meta[2 + k] = here ? local_index[e] : -1;
                        float w = (here && weights) ? weights[static_cast<int64_t>(t) * K + k] : 0.f;
                        meta[2 + K + k] = __float_as_int(w);
                    }
                }
            }
        }
    }
    last_block_signals(peers, dm, done, EP_SIG_DATA);
}

// One block: with `begin_call`, first advances the call number (the first kernel of a call);
// raises `sig` on every peer when `raise` is set, then waits for every peer's `sig`. A barrier when
// both; the wait for data when only waiting.
extern "C" __global__ void ep_signal_wait(EpPeers peers, EpDims dm, int sig, int raise, int begin_call, int* err) {
    if (begin_call) {
        if (threadIdx.x == 0) *reinterpret_cast<uint64_t*>(dm.epoch_ptr) += 1;
        __syncthreads();
    }
    if (raise) {
        __threadfence_system();
        __syncthreads();
        signal_all(peers, dm, sig);
    }
    wait_all(dm, peers.signals[dm.rank], sig, err);
}

// Token-major layout: staged rows are already in (source, token) order; copy them out, with their
// metadata unless `payload_only`. Also keeps, for the handle, each row's (source, token) and
// local slot ids. One warp per row.
extern "C" __global__ void ep_layout_token_major(EpDims dm, const uint8_t* stage_x, const float* stage_scales,
                                                 const int* stage_meta, const int* recv_base, int payload_only,
                                                 int out_row_bytes, uint8_t* out_x, float* out_scales,
                                                 int* out_topk, float* out_weights, int* out_src,
                                                 int* row_src, int* row_slots, const int* err) {
    if (failed(err)) return;
    const int lane = threadIdx.x & 31;
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int warps = (gridDim.x * blockDim.x) >> 5;
    const int K = dm.topk, S = dm.scale_cols, rows = recv_base[dm.world];
    for (int j = warp; j < rows; j += warps) {
        warp_copy(out_x + static_cast<int64_t>(j) * out_row_bytes,
                  stage_x + static_cast<int64_t>(j) * dm.stage_row_bytes, out_row_bytes, lane);
        for (int i = lane; out_scales && i < S; i += 32)
            out_scales[static_cast<int64_t>(j) * S + i] = stage_scales[static_cast<int64_t>(j) * S + i];
        if (payload_only) continue;
        const int* meta = stage_meta + static_cast<int64_t>(j) * EP_META_INTS(K);
        if (lane < 2) {
            out_src[2 * j + lane] = meta[lane];
            row_src[2 * j + lane] = meta[lane];
        }
        for (int k = lane; k < K; k += 32) {
            out_topk[static_cast<int64_t>(j) * K + k] = meta[2 + k];
            row_slots[static_cast<int64_t>(j) * K + k] = meta[2 + k];
            if (out_weights) out_weights[static_cast<int64_t>(j) * K + k] = __int_as_float(meta[2 + K + k]);
        }
    }
}

// Expert-major layout, metadata part: block g walks the staged rows in (source, token) order and
// gives each slot of local expert g the next row of group g, so groups keep (s, t, k) order.
// Records the expansion `exp_rows[j * K + k]` (preset to -1) and each row's weight for the handle.
extern "C" __global__ void ep_layout_expert_major(EpDims dm, const int* stage_meta, const int* recv_base,
                                                  const int* offsets, int has_weights, float* out_weights,
                                                  int* out_src, int* out_local_expert, int* exp_rows,
                                                  float* row_weights, int* row_src, const int* err) {
    if (failed(err)) return;
    const int g = blockIdx.x, K = dm.topk, rows = recv_base[dm.world];
    int running = offsets[g];
    for (int base = 0; base < rows; base += blockDim.x) {
        const int j = base + threadIdx.x;
        const int* meta = stage_meta + static_cast<int64_t>(j) * EP_META_INTS(K);
        int mine = 0;
        if (j < rows) {
            for (int k = 0; k < K; ++k) mine += meta[2 + k] == g;
        }
        int total;
        int at = running + block_exclusive_scan(mine, &total);
        if (j < rows) {
            if (g == 0) {
                row_src[2 * j] = meta[0];
                row_src[2 * j + 1] = meta[1];
            }
            for (int k = 0; k < K && mine > 0; ++k) {
                if (meta[2 + k] != g) continue;
                const float w = __int_as_float(meta[2 + K + k]);
                exp_rows[static_cast<int64_t>(j) * K + k] = at;
                out_src[3 * at] = meta[0];
                out_src[3 * at + 1] = meta[1];
                out_src[3 * at + 2] = k;
                out_local_expert[at] = g;
                if (out_weights) out_weights[at] = w;
                row_weights[at] = has_weights ? w : 1.f;
                ++at;
            }
        }
        running += total;
    }
}

// Expert-major layout, payload part: copies staged row j to every row its slots expand to.
// One warp per staged row.
extern "C" __global__ void ep_expand_rows(EpDims dm, const uint8_t* stage_x, const float* stage_scales,
                                          const int* recv_base, const int* exp_rows, int out_row_bytes,
                                          uint8_t* out_x, float* out_scales, const int* err) {
    if (failed(err)) return;
    const int lane = threadIdx.x & 31;
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int warps = (gridDim.x * blockDim.x) >> 5;
    const int K = dm.topk, S = dm.scale_cols, rows = recv_base[dm.world];
    for (int j = warp; j < rows; j += warps) {
        for (int k = 0; k < K; ++k) {
            const int r = exp_rows[static_cast<int64_t>(j) * K + k];
            if (r < 0) continue;
            warp_copy(out_x + static_cast<int64_t>(r) * out_row_bytes,
                      stage_x + static_cast<int64_t>(j) * dm.stage_row_bytes, out_row_bytes, lane);
            for (int i = lane; out_scales && i < S; i += 32)
                out_scales[static_cast<int64_t>(r) * S + i] = stage_scales[static_cast<int64_t>(j) * S + i];
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Combine and the backward ops

// The per-row tensors handed back (y, gradients, weights) must cover every row dispatch produced
// here: token-major the received tokens, expert-major the padded total. Only the device knows that
// count, so the check is here; on failure nothing is read.
__device__ bool rows_cover(const EpDims& dm, const int* recv_base, const int* offsets, int rows_given, int* err) {
    const int needed = offsets ? offsets[dm.num_local] : recv_base[dm.world];
    if (needed > rows_given) {
        if (blockIdx.x == 0 && threadIdx.x == 0) report(err, EP_ERR_ROWS, needed, rows_given, 0);
        return false;
    }
    return true;
}

// What travels back beside each row, [K] f32 per (token, destination).
enum SideMode {
    SIDE_NONE = 0,
    SIDE_ROW_K = 1,        // token-major: side[j][k] as given ([rows, K])
    SIDE_ROW_K_OWNED = 2,  // token-major: side[j][k] where slot k's expert is here, else 0
    SIDE_EXPANDED = 3,     // expert-major: side[exp_rows[j][k]] ([rows]), 0 where slot k is elsewhere
};

// Each expert rank sends, for every staged row j (source s, token t), one row back to s: token-
// major y[j] itself; expert-major the partial sum over j's expansions in ascending slot order of
// w(row) * y[row] (fmaf from +0.0), rounded once. `weights`: per-row weights overriding the
// recorded `row_weights` (expert-major), or null; `unit_weights` makes every weight 1 (plain adds).
// One block per staged row; each thread owns a strided set of elements.
template <typename T>
__device__ void combine_send(const EpPeers& peers, const EpDims& dm, const T* y, const float* weights,
                             const float* row_weights, int unit_weights, const int* recv_base,
                             const int* row_src, const int* row_slots, const int* exp_rows, const float* side,
                             int side_mode, const int* offsets, int rows_given, unsigned* done, int* err) {
    const int K = dm.topk, H = dm.hidden, rows = recv_base[dm.world];
    const bool expert_major = offsets != nullptr;
    // Too few rows handed back: send nothing and raise no flag, so the sources time out naming
    // this rank rather than reduce rows it never sent.
    if (!rows_cover(dm, recv_base, offsets, rows_given, err)) return;
    if (!failed(err)) {
        for (int j = blockIdx.x; j < rows; j += gridDim.x) {
            const int s = row_src[2 * j];
            const int64_t slot = static_cast<int64_t>(dm.rank) * dm.max_tokens + (j - recv_base[s]);
            T* dst = reinterpret_cast<T*>(peers.back[s]) + slot * H;
            const int* er = exp_rows + static_cast<int64_t>(j) * K;
            for (int h = threadIdx.x; h < H; h += blockDim.x) {
                if (!expert_major) {
                    dst[h] = y[static_cast<int64_t>(j) * H + h];
                    continue;
                }
                float acc = 0.f;
                for (int k = 0; k < K; ++k) {
                    const int r = er[k];
                    if (r < 0) continue;
                    const float v = widen(y[static_cast<int64_t>(r) * H + h]);
                    if (unit_weights) {
                        acc = acc + v;
                    } else {
                        const float w = weights ? weights[r] : row_weights[r];
                        acc = fmaf(w, v, acc);
                    }
                }
                dst[h] = narrow<T>(acc);
            }
            if (side_mode != SIDE_NONE) {
                float* sd = reinterpret_cast<float*>(peers.back_side[s]) + slot * K;
                for (int k = threadIdx.x; k < K; k += blockDim.x) {
                    float v = 0.f;
                    if (side_mode == SIDE_ROW_K) {
                        v = side[static_cast<int64_t>(j) * K + k];
                    } else if (side_mode == SIDE_ROW_K_OWNED) {
                        if (row_slots[static_cast<int64_t>(j) * K + k] >= 0) v = side[static_cast<int64_t>(j) * K + k];
                    } else if (er[k] >= 0) {
                        v = side[er[k]];
                    }
                    sd[k] = v;
                }
            }
        }
    }
    last_block_signals(peers, dm, done, EP_SIG_DATA);
}

// Source side: out[t] = sum over destinations d ascending (those with pos[t][d] >= 0) of the row
// d sent back, f32 from +0.0, rounded once; the [K] side values likewise into out_side.
// One block per token.
template <typename T>
__device__ void combine_reduce(const EpDims& dm, const T* back, const float* back_side, const int* pos,
                               int num_tokens, T* out, float* out_side, const int* err) {
    if (failed(err)) return;
    const int K = dm.topk, H = dm.hidden;
    for (int t = blockIdx.x; t < num_tokens; t += gridDim.x) {
        const int* p = pos + static_cast<int64_t>(t) * dm.world;
        if (out) {
            for (int h = threadIdx.x; h < H; h += blockDim.x) {
                float acc = 0.f;
                for (int d = 0; d < dm.world; ++d) {
                    if (p[d] < 0) continue;
                    acc = acc + widen(back[(static_cast<int64_t>(d) * dm.max_tokens + p[d]) * H + h]);
                }
                out[static_cast<int64_t>(t) * H + h] = narrow<T>(acc);
            }
        }
        if (out_side) {
            for (int k = threadIdx.x; k < K; k += blockDim.x) {
                float acc = 0.f;
                for (int d = 0; d < dm.world; ++d) {
                    if (p[d] < 0) continue;
                    acc = acc + back_side[(static_cast<int64_t>(d) * dm.max_tokens + p[d]) * K + k];
                }
                out_side[static_cast<int64_t>(t) * K + k] = acc;
            }
        }
    }
}

// Expert-major combine_backward on the expert rank: grad_y[row] = round(w(row) * g) for each row
// the staged gradient row j expands to; with y, also the weight gradient dot(g, y[row]) in the
// warp's order (lane l sums h = l, l+32, ... with fmaf; lanes fold by halves), sent back to the
// source as side values ([K] per staged row, 0 for slots elsewhere). One warp per staged row.
template <typename T>
__device__ void combine_backward_expert(const EpPeers& peers, const EpDims& dm, const T* stage_g, const T* y,
                                        const float* row_weights, const int* recv_base, const int* row_src,
                                        const int* exp_rows, const int* offsets, int rows_given, T* grad_y,
                                        unsigned* done, int* err) {
    const int lane = threadIdx.x & 31;
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int warps = (gridDim.x * blockDim.x) >> 5;
    const int K = dm.topk, H = dm.hidden, rows = recv_base[dm.world];
    const int64_t stage_elems = dm.stage_row_bytes / static_cast<int64_t>(sizeof(T));
    if (y && !rows_cover(dm, recv_base, offsets, rows_given, err)) return;  // as in combine_send
    if (!failed(err)) {
        for (int j = warp; j < rows; j += warps) {
            const T* g = stage_g + static_cast<int64_t>(j) * stage_elems;
            const int s = row_src[2 * j];
            const int64_t slot = static_cast<int64_t>(dm.rank) * dm.max_tokens + (j - recv_base[s]);
            float* sd = y ? reinterpret_cast<float*>(peers.back_side[s]) + slot * K : nullptr;
            for (int k = 0; k < K; ++k) {
                const int r = exp_rows[static_cast<int64_t>(j) * K + k];
                if (r < 0) {
                    if (sd && lane == 0) sd[k] = 0.f;
                    continue;
                }
                const float w = row_weights[r];
                float acc = 0.f;
                for (int h = lane; h < H; h += 32) {
                    const float gv = widen(g[h]);
                    grad_y[static_cast<int64_t>(r) * H + h] = narrow<T>(w * gv);
                    if (y) acc = fmaf(gv, widen(y[static_cast<int64_t>(r) * H + h]), acc);
                }
                if (sd) {
                    for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
                    if (lane == 0) sd[k] = acc;
                }
            }
        }
    }
    if (y) last_block_signals(peers, dm, done, EP_SIG_DATA2);
}

#define EP_INSTANTIATE(SUFFIX, T)                                                                          \
    extern "C" __global__ void ep_combine_send_##SUFFIX(                                                   \
        EpPeers peers, EpDims dm, const T* y, const float* weights, const float* row_weights,              \
        int unit_weights, const int* recv_base, const int* row_src, const int* row_slots,                  \
        const int* exp_rows, const float* side, int side_mode, const int* offsets, int rows_given,         \
        unsigned* done, int* err) {                                                                        \
        combine_send<T>(peers, dm, y, weights, row_weights, unit_weights, recv_base, row_src, row_slots,   \
                        exp_rows, side, side_mode, offsets, rows_given, done, err);                        \
    }                                                                                                      \
    extern "C" __global__ void ep_combine_reduce_##SUFFIX(EpDims dm, const T* back, const float* back_side, \
                                                          const int* pos, int num_tokens, T* out,          \
                                                          float* out_side, const int* err) {               \
        combine_reduce<T>(dm, back, back_side, pos, num_tokens, out, out_side, err);                       \
    }                                                                                                      \
    extern "C" __global__ void ep_combine_backward_expert_##SUFFIX(                                        \
        EpPeers peers, EpDims dm, const T* stage_g, const T* y, const float* row_weights,                  \
        const int* recv_base, const int* row_src, const int* exp_rows, const int* offsets, int rows_given,  \
        T* grad_y, unsigned* done, int* err) {                                                             \
        combine_backward_expert<T>(peers, dm, stage_g, y, row_weights, recv_base, row_src, exp_rows,       \
                                   offsets, rows_given, grad_y, done, err);                                \
    }

EP_INSTANTIATE(bf16, __nv_bfloat16)
EP_INSTANTIATE(f16, __half)
EP_INSTANTIATE(f32, float)
