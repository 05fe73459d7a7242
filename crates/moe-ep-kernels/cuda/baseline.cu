// Kernels of the benchmark baselines (crates/moe-ep/src/baseline): the token permutation of
// Megatron's all-to-all dispatcher and of the all-gather-then-select path, and their weighted
// un-permute. They are not on the library's data path. moe_ep.cu includes this file at its end so
// that one fatbin holds every kernel; the helpers live in their own namespace so that they never
// clash with moe_ep.cu's.
//
// A slot is one (token, k) entry of a [tokens, K] table of expert ids. A per-expert table maps each
// slot to a bucket (a small integer) or to -1 (the slot is not moved). Rows are laid out by bucket,
// then by slot index: a stable counting sort in three kernels (count per chunk of slots, scan,
// place), so the layout is deterministic and the host can state it exactly.
//
// Arithmetic of the weighted sum follows docs/semantics.md: widen to f32, fmaf over k ascending
// from +0.0, round once to nearest even (the build passes -fmad=false).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace ep_baseline {

// The slot's bucket, or -1 for a dropped slot (-1), an id out of range, or an expert whose table
// entry is -1.
__device__ __forceinline__ int bucket_of(const int* idx, long long slot, const int* bucket_of_expert,
                                         int num_experts) {
    const int e = idx[slot];
    return (e >= 0 && e < num_experts) ? bucket_of_expert[e] : -1;
}

// One warp copies one row: 16-byte accesses when both rows and the length allow it.
__device__ __forceinline__ void copy_row(uint8_t* dst, const uint8_t* src, long long bytes, int lane) {
    const uintptr_t align = reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) |
                            static_cast<uintptr_t>(bytes);
    if ((align & 15) == 0) {
        const int4* s = reinterpret_cast<const int4*>(src);
        int4* d = reinterpret_cast<int4*>(dst);
        for (long long i = lane; i < bytes / 16; i += 32) d[i] = s[i];
    } else {
        for (long long i = lane; i < bytes; i += 32) dst[i] = src[i];
    }
}

__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(float v) { return v; }

template <class T>
__device__ __forceinline__ T narrow(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half narrow<__half>(float v) {
    return __float2half_rn(v);
}
template <>
__device__ __forceinline__ float narrow<float>(float v) {
    return v;
}

// out[t] = sum over k ascending of the slots of token t with slot_row >= 0 of
// weights[t, k] * rows[slot_row[t, k]], in f32 with one fmaf per term from +0.0, rounded once.
// One warp per token; each lane owns 16 bytes of the row at a time.
template <class T>
__device__ void weighted_sum(const T* rows, const int* slot_row, const float* weights, int num_tokens,
                             int topk, int hidden, T* out) {
    constexpr int V = 16 / sizeof(T);
    const int lane = threadIdx.x & 31;
    const long long warp = (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
    const long long warps = (static_cast<long long>(gridDim.x) * blockDim.x) >> 5;
    const bool vec = hidden % V == 0 &&
                     ((reinterpret_cast<uintptr_t>(rows) | reinterpret_cast<uintptr_t>(out)) & 15) == 0;
    for (long long t = warp; t < num_tokens; t += warps) {
        const int* sr = slot_row + t * topk;
        const float* w = weights + t * topk;
        T* o = out + t * hidden;
        if (vec) {
            for (int j = lane; j < hidden / V; j += 32) {
                float acc[V];
#pragma unroll
                for (int i = 0; i < V; ++i) acc[i] = 0.0f;
                for (int k = 0; k < topk; ++k) {
                    const int r = sr[k];
                    if (r < 0) continue;
                    const float wk = w[k];
                    const int4 raw = reinterpret_cast<const int4*>(rows + static_cast<long long>(r) * hidden)[j];
                    const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
                    for (int i = 0; i < V; ++i) acc[i] = fmaf(wk, widen(v[i]), acc[i]);
                }
                int4 packed;
                T* p = reinterpret_cast<T*>(&packed);
#pragma unroll
                for (int i = 0; i < V; ++i) p[i] = narrow<T>(acc[i]);
                reinterpret_cast<int4*>(o)[j] = packed;
            }
        } else {
            for (int h = lane; h < hidden; h += 32) {
                float acc = 0.0f;
                for (int k = 0; k < topk; ++k) {
                    const int r = sr[k];
                    if (r < 0) continue;
                    acc = fmaf(w[k], widen(rows[static_cast<long long>(r) * hidden + h]), acc);
                }
                o[h] = narrow<T>(acc);
            }
        }
    }
}

}  // namespace ep_baseline

// Counts each chunk's slots per bucket. One block per chunk of `chunk_slots` slots; dynamic shared
// memory: num_buckets ints. chunk_counts: int [gridDim.x][num_buckets].
extern "C" __global__ void ep_baseline_bucket_count(const int* idx, long long num_slots,
                                                    const int* bucket_of_expert, int num_experts,
                                                    int num_buckets, int chunk_slots, int* chunk_counts) {
    extern __shared__ int counts[];
    for (int b = threadIdx.x; b < num_buckets; b += blockDim.x) counts[b] = 0;
    __syncthreads();
    const long long start = static_cast<long long>(blockIdx.x) * chunk_slots;
    const long long end = min(start + chunk_slots, num_slots);
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
        const int b = ep_baseline::bucket_of(idx, i, bucket_of_expert, num_experts);
        if (b >= 0) atomicAdd(&counts[b], 1);
    }
    __syncthreads();
    int* mine = chunk_counts + static_cast<long long>(blockIdx.x) * num_buckets;
    for (int b = threadIdx.x; b < num_buckets; b += blockDim.x) mine[b] = counts[b];
}

// One block (a multiple of 32 threads). Turns chunk_counts into the first row of each (chunk,
// bucket), writes bucket_start [num_buckets + 1] (exclusive scan of the bucket totals, the total
// last) and, for groups of consecutive buckets [group_start[g], group_start[g + 1]), the rows of
// each group into group_rows [num_groups].
extern "C" __global__ void ep_baseline_bucket_scan(int* chunk_counts, int num_chunks, int num_buckets,
                                                   const int* group_start, int num_groups, int* bucket_start,
                                                   int* group_rows) {
    for (int b = threadIdx.x; b < num_buckets; b += blockDim.x) {
        int sum = 0;
        for (int c = 0; c < num_chunks; ++c) sum += chunk_counts[static_cast<long long>(c) * num_buckets + b];
        bucket_start[b] = sum;
    }
    __syncthreads();
    __shared__ int warp_sums[32];
    __shared__ int carry;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    if (threadIdx.x == 0) carry = 0;
    __syncthreads();
    for (int base = 0; base < num_buckets; base += blockDim.x) {
        const int b = base + threadIdx.x;
        const int v = b < num_buckets ? bucket_start[b] : 0;
        int x = v;
        for (int o = 1; o < 32; o <<= 1) {
            const int y = __shfl_up_sync(0xffffffffu, x, o);
            if (lane >= o) x += y;
        }
        if (lane == 31) warp_sums[warp] = x;
        __syncthreads();
        if (warp == 0) {
            int s = lane < warps ? warp_sums[lane] : 0;
            for (int o = 1; o < 32; o <<= 1) {
                const int y = __shfl_up_sync(0xffffffffu, s, o);
                if (lane >= o) s += y;
            }
            warp_sums[lane] = s;
        }
        __syncthreads();
        const int before = carry + (warp > 0 ? warp_sums[warp - 1] : 0) + x - v;
        if (b < num_buckets) bucket_start[b] = before;
        __syncthreads();
        if (threadIdx.x == blockDim.x - 1) carry = before + v;
        __syncthreads();
    }
    if (threadIdx.x == 0) bucket_start[num_buckets] = carry;
    __syncthreads();
    for (int b = threadIdx.x; b < num_buckets; b += blockDim.x) {
        int run = bucket_start[b];
        for (int c = 0; c < num_chunks; ++c) {
            int* cell = chunk_counts + static_cast<long long>(c) * num_buckets + b;
            const int n = *cell;
            *cell = run;
            run += n;
        }
    }
    for (int g = threadIdx.x; g < num_groups; g += blockDim.x) {
        group_rows[g] = bucket_start[group_start[g + 1]] - bucket_start[group_start[g]];
    }
}

// Each slot's row (-1 when it has no bucket): its (chunk, bucket)'s first row plus the slots of that
// bucket before it in the chunk. One warp per chunk walks it in order, 32 slots at a time; dynamic
// shared memory: num_buckets ints. chunk_start: the scanned chunk_counts.
extern "C" __global__ void ep_baseline_bucket_place(const int* idx, long long num_slots,
                                                    const int* bucket_of_expert, int num_experts,
                                                    int num_buckets, int chunk_slots, const int* chunk_start,
                                                    int* slot_row) {
    extern __shared__ int next_row[];
    const int lane = threadIdx.x;
    const int* mine = chunk_start + static_cast<long long>(blockIdx.x) * num_buckets;
    for (int b = lane; b < num_buckets; b += 32) next_row[b] = mine[b];
    __syncwarp();
    const long long start = static_cast<long long>(blockIdx.x) * chunk_slots;
    const long long end = min(start + chunk_slots, num_slots);
    for (long long base = start; base < end; base += 32) {
        const long long i = base + lane;
        const int b = i < end ? ep_baseline::bucket_of(idx, i, bucket_of_expert, num_experts) : -1;
        const unsigned same = __match_any_sync(0xffffffffu, b);
        const int before = __popc(same & ((1u << lane) - 1u));
        const int row = b >= 0 ? next_row[b] + before : -1;
        __syncwarp();
        if (b >= 0 && before == 0) next_row[b] += __popc(same);
        __syncwarp();
        if (i < end) slot_row[i] = row;
    }
}

// dst[slot_row[i]] = src[i / topk] for every slot with a row: the permuted copy of the tokens, one
// row per (token, slot). One warp per slot.
extern "C" __global__ void ep_baseline_permute(const uint8_t* src, long long row_bytes, const int* slot_row,
                                               long long num_slots, int topk, uint8_t* dst) {
    const int lane = threadIdx.x & 31;
    const long long warp = (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
    const long long warps = (static_cast<long long>(gridDim.x) * blockDim.x) >> 5;
    for (long long i = warp; i < num_slots; i += warps) {
        const int row = slot_row[i];
        if (row < 0) continue;
        ep_baseline::copy_row(dst + row * row_bytes, src + (i / topk) * row_bytes, row_bytes, lane);
    }
}

#define EP_BASELINE_INSTANTIATE(SUFFIX, T)                                                               \
    extern "C" __global__ void ep_baseline_weighted_sum_##SUFFIX(const T* rows, const int* slot_row,   \
                                                                  const float* weights, int num_tokens, \
                                                                  int topk, int hidden, T* out) {       \
        ep_baseline::weighted_sum<T>(rows, slot_row, weights, num_tokens, topk, hidden, out);           \
    }

EP_BASELINE_INSTANTIATE(bf16, __nv_bfloat16)
EP_BASELINE_INSTANTIATE(f16, __half)
EP_BASELINE_INSTANTIATE(f32, float)
