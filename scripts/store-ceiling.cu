// The all-to-all store ceiling of this node, by store path: how many GB/s each GPU pushes into
// its peers when every GPU sends to every other at once, with `blocks` blocks per GPU moving rows
// of `row` bytes (the dispatch's access pattern: one row per (item, destination), destinations
// interleaved). It answers which store path can beat the 24-block SM-store ceiling of GPU.md:
//   warp: 16-byte loads and stores by every lane, 4 loads in flight per lane (moe-ep v2's path);
//   tma:  one lane per warp moves the row through shared memory with bulk copies (cp.async.bulk):
//         a bulk load into a stage, then a bulk store from it to the peer, `stages` per warp.
// Build and run on a GPU machine (nvcc is there):
//   nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a scripts/store-ceiling.cu -o /tmp/sc && /tmp/sc
//   /tmp/sc 128   # tokens per rank (default 4096): the bytes of that T's dispatch
//   /tmp/sc 4096 layouts   # the dispatch's copies inside each GPU too, by layout (below)
//   /tmp/sc 128 protocol   # the least a whole call must do at T, timed as a caller does (see protocol_call)
// Prints one line per (path, blocks, warps): the median over 20 runs of the slowest GPU's time,
// start to stop event around the one kernel. The `none` row launches the same kernel with no
// items: what a call of this kind costs before any byte moves.
// `layouts` answers what the expert-major layout must cost at least: with the DeepSeek shape's
// rows at world n (top-8 of 256), warp-path rows of `token-major` (the remote rows and this rank's
// own rows copied locally), `expert-major` (those, plus a local copy for each second or later
// slot of a token here: T * K rows in all), `expansion` (those copies alone) and `expert-major
// reads` (token-major's rows plus a read of each such slot row: the expert-major combine gathers
// them), local work spread evenly among the remote rows. No kernel waits for rows: a floor.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#define CHECK(x)                                                                              \
    do {                                                                                      \
        cudaError_t e_ = (x);                                                                 \
        if (e_ != cudaSuccess) {                                                              \
            std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
            std::exit(1);                                                                     \
        }                                                                                     \
    } while (0)

constexpr int kMaxGpus = 8;
struct Peers {
    uint8_t* recv[kMaxGpus];
};

__device__ __forceinline__ int warp_global() { return (blockIdx.x * blockDim.x + threadIdx.x) >> 5; }
__device__ __forceinline__ int warps_total() { return (gridDim.x * blockDim.x) >> 5; }

// Item i goes to peer (rank + 1 + i % (n - 1)) % n, into that peer's region for this rank.
__device__ __forceinline__ uint8_t* item_dst(const Peers& p, int n, int rank, int64_t i, int64_t rows_per_peer,
                                             int64_t row) {
    const int d = (rank + 1 + static_cast<int>(i % (n - 1))) % n;
    const int64_t r = i / (n - 1);
    return p.recv[d] + (static_cast<int64_t>(rank) * rows_per_peer + r) * row;
}

// One warp copies a row, 16 bytes a lane, 4 loads in flight per lane before their stores.
__device__ __forceinline__ void warp_copy_row(int4* d, const int4* s, int64_t row, int lane) {
    const int64_t vecs = row / 16;
    for (int64_t v = lane; v < vecs; v += 32 * 4) {
        int4 t[4];
#pragma unroll
        for (int u = 0; u < 4; ++u)
            if (v + 32 * u < vecs) t[u] = __ldg(s + v + 32 * u);
#pragma unroll
        for (int u = 0; u < 4; ++u)
            if (v + 32 * u < vecs) d[v + 32 * u] = t[u];
    }
}

// One warp reads a row and keeps nothing (the expert-major combine's further slot rows, which
// it folds into a row that goes out anyway); the fold is stored only on a value these buffers
// never hold, so the loads stay.
__device__ __forceinline__ void warp_read_row(const int4* s, int64_t row, int lane, int* sink) {
    const int64_t vecs = row / 16;
    int fold = 0;
    for (int64_t v = lane; v < vecs; v += 32 * 4) {
        int4 t[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) t[u] = v + 32 * u < vecs ? __ldg(s + v + 32 * u) : int4{};
#pragma unroll
        for (int u = 0; u < 4; ++u) fold += t[u].x ^ t[u].y ^ t[u].z ^ t[u].w;
    }
    if (fold == 0x2b1d0e57) *sink = fold;
}

// The copies a layout makes inside one GPU, beside the remote rows: `own` rows of this rank's
// tokens into its own receive region (both layouts), then `expand` copies of received rows to
// scattered rows of an expert-major output (a token's second and later slots on this rank), or
// with `reads_only` only reads of those output rows (the combine gathers them).
struct LocalCopies {
    const uint8_t* own_src;
    uint8_t* own_dst;
    int64_t own;
    const uint8_t* received;
    int64_t received_rows;
    uint8_t* expanded;
    int64_t expanded_rows;
    int64_t expand;
    bool reads_only;
};

__device__ __forceinline__ void local_copy(const LocalCopies& l, int64_t j, int64_t row, int lane) {
    const uint8_t* s;
    uint8_t* d;
    if (j < l.own) {
        s = l.own_src + j * row;
        d = l.own_dst + j * row;
    } else {
        const int64_t e = j - l.own;
        s = l.received + (e * 2654435761ll % l.received_rows) * row;
        d = l.expanded + (e * 7919 % l.expanded_rows) * row;
        if (l.reads_only) {  // the combine reads each slot's row of the expert outputs once
            warp_read_row(reinterpret_cast<const int4*>(d), row, lane, reinterpret_cast<int*>(l.own_dst));
            return;
        }
    }
    warp_copy_row(reinterpret_cast<int4*>(d), reinterpret_cast<const int4*>(s), row, lane);
}

// `items` remote rows and l.own + l.expand local copies, the local ones spread evenly among the
// remote ones (item i is local where the running share of local items steps up).
__device__ void copy_rows(const Peers& p, int n, int rank, const uint8_t* src, int64_t items, int64_t rows_per_peer,
                          int64_t row, const LocalCopies& l) {
    const int lane = threadIdx.x & 31;
    const int64_t local = l.own + l.expand, total = items + local;
    for (int64_t i = warp_global(); i < total; i += warps_total()) {
        const int64_t local_before = i * local / total;
        if ((i + 1) * local / total > local_before) {
            local_copy(l, local_before, row, lane);
            continue;
        }
        const int64_t r = i - local_before;
        warp_copy_row(reinterpret_cast<int4*>(item_dst(p, n, rank, r, rows_per_peer, row)),
                      reinterpret_cast<const int4*>(src + (r / (n - 1)) * row), row, lane);
    }
}

__global__ void __launch_bounds__(1024) warp_path(Peers p, int n, int rank, const uint8_t* src, int64_t items,
                                                  int64_t rows_per_peer, int64_t row, LocalCopies l) {
    copy_rows(p, n, rank, src, items, rows_per_peer, row, l);
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Per warp: `stages` buffers of `chunk` bytes and one mbarrier each. Chunks of the warp's rows go
// load -> wait -> store; a stage is reused once the store issued `stages` chunks ago read it.
__global__ void __launch_bounds__(1024) tma_path(Peers p, int n, int rank, const uint8_t* src, int64_t items,
                                                 int64_t rows_per_peer, int64_t row, int chunk, int stages) {
    extern __shared__ __align__(128) uint8_t smem[];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, warps = blockDim.x >> 5;
    uint8_t* buf = smem + static_cast<int64_t>(w) * stages * chunk;
    uint64_t* bars = reinterpret_cast<uint64_t*>(smem + static_cast<int64_t>(warps) * stages * chunk) + w * stages;
    if (lane == 0) {
        for (int s = 0; s < stages; ++s) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(bars + s)));
        asm volatile("fence.mbarrier_init.release.cluster;");
    }
    __syncwarp();
    if (lane != 0) return;
    int64_t k = 0;  // chunks issued by this warp
    for (int64_t i = warp_global(); i < items; i += warps_total()) {
        const uint8_t* s = src + (i / (n - 1)) * row;
        uint8_t* d = item_dst(p, n, rank, i, rows_per_peer, row);
        for (int64_t off = 0; off < row; off += chunk, ++k) {
            const int bytes = static_cast<int>(min(static_cast<int64_t>(chunk), row - off));
            const int st = static_cast<int>(k % stages);
            const uint32_t phase = static_cast<uint32_t>((k / stages) & 1);
            uint8_t* b = buf + static_cast<int64_t>(st) * chunk;
            // The store that last read this stage (issued `stages` chunks ago) must be done reading.
            switch (stages) {
                case 1: asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory"); break;
                case 2: asm volatile("cp.async.bulk.wait_group.read 1;" ::: "memory"); break;
                case 3: asm volatile("cp.async.bulk.wait_group.read 2;" ::: "memory"); break;
                default: asm volatile("cp.async.bulk.wait_group.read 3;" ::: "memory"); break;
            }
            asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bars + st)), "r"(bytes)
                         : "memory");
            asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                             smem_addr(b)),
                         "l"(s + off), "r"(bytes), "r"(smem_addr(bars + st))
                         : "memory");
            uint32_t done = 0;
            while (!done) {
                asm volatile(
                    "{ .reg .pred q; mbarrier.try_wait.parity.shared::cta.b64 q, [%1], %2; selp.u32 %0, 1, 0, q; }"
                    : "=r"(done)
                    : "r"(smem_addr(bars + st)), "r"(phase)
                    : "memory");
            }
            asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(d + off), "r"(smem_addr(b)),
                         "r"(bytes)
                         : "memory");
            asm volatile("cp.async.bulk.commit_group;" ::: "memory");
        }
    }
    asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

// ------------------------------------------------------------------------------------------------
// `protocol`: the least a whole call must do at T, as a caller times it (`moe-ep bench --start
// held`): every GPU's stream is held until the host queued everything, a barrier kernel lines the
// GPUs up, and the start event sits between it and one kernel that does only what the call's
// protocol needs, with the token-major rows of `layouts`:
//   exchange:  block 0 stores this rank's count to every rank (the word carries the call number,
//              as moe-ep's inbox does) and every block waits for every rank's;
//   rows:      the remote rows and this rank's own rows, as warp_path copies them;
//   completion: each block adds 1 to each destination's counter of this rank (red.release.sys,
//              after the block's barrier) and waits until every source's blocks counted in here;
//   reduce:    then every warp sums its share of the received rows per token (bf16 in f32) into T
//              output rows (each token's rows only once all rows are in: moe-ep's reduce starts
//              on each chunk as it completes, so this is no floor for it, only a reference).
// A dispatch needs the exchange before its rows (where a row lands depends on every lower rank's
// count), rows and completion; a combine right after a token-major dispatch needs rows,
// completion and the reduce. Routing, metadata and layout are left out, so these are floors.
struct Signals {
    uint64_t* inbox[kMaxGpus];     // [kMaxGpus] words per GPU: rank s's count, call number above
    uint64_t* barrier[kMaxGpus];   // [kMaxGpus] per GPU: rank s's last barrier call number
    unsigned* counters[kMaxGpus];  // [kMaxGpus] per GPU: blocks of rank s counted in, all calls
};

enum ProtocolStep : unsigned { kExchange = 1, kRows = 2, kCompletion = 4, kReduce = 8 };

constexpr uint64_t kSpinTimeoutNs = 2000000000ull;  // 2 s: a lost peer fails the case, never hangs

__device__ __forceinline__ uint64_t global_ns() {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// Spins until ready() or the deadline; false (and *failed set) on timeout.
template <typename Ready>
__device__ bool spin(Ready ready, int* failed) {
    const uint64_t deadline = global_ns() + kSpinTimeoutNs;
    while (!ready()) {
        if (global_ns() > deadline) {
            atomicExch(failed, 1);
            return false;
        }
    }
    return true;
}

__device__ __forceinline__ uint64_t ld_acquire_u64(const uint64_t* p) {
    uint64_t v;
    asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ uint64_t ld_relaxed_u64(const uint64_t* p) {
    uint64_t v;
    asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ unsigned ld_acquire_u32(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

// Holds the stream until the host raises the gate to `value` (mapped host memory).
__global__ void hold(const volatile unsigned* gate, unsigned value, int* failed) {
    spin([&] { return *gate >= value; }, failed);
}

// Every rank's barrier word here reaches `call` once every rank launched this: one thread per rank.
__global__ void line_up(Signals sig, int n, int rank, uint64_t call, int* failed) {
    const int r = threadIdx.x;
    if (r >= n) return;
    asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(sig.barrier[r] + rank), "l"(call) : "memory");
    spin([&] { return ld_acquire_u64(sig.barrier[rank] + r) >= call; }, failed);
}

__global__ void __launch_bounds__(1024)
    protocol_call(Peers p, Signals sig, int n, int rank, unsigned steps, uint64_t call, const uint8_t* src,
                  int64_t items, int64_t rows_per_peer, int64_t row, LocalCopies l, int64_t tokens,
                  uint8_t* out, int* failed) {
    const int lane = threadIdx.x & 31;
    if (steps & kExchange) {
        const uint64_t word = (call << 32) | static_cast<uint64_t>(items / (n - 1));
        if (blockIdx.x == 0 && threadIdx.x < n)
            asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(sig.inbox[threadIdx.x] + rank), "l"(word)
                         : "memory");
        if (threadIdx.x < n)
            spin([&] { return ld_relaxed_u64(sig.inbox[rank] + threadIdx.x) >> 32 == call; }, failed);
        __syncthreads();
    }
    if (steps & kRows) copy_rows(p, n, rank, src, items, rows_per_peer, row, l);
    if (steps & kCompletion) {
        __syncthreads();  // orders the block's stores before each releasing add (cumulative)
        if (threadIdx.x < n)
            asm volatile("red.release.sys.global.add.u32 [%0], 1;" ::"l"(sig.counters[threadIdx.x] + rank) : "memory");
        const unsigned expected = static_cast<unsigned>(call) * gridDim.x;
        if (threadIdx.x < n) spin([&] { return ld_acquire_u32(sig.counters[rank] + threadIdx.x) >= expected; }, failed);
        __syncthreads();
    }
    if (steps & kReduce) {
        // Token t sums row t of each source's region (the sources that sent that many rows): pieces
        // of a token row go to warps in turn, every source's vector loaded before the adds.
        const int64_t per_src = l.own, vecs = row / 16;
        const int64_t parts = max(int64_t{1}, warps_total() / tokens);
        for (int64_t piece = warp_global(); piece < tokens * parts; piece += warps_total()) {
            const int64_t t = piece / parts, part = piece - t * parts;
            const int64_t begin = part * vecs / parts, end = (part + 1) * vecs / parts;
            int4* dst = reinterpret_cast<int4*>(out + t * row);
            for (int64_t v = begin + lane; v < end; v += 32) {
                float acc[8] = {};
                for (int s0 = 0; s0 < n && t < per_src; s0 += 4) {  // four sources' loads in flight
                    int4 in[4];
#pragma unroll
                    for (int u = 0; u < 4; ++u)
                        if (s0 + u < n) {
                            const uint8_t* from = p.recv[rank] + ((s0 + u) * rows_per_peer + t) * row;
                            in[u] = reinterpret_cast<const int4*>(from)[v];
                        }
#pragma unroll
                    for (int u = 0; u < 4; ++u) {
                        if (s0 + u >= n) break;
                        const uint32_t w[4] = {static_cast<uint32_t>(in[u].x), static_cast<uint32_t>(in[u].y),
                                               static_cast<uint32_t>(in[u].z), static_cast<uint32_t>(in[u].w)};
#pragma unroll
                        for (int i = 0; i < 4; ++i) {
                            acc[2 * i] += __uint_as_float(w[i] << 16);
                            acc[2 * i + 1] += __uint_as_float(w[i] & 0xffff0000u);
                        }
                    }
                }
                uint32_t o[4];  // truncated to bf16: only the time counts here
#pragma unroll
                for (int i = 0; i < 4; ++i)
                    o[i] = (__float_as_uint(acc[2 * i]) >> 16) | (__float_as_uint(acc[2 * i + 1]) & 0xffff0000u);
                dst[v] = make_int4(static_cast<int>(o[0]), static_cast<int>(o[1]), static_cast<int>(o[2]),
                                   static_cast<int>(o[3]));
            }
        }
    }
}

// The share of tokens that go to a given rank: 1 - C(E - E/world, K) / C(E, K) (bytes and floors,
// docs/perf-notes.md), for K distinct experts of E placed contiguously.
double share_to_rank(int experts, int k, int world) {
    double none = 1.0;
    for (int i = 0; i < k; ++i) none *= static_cast<double>(experts - experts / world - i) / (experts - i);
    return 1.0 - none;
}

// The slowest GPU's time from its start to its stop event, in ms, once every stop is reached.
float slowest_ms(int n, const std::vector<cudaEvent_t>& start, const std::vector<cudaEvent_t>& stop) {
    float slowest = 0;
    for (int g = 0; g < n; ++g) {
        CHECK(cudaSetDevice(g));
        CHECK(cudaEventSynchronize(stop[g]));
        float ms = 0;
        CHECK(cudaEventElapsedTime(&ms, start[g], stop[g]));
        slowest = std::max(slowest, ms);
    }
    return slowest;
}

// `protocol` (see protocol_call): one line per case, the slowest GPU's median over 20 calls after
// 3 warm-up calls, with the rows of `layouts` at this T.
int run_protocol(int n, const Peers& peers, const std::vector<uint8_t*>& src, int64_t tokens, int64_t items,
                 int64_t own, int64_t rows_per_peer, int64_t row, const std::vector<cudaStream_t>& streams,
                 const std::vector<cudaEvent_t>& start, const std::vector<cudaEvent_t>& stop) {
    Signals sig{};
    std::vector<uint8_t*> out(n);
    std::vector<int*> failed(n);
    for (int g = 0; g < n; ++g) {
        CHECK(cudaSetDevice(g));
        CHECK(cudaMalloc(&sig.inbox[g], kMaxGpus * sizeof(uint64_t)));
        CHECK(cudaMalloc(&sig.barrier[g], kMaxGpus * sizeof(uint64_t)));
        CHECK(cudaMemset(sig.barrier[g], 0, kMaxGpus * sizeof(uint64_t)));
        CHECK(cudaMalloc(&sig.counters[g], kMaxGpus * sizeof(unsigned)));
        CHECK(cudaMalloc(&out[g], tokens * row));
        CHECK(cudaMalloc(&failed[g], sizeof(int)));
        CHECK(cudaMemset(failed[g], 0, sizeof(int)));
    }
    unsigned* gate = nullptr;  // mapped host memory: the host opens every GPU's held stream at once
    CHECK(cudaHostAlloc(&gate, sizeof(unsigned), cudaHostAllocMapped | cudaHostAllocPortable));
    *gate = 0;
    struct ProtocolCase {
        const char* name;
        unsigned steps;
        int blocks;
    };
    const ProtocolCase cases[] = {
        {"launch alone", 0, 24},
        {"exchange, completion (no rows)", kExchange | kCompletion, 24},
        {"dispatch: exchange, rows, completion", kExchange | kRows | kCompletion, 24},
        {"dispatch: exchange, rows, completion", kExchange | kRows | kCompletion, 132},
        {"combine: rows, completion", kRows | kCompletion, 24},
        {"combine: rows, completion", kRows | kCompletion, 132},
        {"combine: rows, completion, reduce after", kRows | kCompletion | kReduce, 24},
    };
    std::printf("protocol: %lld remote rows and %lld own rows per GPU (%.1f MB egress), T = %lld\n",
                static_cast<long long>(items), static_cast<long long>(own), items * row / 1e6,
                static_cast<long long>(tokens));
    std::printf("| steps | blocks | us (median, slowest GPU) |\n|---|---|---|\n");
    unsigned opened = 0;
    uint64_t lined_up = 0;
    for (const ProtocolCase& c : cases) {
        for (int g = 0; g < n; ++g) {  // call numbers restart at 1 in each case
            CHECK(cudaSetDevice(g));
            CHECK(cudaMemset(sig.inbox[g], 0, kMaxGpus * sizeof(uint64_t)));
            CHECK(cudaMemset(sig.counters[g], 0, kMaxGpus * sizeof(unsigned)));
            CHECK(cudaDeviceSynchronize());
        }
        std::vector<float> times;
        for (uint64_t call = 1; call <= 23; ++call) {
            ++opened;
            ++lined_up;
            for (int g = 0; g < n; ++g) {
                CHECK(cudaSetDevice(g));
                const LocalCopies l{src[g], peers.recv[g] + g * rows_per_peer * row, own, nullptr, 0, nullptr, 0, 0,
                                    false};
                hold<<<1, 1, 0, streams[g]>>>(gate, opened, failed[g]);
                line_up<<<1, 32, 0, streams[g]>>>(sig, n, g, lined_up, failed[g]);
                CHECK(cudaEventRecord(start[g], streams[g]));
                protocol_call<<<c.blocks, 1024, 0, streams[g]>>>(peers, sig, n, g, c.steps, call, src[g], items,
                                                                rows_per_peer, row, l, tokens, out[g], failed[g]);
                CHECK(cudaGetLastError());
                CHECK(cudaEventRecord(stop[g], streams[g]));
            }
            __atomic_store_n(gate, opened, __ATOMIC_RELEASE);
            const float slowest = slowest_ms(n, start, stop);
            if (call > 3) times.push_back(slowest);
        }
        for (int g = 0; g < n; ++g) {
            int f = 0;
            CHECK(cudaSetDevice(g));
            CHECK(cudaMemcpy(&f, failed[g], sizeof(int), cudaMemcpyDeviceToHost));
            if (f) {
                std::printf("protocol: GPU %d timed out waiting in case '%s'\n", g, c.name);
                return 1;
            }
        }
        std::sort(times.begin(), times.end());
        std::printf("| %s | %d | %.1f |\n", c.name, c.blocks, times[times.size() / 2] * 1e3);
    }
    return 0;
}

int main(int argc, char** argv) {
    int n = 0;
    CHECK(cudaGetDeviceCount(&n));
    n = std::min(n, kMaxGpus);
    if (n < 2) {
        std::printf("store-ceiling: needs 2 or more GPUs, found %d\n", n);
        return 0;
    }
    const int64_t row = 7168 * 2;                      // H 7168 bf16
    const int64_t tokens = argc > 1 ? std::atoll(argv[1]) : 4096;  // T per rank
    const int64_t rows_per_peer = tokens;              // every token to every peer at most
    // `layouts`: the dispatch's copies inside each GPU too, token-major and expert-major, for the
    // DeepSeek shape (top-8 of 256 experts) at world n; otherwise the remote rows alone, P = 0.9.
    const bool protocol = argc > 2 && std::string(argv[2]) == "protocol";
    const bool layouts = protocol || (argc > 2 && std::string(argv[2]) == "layouts");
    const double p_goes = layouts ? share_to_rank(256, 8, n) : 0.9;  // a token goes to a given rank
    const int64_t items = layouts ? std::llround(tokens * p_goes * (n - 1)) : tokens * 9 / 10 * (n - 1);
    const int64_t own = std::llround(tokens * p_goes);
    // The expert-major output has one row per (source, token, slot) here, T * K on average; the
    // rows from peers and the own rows land in the first slot of each, the rest are copies.
    const int64_t expanded_rows = tokens * 8, expand = expanded_rows - std::llround(tokens * p_goes * n);
    std::vector<uint8_t*> src(n), expanded(n, nullptr);
    Peers peers{};
    std::vector<cudaStream_t> streams(n);
    std::vector<cudaEvent_t> start(n), stop(n);
    for (int g = 0; g < n; ++g) {
        CHECK(cudaSetDevice(g));
        for (int h = 0; h < n; ++h)
            if (h != g) CHECK(cudaDeviceEnablePeerAccess(h, 0));
        CHECK(cudaMalloc(&src[g], tokens * row));
        CHECK(cudaMemset(src[g], g + 1, tokens * row));
        CHECK(cudaMalloc(&peers.recv[g], static_cast<int64_t>(n) * rows_per_peer * row));
        if (layouts) CHECK(cudaMalloc(&expanded[g], expanded_rows * row));
        CHECK(cudaStreamCreateWithFlags(&streams[g], cudaStreamNonBlocking));
        CHECK(cudaEventCreate(&start[g]));
        CHECK(cudaEventCreate(&stop[g]));
        CHECK(cudaFuncSetAttribute(tma_path, cudaFuncAttributeMaxDynamicSharedMemorySize, 227 * 1024));
    }
    if (protocol) return run_protocol(n, peers, src, tokens, items, own, rows_per_peer, row, streams, start, stop);
    const double bytes = static_cast<double>(items) * row;
    std::printf("store-ceiling: %d GPUs, %.1f MB egress per GPU, rows of %lld bytes\n", n, bytes / 1e6,
                static_cast<long long>(row));
    if (layouts)
        std::printf("layouts: %lld remote rows, %lld own rows, %lld expansion copies per GPU (%.1f MB)\n",
                    static_cast<long long>(items), static_cast<long long>(own), static_cast<long long>(expand),
                    expand * row / 1e6);
    std::printf("| path | blocks | warps/block | chunk | stages | us (median, slowest GPU) | GB/s per GPU |\n");
    std::printf("|---|---|---|---|---|---|---|\n");
    // What a warp-path case moves: the remote rows alone, a token-major dispatch's (remote and own
    // rows), an expert-major one's (and the expansion), the expansion alone, or the token-major
    // rows plus the expert-major combine's reads of the further slot rows.
    enum Work { kRemote, kTokenMajor, kExpertMajor, kExpansion, kExpertMajorReads };
    const char* work_names[] = {"warp", "token-major", "expert-major", "expansion", "expert-major reads"};
    struct Case {
        bool tma;
        int blocks, warps, chunk, stages;
        bool empty;
        Work work;
    };
    std::vector<Case> cases;
    cases.push_back({false, 24, 32, 0, 0, true, kRemote});
    for (int blocks : {24, 48, 96, 132}) {
        if (layouts) {
            for (Work w : {kTokenMajor, kExpertMajor, kExpansion, kExpertMajorReads})
                cases.push_back({false, blocks, 32, 0, 0, false, w});
            continue;
        }
        cases.push_back({false, blocks, 32, 0, 0, false, kRemote});
        cases.push_back({true, blocks, 8, 7168, 3, false, kRemote});
        cases.push_back({true, blocks, 16, 7168, 2, false, kRemote});
        cases.push_back({true, blocks, 16, 3584, 3, false, kRemote});
        cases.push_back({true, blocks, 32, 3584, 2, false, kRemote});
    }
    for (const Case& c : cases) {
        const size_t smem = c.tma ? static_cast<size_t>(c.warps) * c.stages * (c.chunk + 8) : 0;
        std::vector<float> times;
        for (int it = 0; it < 23; ++it) {
            for (int g = 0; g < n; ++g) {
                CHECK(cudaSetDevice(g));
                CHECK(cudaDeviceSynchronize());
            }
            for (int g = 0; g < n; ++g) {
                CHECK(cudaSetDevice(g));
                CHECK(cudaEventRecord(start[g], streams[g]));
                if (c.tma)
                    tma_path<<<c.blocks, c.warps * 32, smem, streams[g]>>>(peers, n, g, src[g], items, rows_per_peer,
                                                                          row, c.chunk, c.stages);
                else {
                    LocalCopies l{src[g], peers.recv[g] + g * rows_per_peer * row, 0, peers.recv[g], n * rows_per_peer,
                                  expanded[g], expanded_rows, 0, c.work == kExpertMajorReads};
                    if (c.work != kRemote && c.work != kExpansion) l.own = own;
                    if (c.work == kExpertMajor || c.work == kExpansion || c.work == kExpertMajorReads) l.expand = expand;
                    const int64_t remote = c.empty || c.work == kExpansion ? 0 : items;
                    warp_path<<<c.blocks, c.warps * 32, 0, streams[g]>>>(peers, n, g, src[g], remote, rows_per_peer,
                                                                        row, l);
                }
                CHECK(cudaGetLastError());
                CHECK(cudaEventRecord(stop[g], streams[g]));
            }
            const float slowest = slowest_ms(n, start, stop);
            if (it >= 3) times.push_back(slowest);
        }
        std::sort(times.begin(), times.end());
        const double us = times[times.size() / 2] * 1e3;
        const bool remote = !c.empty && c.work != kExpansion;
        std::printf("| %s | %d | %d | %d | %d | %.1f | %.1f |\n", c.empty ? "none" : c.tma ? "tma" : work_names[c.work],
                    c.blocks, c.warps, c.chunk, c.stages, us, remote ? bytes / us / 1e3 : 0.0);
    }
    // A spot check that both paths delivered: GPU 1's region from GPU 0 holds GPU 0's bytes.
    uint8_t probe = 0;
    CHECK(cudaSetDevice(1));
    CHECK(cudaMemcpy(&probe, peers.recv[1], 1, cudaMemcpyDeviceToHost));
    std::printf("check: GPU 1 got byte %d from GPU 0 (expected 1)\n", probe);
    return probe == 1 ? 0 : 1;
}
