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
__global__ void __launch_bounds__(1024) warp_path(Peers p, int n, int rank, const uint8_t* src, int64_t items,
                                                  int64_t rows_per_peer, int64_t row, LocalCopies l) {
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

// The share of tokens that go to a given rank: 1 - C(E - E/world, K) / C(E, K) (bytes and floors,
// docs/perf-notes.md), for K distinct experts of E placed contiguously.
double share_to_rank(int experts, int k, int world) {
    double none = 1.0;
    for (int i = 0; i < k; ++i) none *= static_cast<double>(experts - experts / world - i) / (experts - i);
    return 1.0 - none;
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
    const bool layouts = argc > 2 && std::string(argv[2]) == "layouts";
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
            float slowest = 0;
            for (int g = 0; g < n; ++g) {
                CHECK(cudaSetDevice(g));
                CHECK(cudaEventSynchronize(stop[g]));
                float ms = 0;
                CHECK(cudaEventElapsedTime(&ms, start[g], stop[g]));
                slowest = std::max(slowest, ms);
            }
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
