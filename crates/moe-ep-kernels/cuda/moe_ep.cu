// moe-ep's CUDA kernels: dispatch and combine over memory shared with peer GPUs (NVLink stores).
//
// One call of the library is a short sequence of these kernels on the caller's stream. Ranks meet
// through epoch-valued flags in each other's memory (no memset per call): a rank raises its flag on
// a peer with a system-scope release store after its data, and the peer waits for it with acquire
// loads, giving up after a deadline measured on %globaltimer and reporting which peer is missing.
// Small messages (the dispatch's counts, a receive slot) carry the call number in each word
// instead, so they need no flag after them. Rows count themselves in, with releasing adds to
// counters of the receiver's (in a token-major send, each block adds its rows per source; else
// each warp per source and chunk of tokens), and the receiver waits until the counts it expects
// are in, then zeroes the counters.
//
// Arithmetic follows docs/semantics.md to the bit: widen to f32, fmaf / plain adds in the stated
// order from +0.0, one round-to-nearest-even at the end (the build passes -fmad=false so the
// compiler never fuses a product and a sum on its own).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

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

__device__ __forceinline__ void red_add_release_sys(unsigned* p, unsigned v) {
    asm volatile("red.release.sys.global.add.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ void red_add_release_sys(uint64_t* p, uint64_t v) {
    asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ unsigned ld_acquire_sys(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

// A release fence at system scope (MEMBAR.ALL.SYS): what a release pattern needs, without the
// sequential consistency of __threadfence_system (MEMBAR.SC.SYS).
__device__ __forceinline__ void fence_release_sys() { asm volatile("fence.acq_rel.sys;" ::: "memory"); }

__device__ __forceinline__ void st_relaxed_sys(uint64_t* p, uint64_t v) {
    asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ uint64_t ld_relaxed_sys(const uint64_t* p) {
    uint64_t v;
    asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void red_add_release_gpu(unsigned* p, unsigned v) {
    asm volatile("red.release.gpu.global.add.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ unsigned atom_add_acq_rel_gpu(unsigned* p, unsigned v) {
    unsigned old;
    asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v) : "memory");
    return old;
}

__device__ __forceinline__ unsigned ld_acquire_gpu(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

// Arrival counter (from, chunk) in the signals buffer at `signals` (layout in moe_ep.h).
__device__ __forceinline__ unsigned* arrival_counter(uint64_t signals, const EpDims& dm, int from, int chunk) {
    const int chunks = (dm.max_tokens + EP_CHUNK_TOKENS - 1) / EP_CHUNK_TOKENS;
    return reinterpret_cast<unsigned*>(signals + EP_ARRIVALS_OFFSET) + from * chunks + chunk;
}

__device__ __forceinline__ uint64_t global_timer_ns() {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// Kernel tracing, for measuring where a call's time goes (docs/perf-notes.md, v10). Compiled in
// only with EP_TRACE (MOE_EP_KERNEL_TRACE=1 when cargo builds this crate). Thread 0 of every block
// (lane 0 of every warp, at the EP_TRACE_WARP points) stamps %globaltimer at these points, keeping
// each point's first and last stamp, and ep_barrier prints the stamps of the call before it,
// relative to that call's barrier, and clears them (scripts/kernel-trace.py turns the prints of a
// bench run into a table).
enum EpTracePoint : int {
    kTraceBarrierEnd,      // ep_barrier done: a timed call's start event follows
    kTraceRouteStart,      // ep_route_notify, after the grids ahead of it
    kTraceRouted,          //   routing blocks: positions and counts written
    kTraceCounted,         //   counting block: experts counted
    kTraceCountsIn,        //   counting block: every rank's counts here
    kTraceRouteEnd,        //   counting block: bases derived
    kTraceSendStart,       // ep_dispatch_send, after the grids ahead of it
    kTraceSendEntered,     //   every rank entered (a replay; at once otherwise)
    kTraceSent,            //   each block: its warps' work done
    kTraceSendEnd,         //   last block: counters reset
    kTraceLayoutStart,     // ep_dispatch_send, token-major layout: each block, its rows out
    kTraceLayoutFlags,     //   every rank's rows in
    kTraceLayoutEnd,       //   each block done
    kTraceCombineStart,    // ep_combine, after the grids ahead of it
    kTraceCombineEntered,  //   every rank entered
    kTraceCombineDone,     //   each block: rows sent back and reduced
    kTraceCombineEnd,      //   last block: counters reset
    kTraceSendWarpDone,    // ep_dispatch_send: each sending warp, its rows out
    kTraceCombineSentBack, // combine: each sending warp, its rows back
    kTraceCombineChunkIn,  //   each reducing warp, a chunk complete
    kTraceCombineReduced,  //   each warp, its reduce done
    kTracePoints
};

#ifdef EP_TRACE
__device__ unsigned long long ep_trace_first[kTracePoints];
__device__ unsigned long long ep_trace_last[kTracePoints];
__device__ unsigned long long ep_trace_calls;

__device__ void trace_point(EpTracePoint point, bool whole_block, bool per_warp = false) {
    if (whole_block) __syncthreads();
    if (per_warp ? (threadIdx.x & 31) == 0 : threadIdx.x == 0) {
        const unsigned long long t = global_timer_ns();
        atomicMin(&ep_trace_first[point], t);
        atomicMax(&ep_trace_last[point], t);
    }
}

// One thread: prints the stamps since the last call of this (as "EP_TRACE rank call point first
// last", ns after that call's kTraceBarrierEnd) and clears them.
__device__ void trace_dump(int rank) {
    const unsigned long long base = ep_trace_last[kTraceBarrierEnd];
    const unsigned long long call = ep_trace_calls++;
    for (int i = 0; i < kTracePoints; ++i) {
        if (base != 0 && ep_trace_last[i] != 0) {
            printf("EP_TRACE %d %llu %d %lld %lld\n", rank, call, i, static_cast<long long>(ep_trace_first[i] - base),
                   static_cast<long long>(ep_trace_last[i] - base));
        }
        ep_trace_first[i] = ~0ull;
        ep_trace_last[i] = 0;
    }
}
#define EP_TRACE_POINT(point) trace_point(point, false)
#define EP_TRACE_BLOCK(point) trace_point(point, true)  // once every warp of the block got there
#define EP_TRACE_WARP(point) trace_point(point, false, true)  // by every warp that gets there
#define EP_TRACE_DUMP(rank)                 \
    do {                                    \
        if (threadIdx.x == 0) trace_dump(rank); \
    } while (0)
#else
#define EP_TRACE_POINT(point)
#define EP_TRACE_BLOCK(point)
#define EP_TRACE_WARP(point)
#define EP_TRACE_DUMP(rank)
#endif

// Programmatic dependent launch (sm_90). Where each rank has a GPU of its own, the host launches
// the kernels of a call so that one may be scheduled before the kernel ahead of it in the stream
// has finished. Every kernel first waits until the grids ahead of it completed and their memory
// is visible (what plain stream order gives), then lets the next kernel's blocks be scheduled, so
// that its launch overlaps this kernel's run instead of following its end. At most two grids of
// a rank are resident at once, and the earlier one's blocks are all resident before the later
// one's, so the spin waits of the earlier one never wait for room. Launched without the
// attribute, both instructions do nothing.
__device__ __forceinline__ void follow_prior_grids() {
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

// This call's number, the same on every rank. A call's first kernel (dm.begins_call) sees the
// counter still at the previous call and adds one; its last block adds that one to the counter
// (see commit_call) once every block has read it, so every later kernel of the call reads it as
// is. The counter lives on the device, so a replayed CUDA graph numbers its calls anew.
__device__ __forceinline__ uint64_t call_epoch(const EpDims& dm) {
    return *reinterpret_cast<const volatile uint64_t*>(dm.epoch_ptr) + static_cast<uint64_t>(dm.begins_call);
}

// One thread of the first kernel's last block, after every block of it has read call_epoch. An
// add rather than a store of call_epoch: it needs no load, so the kernel's end waits for no round
// trip to memory.
__device__ __forceinline__ void commit_call(const EpDims& dm) {
    if (dm.begins_call) atomicAdd(reinterpret_cast<unsigned long long*>(dm.epoch_ptr), 1ull);
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

// failed(), read once for the whole block so every thread takes the same branch.
__device__ bool block_ok(const int* err) {
    __shared__ int ok;
    __syncthreads();
    if (threadIdx.x == 0) ok = !failed(err);
    __syncthreads();
    return ok;
}

// One thread: polls until `ready()` holds. False once the call failed (when `stop_on_failure`)
// or at `deadline`, which reports rank `from` as missing on flag `sig`.
template <typename Ready>
__device__ bool spin_until(Ready ready, const EpDims& dm, uint64_t deadline, bool stop_on_failure, int from, int sig,
                           int* err) {
    while (!ready()) {
        if (stop_on_failure && failed(err)) return false;
        if (global_timer_ns() > deadline) {
            report(err, EP_ERR_TIMEOUT, dm.rank, from, sig);
            return false;
        }
        __nanosleep(32);
    }
    return true;
}

// Zeroes this rank's arrival counters of chunks 0..chunks-1 from every rank, for the next call:
// run by the last block of the kernel that waited for them all to be full, so no increment of
// this call is still on its way. After a failure too, without reading the error record (a round
// trip to memory at the kernel's end): a call that fails on every rank alike (capacity) sends no
// rows, and any other failure ends in a timeout, which poisons the group, so no later call reads
// the counters.
__device__ void reset_arrivals(const EpDims& dm, int chunks) {
    for (int i = threadIdx.x; i < dm.world * chunks; i += blockDim.x) {
        *arrival_counter(dm.my_signals, dm, i / chunks, i % chunks) = 0u;
    }
}

// One thread: waits (acquire) until this rank's arrival counter (from, chunk) reaches `expected`.
// False on timeout (reporting `from` as missing) or once the call failed.
__device__ bool await_arrivals(const EpDims& dm, int from, int chunk, unsigned expected, int* err) {
    const unsigned* counter = arrival_counter(dm.my_signals, dm, from, chunk);
    return spin_until([&] { return ld_acquire_sys(counter) >= expected; }, dm, global_timer_ns() + dm.timeout_ns,
                      true, from, EP_SIG_DATA, err);
}

// Waits until this rank's word `sig` from every rank s reaches `at_least(s)` (worked out once,
// before the polls, each of which is then one acquire load); one thread per peer. Returns false
// (the same in every thread of the block) on timeout, reporting the first missing peer on `sig`, or
// once a poll saw the call failed.
template <typename AtLeast>
__device__ bool wait_each_rank(const EpDims& dm, int sig, int* err, AtLeast at_least) {
    __shared__ int gave_up;
    if (threadIdx.x == 0) gave_up = 0;
    __syncthreads();
    if (threadIdx.x < dm.world) {
        const int s = threadIdx.x;
        const uint64_t* word = signal_slot(dm.my_signals, sig, s);
        const uint64_t target = at_least(s);
        if (!spin_until([&] { return ld_acquire_sys(word) >= target; }, dm, global_timer_ns() + dm.timeout_ns, true,
                        s, sig, err)) {
            gave_up = 1;
        }
    }
    __syncthreads();
    return !gave_up;
}

// Waits until this rank's flag `sig` from every rank reached this call's number (see
// wait_each_rank).
__device__ bool flags_raised(const EpDims& dm, int sig, int* err) {
    const uint64_t epoch = call_epoch(dm);
    return wait_each_rank(dm, sig, err, [&](int) { return epoch; });
}

// A row counts this many units on its arrival counter, whatever the number of pieces it was sent
// in (a power of two up to this).
constexpr int kRowUnits = 8;

// A row of a token-major send counts this many units on its destination's data counter (the
// EP_SIG_DATA word of its source): kRowUnits for the payload, shared among its pieces, and
// kRowUnits for the piece that carries the scales and metadata, whether or not there are any, so
// the receiver's total does not depend on how the sender split its rows.
constexpr unsigned kTokenRowUnits = 2 * kRowUnits;

// Waits until every rank's rows of a token-major send are in this rank's staging buffers: its data
// counter holds kTokenRowUnits per row recv_base gives it (see wait_each_rank). A call that failed
// before (a count exchange that timed out derived no recv_base) waits for a count no counter
// reaches, so the polls stop on the failure. recv_base comes from a kernel ahead of this one, so a
// failure during this one leaves it as it is. Once every row is in, a failure reported later
// changes nothing that follows, so there is no check after the wait (block_ok, a round trip to
// memory).
__device__ bool wait_rows_in(const EpDims& dm, const int* recv_base, int* err) {
    return wait_each_rank(dm, EP_SIG_DATA, err, [&](int s) {
        return failed(err) ? ~uint64_t{0} : static_cast<uint64_t>(recv_base[s + 1] - recv_base[s]) * kTokenRowUnits;
    });
}

// Zeroes this rank's data counters for the next token-major send: run by the last block of the
// kernel that waited for them, once every block has (so every row of this call is in). The next
// send to this rank follows a count exchange or an entry, which this rank joins only once this
// kernel is over. After a failure too, as reset_arrivals.
__device__ void reset_data_counters(const EpDims& dm) {
    if (threadIdx.x < dm.world) *signal_slot(dm.my_signals, EP_SIG_DATA, threadIdx.x) = 0;
}

// Raises flag `sig` of this rank on every peer (one thread per peer). With `release`, a peer
// that sees it sees the data stored before it; without, it publishes nothing but itself.
__device__ __forceinline__ void signal_all(const EpPeers& peers, const EpDims& dm, int sig, bool release = true) {
    if (threadIdx.x < dm.world) {
        uint64_t* flag = signal_slot(peers.signals[threadIdx.x], sig, dm.rank);
        if (release) {
            st_release_sys(flag, call_epoch(dm));
        } else {
            st_relaxed_sys(flag, call_epoch(dm));
        }
    }
}

// This rank's row in rank p's inbox for call `epoch` (double-buffered by call parity: a rank writes
// call n + 2's row only once every rank finished call n). The inbox helpers take the call number
// from the caller: each call_epoch is a round trip to memory, so a kernel loads it once.
__device__ __forceinline__ uint64_t* inbox_row(const EpPeers& peers, const EpDims& dm, uint64_t epoch, int p,
                                               int of_rank) {
    const int parity = static_cast<int>(epoch & 1);
    return reinterpret_cast<uint64_t*>(peers.inbox[p]) +
           (parity * dm.world + of_rank) * EP_INBOX_ROW(dm.world, dm.num_experts);
}

// An inbox word: the value with the call number it belongs to in the high half (see moe_ep.h).
__device__ __forceinline__ uint64_t inbox_word(uint64_t epoch, int value) {
    return (epoch << 32) | static_cast<uint32_t>(value);
}

__device__ __forceinline__ bool inbox_word_is_current(uint64_t epoch, uint64_t word) {
    return static_cast<uint32_t>(word >> 32) == static_cast<uint32_t>(epoch);
}

__device__ __forceinline__ int inbox_value(uint64_t word) { return static_cast<int>(static_cast<uint32_t>(word)); }

// Stores `value` as word i of this rank's row in rank p's inbox for call `epoch`. A relaxed
// store: the word carries its call number, so a reader needs no flag after it.
__device__ __forceinline__ void store_inbox_word(const EpPeers& peers, const EpDims& dm, uint64_t epoch, int p, int i,
                                                 int value) {
    st_relaxed_sys(inbox_row(peers, dm, epoch, p, dm.rank) + i, inbox_word(epoch, value));
}

// store_inbox_word to every rank, from one thread.
__device__ __forceinline__ void publish_word(const EpPeers& peers, const EpDims& dm, uint64_t epoch, int i,
                                             int value) {
    for (int p = 0; p < dm.world; ++p) store_inbox_word(peers, dm, epoch, p, i, value);
}

// The word of rank `of_rank`'s receive slot in rank p's inbox (the last of its row).
__device__ __forceinline__ uint64_t* slot_word(const EpPeers& peers, const EpDims& dm, uint64_t epoch, int p,
                                               int of_rank) {
    return inbox_row(peers, dm, epoch, p, of_rank) + dm.world + dm.num_experts;
}

// One thread: waits until `word` of this rank's inbox, written by rank `from`, is call `epoch`'s,
// and returns it in `value`. False on timeout (reporting `from` as a missing EP_SIG_ENTER) or once
// the call failed.
__device__ bool await_inbox_word(const EpDims& dm, uint64_t epoch, const uint64_t* word, int from, uint64_t deadline,
                                 int* err, uint64_t* value) {
    return spin_until([&] { return inbox_word_is_current(epoch, *value = ld_relaxed_sys(word)); }, dm, deadline, true,
                      from, EP_SIG_ENTER, err);
}

// First staged row of destination d's receive slot of call `epoch`, as d published it.
__device__ __forceinline__ int64_t slot_base(const EpPeers& peers, const EpDims& dm, uint64_t epoch, int d) {
    const auto* word = reinterpret_cast<const unsigned long long*>(slot_word(peers, dm, epoch, dm.rank, d));
    const int slot = inbox_value(__ldcg(word));
    return static_cast<int64_t>(slot) * dm.world * dm.max_tokens;
}

// Waits until every rank's receive-slot word in this rank's inbox is this call's; one thread per
// peer. False (the same in every thread of the block) on timeout, reporting the first missing
// peer as a missing EP_SIG_ENTER, or once a poll saw the call failed.
__device__ bool wait_slots(const EpPeers& peers, const EpDims& dm, int* err) {
    bool ok = true;
    if (threadIdx.x < dm.world) {
        const uint64_t epoch = call_epoch(dm);
        uint64_t word;
        ok = await_inbox_word(dm, epoch, slot_word(peers, dm, epoch, dm.rank, threadIdx.x), threadIdx.x,
                              global_timer_ns() + dm.timeout_ns, err, &word);
    }
    return __syncthreads_and(ok);
}

// The start of a call that writes into peers' buffers without a count exchange first: block 0
// tells every peer this rank entered (so its buffers are free to overwrite: its previous call is
// over), and every block waits until every peer did the same. With a receive slot to publish
// (`recv_slot` >= 0), the inbox word carrying it is the message, as in notify; without, the
// EP_SIG_ENTER flag. Either is a relaxed store: it publishes no data, and this rank's reads of the
// buffers peers will overwrite were in kernels ahead of this one, all complete (stream order).
// True once every peer entered, also when the call failed before without a poll seeing it: what
// follows checks for a failure itself (send_rows, send_back_rows, the waits), so the entry keeps
// a round trip to memory (block_ok) off every call's start.
__device__ bool enter_call(const EpPeers& peers, const EpDims& dm, int recv_slot, int* err) {
    if (recv_slot >= 0) {
        if (blockIdx.x == 0 && threadIdx.x < dm.world) {
            store_inbox_word(peers, dm, call_epoch(dm), threadIdx.x, dm.world + dm.num_experts, recv_slot);
        }
        return wait_slots(peers, dm, err);
    }
    if (blockIdx.x == 0) signal_all(peers, dm, EP_SIG_ENTER, false);
    return flags_raised(dm, EP_SIG_ENTER, err);
}

// One thread counts its block in on `done`: true in the block that arrives last, which also
// returns `done` to 0 for the next launch. The add releases the block's stores (what the thread
// saw of them) at GPU scope and acquires every earlier block's.
__device__ __forceinline__ bool count_block_in(unsigned* done) {
    const bool last = atom_add_acq_rel_gpu(done, 1u) == gridDim.x - 1;
    if (last) *done = 0;
    return last;
}

// Called by every block at its end: true in the block that arrives last, once every block of the
// grid is done. With `for_peers`, every block's stores are then visible to peers, so a flag raised
// after this covers them; without, only to this GPU (where nothing raised later covers remote
// stores: calls whose rows carry their own releases). `done` returns to 0 for the next launch.
// Every block of a grid using it must call it.
__device__ bool arrive_last(unsigned* done, bool for_peers) {
    __syncthreads();
    __shared__ unsigned last;
    if (threadIdx.x == 0) {
        // The barrier orders the block's stores before this thread's fence (for peers) or its
        // releasing add (this GPU), both cumulative: one covers them all. The add also acquires
        // every earlier block's stores, for the last block to pass on.
        if (for_peers) fence_release_sys();
        last = count_block_in(done);
    }
    __syncthreads();
    return last;
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

// 16-byte loads: through the read-only path for inputs that no kernel writes while it runs (the
// caller's tensors), plain for buffers peers store into.
template <bool kReadOnly>
__device__ __forceinline__ int4 load16(const int4* p) {
    if constexpr (kReadOnly) {
        return __ldg(p);
    } else {
        return *p;
    }
}

// 16 bytes from global memory into shared memory without passing through registers (L2 only),
// so many can be in flight; visible to the issuing thread once cp_async_wait says its group is done.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

// Waits until at most kPending of this thread's committed cp.async groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ bool aligned16(const void* p) {
    return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// Loads in flight per lane in warp_copy: a warp moves kCopyUnroll x 512 bytes per batch.
constexpr int kCopyUnroll = 4;

// Copies `bytes` bytes with one warp. 16 bytes a lane when alignment allows, with kCopyUnroll loads
// in flight per lane before their stores (remote stores are cheap to issue; the loads set the
// pace); a tail short of a batch goes one stride at a time.
template <bool kReadOnly>
__device__ __forceinline__ void warp_copy(uint8_t* dst, const uint8_t* src, int64_t bytes, int lane) {
    constexpr int kUnroll = kCopyUnroll;  // short for the loops below
    if (aligned16(dst) && aligned16(src) && (bytes & 15) == 0) {
        int4* d = reinterpret_cast<int4*>(dst);
        const int4* s = reinterpret_cast<const int4*>(src);
        const int64_t n = bytes / 16;
        int64_t i = lane;
        for (; i + (kUnroll - 1) * 32 < n; i += kUnroll * 32) {
            int4 v[kUnroll];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) v[u] = load16<kReadOnly>(s + i + u * 32);
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) d[i + u * 32] = v[u];
        }
        for (; i < n; i += 32) d[i] = load16<kReadOnly>(s + i);
    } else if (((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) | bytes) & 3) == 0) {
        int* d = reinterpret_cast<int*>(dst);
        const int* s = reinterpret_cast<const int*>(src);
        for (int64_t i = lane; i < bytes / 4; i += 32) d[i] = s[i];
    } else {
        for (int64_t i = lane; i < bytes; i += 32) dst[i] = src[i];
    }
}

// Copies staged row j (payload when `out_x`, scales when `out_scales`) into output row r. One warp.
__device__ __forceinline__ void copy_staged_row(const EpDims& dm, const uint8_t* stage_x, const float* stage_scales,
                                                int64_t j, int out_row_bytes, uint8_t* out_x, float* out_scales,
                                                int64_t r, int lane) {
    if (out_x) warp_copy<false>(out_x + r * out_row_bytes, stage_x + j * dm.stage_row_bytes, out_row_bytes, lane);
    for (int i = lane; out_scales && i < dm.scale_cols; i += 32)
        out_scales[r * dm.scale_cols + i] = stage_scales[j * dm.scale_cols + i];
}

__device__ __forceinline__ int warp_id() { return (blockIdx.x * blockDim.x + threadIdx.x) >> 5; }
__device__ __forceinline__ int warp_count() { return (gridDim.x * blockDim.x) >> 5; }
__device__ __forceinline__ int64_t thread_id() { return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t thread_count() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

__device__ __forceinline__ int64_t load_expert(const void* topk, int idx64, int64_t i) {
    return idx64 ? reinterpret_cast<const long long*>(topk)[i]
                 : static_cast<int64_t>(reinterpret_cast<const int*>(topk)[i]);
}

// The id of a slot if it is a valid expert, else -1 (invalid ids are reported by ep_route_notify).
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

// Reports slot i's expert id e, out of range (neither an expert nor -1).
__device__ void report_expert_id(int* err, int64_t i, int K, int64_t e) {
    report(err, EP_ERR_EXPERT_ID, static_cast<int>(i / K), static_cast<int>(i % K),
           static_cast<int>(e < INT32_MIN ? INT32_MIN : (e > INT32_MAX ? INT32_MAX : e)));
}

// Adds slot i to `hist`, the count of its expert, or reports its id if it is out of range (-1, a
// dropped slot, counts nowhere).
__device__ __forceinline__ void count_slot(const void* topk, int idx64, int64_t i, int E, int K, int* hist,
                                           int* err) {
    const int64_t e = load_expert(topk, idx64, i);
    if (e >= 0 && e < E) {
        atomicAdd(&hist[e], 1);
    } else if (e != -1) {
        report_expert_id(err, i, K, e);
    }
}

// Block `world` of the route kernel: counts the slots of each expert and hands each total to
// `total(e, count)` (see ep_route_notify), reports ids out of range and, when `slot_rank` is given,
// ranks every slot among the slots of its expert in (t, k) order (slot_rank[t * K + k], -1 for
// dropped slots), which places it in its expert-major group on the destination without waiting
// for the other slots. Warp w of the first `segs` takes the w-th stretch of slots: it counts its
// stretch per expert, a scan over the warps turns the counts into each stretch's first rank per
// expert, and each warp then walks its stretch 32 slots at a time, matching equal experts across
// the lanes. `before_totals` runs in thread 0 before the barrier ahead of the totals.
template <typename BeforeTotals, typename Total>
__device__ void count_experts(const EpDims& dm, const void* topk, int idx64, int num_tokens, int* slot_rank,
                              int* hist_shared, int* scratch, int* err, BeforeTotals before_totals, Total total) {
    const int E = dm.num_experts, K = dm.topk, lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const bool in_shared = E <= EP_RANK_SHARED_INTS;
    const int64_t slots = static_cast<int64_t>(num_tokens) * K;
    if (!slot_rank && in_shared) {
        // Counts alone need no stretches: one histogram, every thread adding its slots.
        for (int e = threadIdx.x; e < E; e += blockDim.x) hist_shared[e] = 0;
        __syncthreads();
        for (int64_t i = threadIdx.x; i < slots; i += blockDim.x) count_slot(topk, idx64, i, E, K, hist_shared, err);
        if (threadIdx.x == 0) before_totals();
        __syncthreads();
        for (int e = threadIdx.x; e < E; e += blockDim.x) total(e, hist_shared[e]);
        return;
    }
    // At least 32 slots a warp: every stretch costs each expert a step of the scan below, which
    // would outlast the counting itself for a few slots.
    const int most_segs = in_shared ? min(static_cast<int>(blockDim.x >> 5), EP_RANK_SHARED_INTS / E) : 32;
    const int segs = static_cast<int>(max(int64_t{1}, min(static_cast<int64_t>(most_segs), (slots + 31) / 32)));
    int* hist = in_shared ? hist_shared : scratch;
    const int64_t stretch = (slots + segs - 1) / segs;
    for (int64_t i = threadIdx.x; i < static_cast<int64_t>(segs) * E; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    const int64_t begin = w * stretch, end = min(slots, begin + stretch);
    int* mine = hist + static_cast<int64_t>(w) * E;
    for (int64_t i = begin + lane; w < segs && i < end; i += 32) count_slot(topk, idx64, i, E, K, mine, err);
    if (threadIdx.x == 0) before_totals();
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        int running = 0;
        for (int v = 0; v < segs; ++v) {
            const int c = hist[static_cast<int64_t>(v) * E + e];
            hist[static_cast<int64_t>(v) * E + e] = running;
            running += c;
        }
        total(e, running);
    }
    __syncthreads();
    if (!slot_rank || w >= segs) return;
    const unsigned below = (1u << lane) - 1u;
    for (int64_t at = begin; at < end; at += 32) {
        const int64_t i = at + lane;
        const int e = i < end ? slot_expert(topk, idx64, i, E) : -1;
        const unsigned same = __match_any_sync(0xffffffffu, e);
        const int before = __popc(same & below);
        const int first = e >= 0 ? mine[e] : 0;
        if (i < end) slot_rank[i] = e >= 0 ? first + before : -1;
        __syncwarp();
        if (e >= 0 && before == 0) mine[e] = first + __popc(same);
        __syncwarp();
    }
}

// Source side routing, block d < world of the route kernel: finds, for each token t in ascending
// order, its position among the tokens going to rank d (-1 if none), then publishes their count as
// word d of this rank's inbox row on every rank (store_inbox_word, a thread per rank)
// and adds 1 to `routed` (release, device scope): the counting block commits the call number only
// after every route block read it. The experts' owners are copied into `owners` (shared,
// EP_RANK_SHARED_INTS ints) while the first slot ids are on their way, when they fit: the owner of
// a slot is then no second round trip to memory after its id.
__device__ void route_block(const EpPeers& peers, const EpDims& dm, uint64_t epoch, const void* topk, int idx64,
                            int num_tokens, const int* expert_rank, int* owners, int* pos, unsigned* routed) {
    const int K = dm.topk, E = dm.num_experts;
    const int d = blockIdx.x;
    // Eight slots at a time, their ids loaded at once: token t's slots k0..k0+7 (-1 past K).
    const auto load_ids = [&](int t, int k0, int (&e)[8]) {
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            const int64_t i = static_cast<int64_t>(t) * K + k0 + u;
            e[u] = t < num_tokens && k0 + u < K ? slot_expert(topk, idx64, i, E) : -1;
        }
    };
    int first_ids[8];
    load_ids(threadIdx.x, 0, first_ids);
    const bool staged = E <= EP_RANK_SHARED_INTS;
    for (int e = threadIdx.x; staged && e < E; e += blockDim.x) owners[e] = expert_rank[e];
    __syncthreads();
    const int* owner = staged ? owners : expert_rank;
    int running = 0;
    for (int base = 0; base < num_tokens; base += blockDim.x) {
        const int t = base + threadIdx.x;
        int goes = 0;
        for (int k0 = 0; t < num_tokens && k0 < K; k0 += 8) {
            int e[8];
            if (base == 0 && k0 == 0) {
#pragma unroll
                for (int u = 0; u < 8; ++u) e[u] = first_ids[u];
            } else {
                load_ids(t, k0, e);
            }
#pragma unroll
            for (int u = 0; u < 8; ++u) goes |= e[u] >= 0 && owner[e[u]] == d;
        }
        int total;
        int prefix = block_exclusive_scan(goes, &total);
        if (t < num_tokens) pos[static_cast<int64_t>(t) * dm.world + d] = goes ? running + prefix : -1;
        running += total;
    }
    if (threadIdx.x < dm.world) store_inbox_word(peers, dm, epoch, threadIdx.x, d, running);
    // The scan's barriers put every thread's read of the call number before this add.
    if (threadIdx.x == 0) red_add_release_gpu(routed, 1u);
}

// The counting block's wait (one thread) until the world route blocks read the call number (see
// route_block), after which it resets `routed` for the next launch. False on timeout. Not cut
// short by a failure: every route block must have added before the reset.
__device__ bool await_routes(const EpDims& dm, unsigned* routed, int* err) {
    const bool ok = spin_until([&] { return ld_acquire_gpu(routed) >= static_cast<unsigned>(dm.world); }, dm,
                               global_timer_ns() + dm.timeout_ns, false, dm.rank, EP_SIG_ENTER, err);
    *routed = 0u;
    return ok;
}

// The count exchange, run by the route kernel's counting block once it has published its own
// counts. Every rank's row in this rank's inbox (counts per destination from the route blocks,
// per expert and the receive slot from the counting blocks) carries the call number in each word
// (moe_ep.h), which also tells every peer this rank entered the call: a word is read as soon as
// it is current, so no fence or flag separates the counts from their readers. Waits until every
// rank's row here is current (into `staged`, EP_RANK_SHARED_INTS shared ints, when it fits), while
// the block's last thread waits for this rank's route blocks (await_routes). Then derives: where
// each source's rows start here (recv_base[world+1]), where this rank's rows start on each
// destination (my_base_on[world]), the count tensors of the output, the aligned expert-major
// offsets with the first row of each (source, local expert) in them (group_base[world][E_local]),
// and every rank's capacity check (all ranks compute the same verdict, so an overflow stops all
// of them alike).
__device__ void notify(const EpPeers& peers, const EpDims& dm, uint64_t epoch, const int* expert_rank,
                       const int* local_experts, const int* capacity, int align, int* recv_base, int* my_base_on,
                       int* out_per_src, int* out_per_expert, int* out_offsets, int* group_base, unsigned* routed,
                       int* staged, int* err) {
    const int row = EP_INBOX_ROW(dm.world, dm.num_experts);
    // What the derivation below reads besides the inbox, loaded while the peers' rows are on their
    // way: the capacities, and each thread's first local expert.
    __shared__ int cap[EP_MAX_WORLD];
    if (threadIdx.x < dm.world) cap[threadIdx.x] = capacity[threadIdx.x];
    const int first_local = threadIdx.x < dm.num_local ? local_experts[threadIdx.x] : 0;

    const uint64_t* mine = inbox_row(peers, dm, epoch, dm.rank, 0);
    const int words = dm.world * row;
    const bool in_shared = words <= EP_RANK_SHARED_INTS;
    const uint64_t deadline = global_timer_ns() + dm.timeout_ns;
    bool ok = true;
    for (int i = threadIdx.x; ok && i < words; i += blockDim.x) {
        uint64_t w;
        ok = await_inbox_word(dm, epoch, mine + i, i / row, deadline, err, &w);
        if (in_shared) staged[i] = inbox_value(w);
    }
    if (threadIdx.x == blockDim.x - 1) ok = await_routes(dm, routed, err) && ok;
    if (!__syncthreads_and(ok)) return;
    EP_TRACE_POINT(kTraceCountsIn);
    // Every word is current: past L1, each reads as this call wrote it.
    const auto* mine_words = reinterpret_cast<const unsigned long long*>(mine);
    const auto in = [&](int s, int i) {
        return in_shared ? staged[s * row + i] : inbox_value(__ldcg(mine_words + s * row + i));
    };

    __shared__ int need[EP_MAX_WORLD];
    if (threadIdx.x < dm.world) {
        const int d = threadIdx.x;
        int base = 0, total = 0;
        for (int s = 0; s < dm.world; ++s) {
            if (s == dm.rank) base = total;
            total += in(s, d);
        }
        my_base_on[d] = base;
        need[d] = align > 0 ? 0 : total;
    }
    if (threadIdx.x == 0) {
        int at = 0;
        for (int s = 0; s < dm.world; ++s) {
            recv_base[s] = at;
            out_per_src[s] = in(s, dm.rank);
            at += in(s, dm.rank);
        }
        recv_base[dm.world] = at;
    }
    __syncthreads();
    // Expert rows: every expert's slot total, aligned, added to its owner's need.
    for (int e = threadIdx.x; align > 0 && e < dm.num_experts; e += blockDim.x) {
        int c = 0;
        for (int s = 0; s < dm.world; ++s) c += in(s, dm.world + e);
        atomicAdd(&need[expert_rank[e]], (c + align - 1) / align * align);
    }
    // Each local expert's rows; expert-major, the aligned group starts (a block scan) and the first
    // row of each (source, local expert) in them.
    int running = 0;
    for (int first = 0; first < dm.num_local; first += blockDim.x) {
        const int g = first + threadIdx.x;
        const int e = first == 0 ? first_local : (g < dm.num_local ? local_experts[g] : 0);
        int c = 0;
        for (int s = 0; g < dm.num_local && s < dm.world; ++s) c += in(s, dm.world + e);
        if (g < dm.num_local) out_per_expert[g] = c;
        if (align <= 0) continue;
        int total;
        int at = running + block_exclusive_scan(g < dm.num_local ? (c + align - 1) / align * align : 0, &total);
        running += total;
        if (g >= dm.num_local) continue;
        out_offsets[g] = at;
        for (int s = 0; group_base && s < dm.world; ++s) {
            group_base[s * dm.num_local + g] = at;
            at += in(s, dm.world + e);
        }
    }
    if (align > 0 && threadIdx.x == 0) out_offsets[dm.num_local] = running;
    __syncthreads();
    for (int d = 0; threadIdx.x == 0 && d < dm.world; ++d) {
        if (need[d] > cap[d]) {
            report(err, EP_ERR_CAPACITY, d, need[d], cap[d]);
            break;
        }
    }
}

// A dispatch's first kernel, world + 1 blocks: routing in blocks 0..world-1 (see route_block,
// which publish their counts per destination); block `world` counts (and, expert-major, ranks)
// the slots of each expert (count_experts) and publishes those counts and this rank's receive
// slot, then waits for every rank's and derives from them (see notify), and commits the call
// number (commit_call; no other block reads it). Expert-major, also each slot's rank in its
// expert (slot_rank [T * K]; rank_scratch int [32][E] past EP_RANK_SHARED_INTS experts) and
// group_base. `done` counts the route blocks that read the call number.
extern "C" __global__ void __launch_bounds__(1024)
    ep_route_notify(EpPeers peers, EpDims dm, const void* topk, int idx64, int num_tokens, const int* expert_rank,
                    const int* local_experts, const int* capacity, int align, int recv_slot, int* pos,
                    int* slot_rank, int* rank_scratch, int* recv_base, int* my_base_on, int* out_per_src,
                    int* out_per_expert, int* out_offsets, int* group_base, unsigned* done, int* err) {
    follow_prior_grids();
    EP_TRACE_POINT(kTraceRouteStart);
    // The route blocks' owner table, else count_experts' histograms, then notify's inbox copy.
    __shared__ int shared_ints[EP_RANK_SHARED_INTS];
    const uint64_t epoch = call_epoch(dm);
    if (blockIdx.x < dm.world) {
        route_block(peers, dm, epoch, topk, idx64, num_tokens, expert_rank, shared_ints, pos, done);
        EP_TRACE_POINT(kTraceRouted);
        return;
    }
    // A call after a failure the host has not read yet publishes nothing more and waits for no
    // one. The error record is loaded here and looked at after the counting, so its round trip
    // overlaps it. Its route blocks publish regardless: without this block's words, this rank's
    // row never reads as complete to a peer.
    __shared__ int failed_before;
    const bool failed_at_start = threadIdx.x == 0 && failed(err);
    count_experts(
        dm, topk, idx64, num_tokens, slot_rank, shared_ints, rank_scratch, err,
        [&] { failed_before = failed_at_start; },
        [&](int e, int count) {
            if (!failed_before) publish_word(peers, dm, epoch, dm.world + e, count);
        });
    if (threadIdx.x == 0 && !failed_before) publish_word(peers, dm, epoch, dm.world + dm.num_experts, recv_slot);
    __syncthreads();
    EP_TRACE_POINT(kTraceCounted);
    if (!failed_before) {
        notify(peers, dm, epoch, expert_rank, local_experts, capacity, align, recv_base, my_base_on, out_per_src,
               out_per_expert, out_offsets, group_base, done, shared_ints, err);
    } else if (threadIdx.x == 0) {
        await_routes(dm, done, err);
    }
    __syncthreads();
    EP_TRACE_POINT(kTraceRouteEnd);
    if (threadIdx.x == 0) commit_call(dm);
}

// Pieces per row when `items` rows go out over `warps` warps: with fewer rows than warps, a row's
// copy is split (up to kRowUnits ways) so that idle warps take part and no warp walks a whole row
// alone (its loads are a chain of batches); every warp still has one piece at most.
__device__ __forceinline__ int row_parts(int64_t items, int warps, bool whole_rows) {
    int parts = 1;
    while (!whole_rows && parts < kRowUnits && items * parts * 2 <= warps) parts *= 2;
    return parts;
}

// Bytes of each piece: whole copy batches of warp_copy, so that no piece ends in a short batch.
__device__ __forceinline__ int64_t part_bytes_of(int64_t row_bytes, int parts) {
    constexpr int64_t kBatch = kCopyUnroll * 512;
    return ((row_bytes + parts - 1) / parts + kBatch - 1) / kBatch * kBatch;
}

// Piece `part` (of `part_bytes`, see part_bytes_of) of a row of `row_bytes`, from `src` into a
// peer's `dst` by the whole warp; the last piece may be short, and a piece past the row's end is
// empty.
__device__ __forceinline__ void copy_row_piece(uint8_t* dst, const uint8_t* src, int64_t row_bytes, int part,
                                               int64_t part_bytes, int lane) {
    const int64_t begin = part * part_bytes, bytes = min(part_bytes, row_bytes - begin);
    if (bytes > 0) warp_copy<true>(dst + begin, src + begin, bytes, lane);
}

// After a warp stored its piece of a row (one of `parts`): adds the piece's share of kRowUnits to
// the peer's arrival `counter` of the row's chunk, with a system-scope release. The warp barrier
// orders every lane's stores before lane 0's release (cumulativity), so the peer sees the whole
// piece once it sees the count.
__device__ __forceinline__ void release_piece(unsigned* counter, int parts, int lane) {
    __syncwarp();
    if (lane == 0) red_add_release_sys(counter, kRowUnits / parts);
}

// One sending warp's share of the tokens: the x row, the scales row (when `scales` is given:
// replays of gradients carry none), and (unless `payload_only`, i.e. a replay) the row's metadata,
// straight into the destination's staging buffers at the row the routing gave it, in the receive
// slot the destination picked. Items (token, destination) go to warps in turn; with fewer items
// than warps, a row goes out in pieces, a warp each (row_parts). The first piece carries the
// scales and metadata, except where the whole row is counted at once (not `count_arrivals`):
// there they are a piece of their own, so that the metadata's chain of dependent loads runs
// beside the payload's copy instead of after it. When the destination lays rows out as they come
// (`count_arrivals`), the warp then adds kRowUnits / parts to its arrival counter of the row's
// chunk, with a system-scope release. Otherwise (token-major) the units of its pieces add up per
// destination (lane d keeping destination d's) into the block's tally `block_units`, which the
// block then counts in on each destination (count_rows_in).
__device__ void send_rows(const EpPeers& peers, const EpDims& dm, const uint8_t* x, const float* scales,
                          const void* topk, int idx64, const float* weights, const int* expert_rank,
                          const int* local_index, const int* pos, const int* my_base_on, const int* slot_rank,
                          int num_tokens, int payload_only, bool count_arrivals, unsigned* block_units,
                          const int* err, int warp, int warps) {
    const int lane = threadIdx.x & 31;
    // A call that failed before (a count exchange that timed out derived no bases) sends nothing.
    // The warp reads that beside its first item's loads rather than ahead of them.
    const bool call_failed = failed(err);
    const int K = dm.topk, S = dm.scale_cols, W = dm.world;
    const int64_t items = static_cast<int64_t>(num_tokens) * W;
    const int parts = row_parts(items, warps, false);
    const int64_t part_bytes = part_bytes_of(dm.x_row_bytes, parts);
    // Pieces per item: the payload's parts, and the side piece (scales, metadata) when apart.
    const bool side_apart = parts > 1 && !count_arrivals && (!payload_only || (S > 0 && scales));
    const int pieces = parts + side_apart;
    const int side_part = side_apart ? parts : 0;
    unsigned units = 0;  // lane d: the units this warp stored on destination d (token-major)
    // Lane d: where this rank's rows start in destination d's receive slot, loaded once rather than
    // for every item (the slot's word needs the call number first: two round trips to memory).
    int64_t first_row = 0;
    if (lane < W) first_row = slot_base(peers, dm, call_epoch(dm), lane) + my_base_on[lane];
    for (int64_t piece = warp; piece < items * pieces; piece += warps) {
        const int64_t item = piece / pieces;
        const int part = static_cast<int>(piece - item * pieces);
        const int t = static_cast<int>(item / W), d = static_cast<int>(item - static_cast<int64_t>(t) * W);
        const int p = pos[item];
        const int64_t row = __shfl_sync(0xffffffffu, first_row, d) + p;
        if (call_failed) return;
        if (p < 0) continue;
        if (part < parts) {
            copy_row_piece(reinterpret_cast<uint8_t*>(peers.stage_x[d]) + row * dm.stage_row_bytes,
                           x + static_cast<int64_t>(t) * dm.x_row_bytes, dm.x_row_bytes, part, part_bytes, lane);
        }
        if (part == side_part && S > 0 && scales) {
            float* dst = reinterpret_cast<float*>(peers.stage_scales[d]) + row * S;
            for (int i = lane; i < S; i += 32) dst[i] = scales[static_cast<int64_t>(t) * S + i];
        }
        if (part == side_part && !payload_only) {
            int* meta = reinterpret_cast<int*>(peers.stage_meta[d]) + row * EP_META_INTS(K);
            if (lane == 0) {
                meta[0] = dm.rank;
                meta[1] = t;
            }
            for (int k = lane; k < K; k += 32) {
                const int64_t i = static_cast<int64_t>(t) * K + k;
                int e = slot_expert(topk, idx64, i, dm.num_experts);
                bool here = e >= 0 && expert_rank[e] == d;
                meta[2 + k] = here ? local_index[e] : -1;
                float w = (here && weights) ? weights[i] : 0.f;
                meta[2 + K + k] = __float_as_int(w);
                meta[2 + 2 * K + k] = here && slot_rank ? slot_rank[i] : -1;
            }
        }
        if (count_arrivals) {
            release_piece(arrival_counter(peers.signals[d], dm, dm.rank, p / EP_CHUNK_TOKENS), parts, lane);
        } else if (lane == d) {
            units += (part < parts ? kRowUnits / parts : 0) + (part == side_part ? kRowUnits : 0);
        }
    }
    if (units > 0) atomicAdd(&block_units[lane], units);
}

// Once every warp of the block stored its rows (token-major): adds the block's units of each
// destination (`block_units`, see send_rows) to that destination's data counter of this rank, one
// release per destination (wait_rows_in). One add per block and destination rather than per warp:
// adds to one word queue up at its owner.
__device__ void count_rows_in(const EpPeers& peers, const EpDims& dm, const unsigned* block_units) {
    // The barrier orders every thread's stores before each releasing thread's add (cumulative).
    __syncthreads();
    const int d = threadIdx.x;
    if (d < dm.world && block_units[d] > 0) {
        red_add_release_sys(signal_slot(peers.signals[d], EP_SIG_DATA, dm.rank), uint64_t{block_units[d]});
    }
}

// Waits until source s's arrival counter of chunk c reached `expected` units. One warp; false in
// every lane on timeout (naming s) or once the call failed.
__device__ bool wait_arrivals(const EpDims& dm, int s, int c, unsigned expected, int* err) {
    const int lane = threadIdx.x & 31;
    const bool ok = lane != 0 || await_arrivals(dm, s, c, expected, err);
    // Lane 0's acquired view passes to the whole warp through the vote's barrier.
    return __all_sync(0xffffffffu, ok);
}

// Marks the expert-major rows that hold no slot (src and local_expert -1, weight 0): the tail of
// each group past its rows, and every row past the last group. Warps `warp`, `warp + warps`, ...
__device__ void mark_padding(const EpDims& dm, const EpExpand& ex, int warp, int warps) {
    const int lane = threadIdx.x & 31;
    const int* offsets = reinterpret_cast<const int*>(ex.offsets);
    const int* per_expert = reinterpret_cast<const int*>(ex.per_expert);
    int* out_src = reinterpret_cast<int*>(ex.out_src);
    int* out_local_expert = reinterpret_cast<int*>(ex.out_local_expert);
    float* out_weights = reinterpret_cast<float*>(ex.out_weights);
    const auto mark = [&](int64_t r) {
        out_src[3 * r] = -1;
        out_src[3 * r + 1] = -1;
        out_src[3 * r + 2] = -1;
        out_local_expert[r] = -1;
        if (out_weights) out_weights[r] = 0.f;
    };
    for (int g = warp; g < dm.num_local; g += warps) {
        for (int r = offsets[g] + per_expert[g] + lane; r < offsets[g + 1]; r += 32) mark(r);
    }
    for (int64_t r = offsets[dm.num_local] + static_cast<int64_t>(warp) * 32 + lane; r < ex.out_rows;
         r += static_cast<int64_t>(warps) * 32)
        mark(r);
}

// Records where staged row j's slots go in the expert-major output: a dispatch derives each
// slot's row from the metadata (group_base + the slot's rank) and writes it to exp_rows with the
// slot's src, local expert and weight; a replay finds them recorded. One warp.
__device__ void record_row(const EpDims& dm, const EpExpand& ex, int j, int lane) {
    const int K = dm.topk;
    int* exp_rows = reinterpret_cast<int*>(ex.exp_rows) + static_cast<int64_t>(j) * K;
    const int* meta = reinterpret_cast<const int*>(ex.stage_meta) + static_cast<int64_t>(j) * EP_META_INTS(K);
    const int* group_base = reinterpret_cast<const int*>(ex.group_base);
    const int s = meta[0], t = meta[1];
    if (lane < 2) reinterpret_cast<int*>(ex.row_src)[2 * static_cast<int64_t>(j) + lane] = meta[lane];
    for (int k = lane; k < K; k += 32) {
        const int g = meta[2 + k];
        int r = -1;
        if (g >= 0) {
            r = group_base[s * dm.num_local + g] + meta[2 + 2 * K + k];
            const float w = __int_as_float(meta[2 + K + k]);
            int* src = reinterpret_cast<int*>(ex.out_src) + 3 * static_cast<int64_t>(r);
            src[0] = s;
            src[1] = t;
            src[2] = k;
            reinterpret_cast<int*>(ex.out_local_expert)[r] = g;
            if (ex.out_weights) reinterpret_cast<float*>(ex.out_weights)[r] = w;
            reinterpret_cast<float*>(ex.row_weights)[r] = ex.has_weights ? w : 1.f;
        }
        exp_rows[k] = r;
    }
}

// Whether the payload can move 16 bytes a lane, one slot per lane.
__device__ __forceinline__ bool rows_vectorize(const EpDims& dm, const EpExpand& ex) {
    return dm.topk <= 32 && (dm.stage_row_bytes & 15) == 0 && (ex.out_row_bytes & 15) == 0 &&
           aligned16(reinterpret_cast<const void*>(ex.stage_x)) && aligned16(reinterpret_cast<const void*>(ex.out_x));
}

// Copies staged row j to the output rows of its slots (lane k holding slot k's, -1 for none)
// through registers: each vector is loaded once and stored to every row.
__device__ void copy_row_direct(const EpDims& dm, const EpExpand& ex, int j, int r_mine, int lane) {
    constexpr int kUnroll = 4;
    const unsigned slots = __ballot_sync(0xffffffffu, r_mine >= 0);
    const int4* src = reinterpret_cast<const int4*>(ex.stage_x + static_cast<int64_t>(j) * dm.stage_row_bytes);
    const int n = ex.out_row_bytes / 16;
    for (int base = 0; base < n; base += kUnroll * 32) {
        int4 v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int i = base + u * 32 + lane;
            if (i < n) v[u] = src[i];
        }
        for (unsigned m = slots; m != 0; m &= m - 1) {
            const int r = __shfl_sync(0xffffffffu, r_mine, __ffs(m) - 1);
            int4* dst = reinterpret_cast<int4*>(ex.out_x + static_cast<int64_t>(r) * ex.out_row_bytes);
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
                const int i = base + u * 32 + lane;
                if (i < n) dst[i] = v[u];
            }
        }
    }
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// A laying-out warp's share of the dynamic shared memory for the bulk copy engine: kBulkStages
// buffers of `chunk` bytes, each with an mbarrier its loads complete, and how many chunks the
// warp loaded so far (chunk k uses buffer k % kBulkStages for the (k / kBulkStages)-th time).
constexpr int kBulkStages = 4;
constexpr int kBulkHeader = 128;  // the mbarriers, keeping the buffers 128-byte aligned
struct BulkStages {
    uint64_t* bars;
    uint8_t* buf;
    int chunk;
    unsigned loaded;
};

// Lane 0 sets up the warp's stages in its `bytes` of shared memory at `region` (128-byte
// aligned); chunk 0 when they cannot hold 16 bytes each.
__device__ BulkStages bulk_stages(uint8_t* region, int bytes, int lane) {
    BulkStages st{reinterpret_cast<uint64_t*>(region), region + kBulkHeader,
                  bytes > kBulkHeader ? ((bytes - kBulkHeader) / kBulkStages) & ~15 : 0, 0u};
    if (lane == 0 && st.chunk > 0) {
        for (int i = 0; i < kBulkStages; ++i) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(st.bars + i)));
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncwarp();
    return st;
}

// Copies staged rows j0 .. j0 + n - 1 to the output rows their slots expand to (exp_rows) with
// the bulk copy engine, which needs no registers for the bytes in flight: lane 0 loads each
// chunk of a row into a stage two chunks ahead, and once it landed stores it from there to every
// row the slots expand to. A stage is loaded again only when the stores that read it are done.
__device__ void copy_rows_bulk(const EpDims& dm, const EpExpand& ex, int j0, int n, BulkStages& st, int lane) {
    const int K = dm.topk, row_bytes = ex.out_row_bytes, chunk = min(st.chunk, row_bytes);
    const int per_row = (row_bytes + chunk - 1) / chunk, total = n * per_row;
    const int* exp_rows = reinterpret_cast<const int*>(ex.exp_rows);
    const auto stage_of = [&](int q) { return st.buf + ((st.loaded + q) % kBulkStages) * static_cast<int64_t>(st.chunk); };
    const auto bar_of = [&](int q) { return smem_addr(st.bars + (st.loaded + q) % kBulkStages); };
    const auto load = [&](int q) {  // lane 0
        const int row = q / per_row, off = (q - row * per_row) * chunk, bytes = min(chunk, row_bytes - off);
        const uint8_t* src = reinterpret_cast<const uint8_t*>(ex.stage_x) +
                             static_cast<int64_t>(j0 + row) * dm.stage_row_bytes + off;
        // The stage's last reader is the store of chunk q - 4; only chunk q - 3's may still read.
        asm volatile("cp.async.bulk.wait_group.read 1;" ::: "memory");
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar_of(q)), "r"(bytes) : "memory");
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                         smem_addr(stage_of(q))),
                     "l"(src), "r"(bytes), "r"(bar_of(q))
                     : "memory");
    };
    if (lane == 0) {
        // The rows were stored by peers and acquired through the generic proxy; the bulk loads
        // read through the async proxy.
        asm volatile("fence.proxy.async;" ::: "memory");
        for (int q = 0; q < min(2, total); ++q) load(q);
    }
    int r_mine = -1;
    for (int q = 0; q < total; ++q) {
        const int row = q / per_row, off = (q - row * per_row) * chunk, bytes = min(chunk, row_bytes - off);
        if (off == 0) r_mine = lane < K ? exp_rows[static_cast<int64_t>(j0 + row) * K + lane] : -1;
        const unsigned slots = __ballot_sync(0xffffffffu, r_mine >= 0);
        if (lane == 0) {
            if (q + 2 < total) load(q + 2);
            const uint32_t parity = ((st.loaded + q) / kBulkStages) & 1u;
            uint32_t landed = 0;
            while (!landed) {
                asm volatile(
                    "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                    : "=r"(landed)
                    : "r"(bar_of(q)), "r"(parity)
                    : "memory");
            }
        }
        for (unsigned m = slots; m != 0; m &= m - 1) {
            const int r = __shfl_sync(0xffffffffu, r_mine, __ffs(m) - 1);
            if (lane == 0) {
                uint8_t* dst = reinterpret_cast<uint8_t*>(ex.out_x) + static_cast<int64_t>(r) * row_bytes + off;
                asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst),
                             "r"(smem_addr(stage_of(q))), "r"(bytes)
                             : "memory");
            }
        }
        if (lane == 0) asm volatile("cp.async.bulk.commit_group;" ::: "memory");
    }
    st.loaded += total;
}

// Lays out staged rows j0 .. j0 + n - 1, all arrived: records their slots' rows (a dispatch),
// then copies the payload and the scales to every such row. One warp.
__device__ void expand_rows(const EpDims& dm, const EpExpand& ex, int j0, int n, BulkStages& st, int lane) {
    const int K = dm.topk, S = dm.scale_cols;
    if (ex.group_base) {
        for (int j = j0; j < j0 + n; ++j) record_row(dm, ex, j, lane);
        __syncwarp();
    }
    const int* exp_rows = reinterpret_cast<const int*>(ex.exp_rows);
    if (rows_vectorize(dm, ex) && st.chunk > 0) {
        copy_rows_bulk(dm, ex, j0, n, st, lane);
    } else if (rows_vectorize(dm, ex)) {
        for (int j = j0; j < j0 + n; ++j)
            copy_row_direct(dm, ex, j, lane < K ? exp_rows[static_cast<int64_t>(j) * K + lane] : -1, lane);
    } else {
        for (int j = j0; j < j0 + n; ++j) {
            for (int k = 0; k < K; ++k) {
                const int r = exp_rows[static_cast<int64_t>(j) * K + k];
                if (r >= 0)
                    copy_staged_row(dm, reinterpret_cast<const uint8_t*>(ex.stage_x), nullptr, j, ex.out_row_bytes,
                                    reinterpret_cast<uint8_t*>(ex.out_x), nullptr, r, lane);
            }
        }
    }
    for (int j = j0; S > 0 && ex.out_scales && j < j0 + n; ++j) {
        for (int k = 0; k < K; ++k) {
            const int r = exp_rows[static_cast<int64_t>(j) * K + k];
            if (r < 0) continue;
            const float* from = reinterpret_cast<const float*>(ex.stage_scales) + static_cast<int64_t>(j) * S;
            float* to = reinterpret_cast<float*>(ex.out_scales) + static_cast<int64_t>(r) * S;
            for (int i = lane; i < S; i += 32) to[i] = from[i];
        }
    }
}

// One laying-out warp's share of the staged rows: items `warp`, `warp + warps`, ... of (group of
// rows, source), sources interleaved as the senders send, each once its arrival chunk is
// complete. Groups are of 8 rows when there are enough to keep every warp busy, down to 1 for
// few tokens. A dispatch first marks the padding rows. False once the call failed.
__device__ bool expand_arrivals(const EpDims& dm, const EpExpand& ex, uint8_t* region, int region_bytes, int warp,
                                int warps, int* err) {
    const int W = dm.world, lane = threadIdx.x & 31;
    BulkStages st = bulk_stages(region, region_bytes, lane);
    const int* recv_base = reinterpret_cast<const int*>(ex.recv_base);
    if (ex.group_base) mark_padding(dm, ex, warp, warps);
    int most = 0;
    for (int s = 0; s < W; ++s) most = max(most, recv_base[s + 1] - recv_base[s]);
    int group = 8;  // divides EP_CHUNK_TOKENS, so a group lies in one arrival chunk
    while (group > 1 && (most + group - 1) / group * W < 2 * warps) group /= 2;
    const int items = (most + group - 1) / group * W;
    for (int item = warp; item < items; item += warps) {
        const int s = (item % W + dm.rank) % W;
        const int first = item / W * group, rows = recv_base[s + 1] - recv_base[s];
        if (first >= rows) continue;
        const int c = first / EP_CHUNK_TOKENS;
        const unsigned expected = min(EP_CHUNK_TOKENS, rows - c * EP_CHUNK_TOKENS) * kRowUnits;
        if (!wait_arrivals(dm, s, c, expected, err)) break;
        expand_rows(dm, ex, recv_base[s] + first, min(group, rows - first), st, lane);
    }
    // The last bulk stores read the stages until they are done.
    if (lane == 0 && st.chunk > 0) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
    return !failed(err);
}

// The token-major layout's metadata of staged rows [0, rows) (records of EP_META_INTS(K) ints:
// source rank and token, K local slot ids, K weights): out_src and row_src get the pair, out_topk
// and row_slots the slot ids, out_weights (when given) the weights. Flat over (row, field) among
// the threads first, first + stride, ..., each with kMetaLoads records' loads in flight: a warp per
// row walked its rows one round trip after another (25 us at T = 4096 on 4 GPUs, where a warp had
// 20 rows). The records came from peers, so they are read past L1.
constexpr int kMetaLoads = 4;

__device__ void copy_row_meta(const EpTokenLayout& tl, int rows, int K, int first, int stride) {
    const auto* stage_meta = reinterpret_cast<const int*>(tl.stage_meta);
    auto* out_src = reinterpret_cast<int*>(tl.out_src);
    auto* row_src = reinterpret_cast<int*>(tl.row_src);
    auto* out_topk = reinterpret_cast<int*>(tl.out_topk);
    auto* row_slots = reinterpret_cast<int*>(tl.row_slots);
    auto* out_weights = reinterpret_cast<float*>(tl.out_weights);
    const int fields = 2 + K, n = rows * fields;
    for (int i0 = first; i0 < n; i0 += kMetaLoads * stride) {
        int value[kMetaLoads], weight[kMetaLoads];
#pragma unroll
        for (int u = 0; u < kMetaLoads; ++u) {
            const int i = i0 + u * stride, j = i / fields, f = i - j * fields;
            const int* meta = stage_meta + static_cast<int64_t>(j) * EP_META_INTS(K);
            if (i < n) value[u] = __ldcg(meta + f);
            if (i < n && f >= 2 && out_weights) weight[u] = __ldcg(meta + K + f);  // meta[2 + K + k]
        }
#pragma unroll
        for (int u = 0; u < kMetaLoads; ++u) {
            const int i = i0 + u * stride, j = i / fields, f = i - j * fields;
            if (i >= n) break;
            if (f < 2) {
                out_src[2 * j + f] = value[u];
                row_src[2 * j + f] = value[u];
            } else {
                const int64_t at = static_cast<int64_t>(j) * K + (f - 2);
                out_topk[at] = value[u];
                row_slots[at] = value[u];
                if (out_weights) out_weights[at] = __int_as_float(weight[u]);
            }
        }
    }
}

// Token-major layout, by every warp of a grid once its own rows are out: waits for every rank's
// rows, which are staged (in this call's receive slot) in (source, token) order, and copies them
// out (the payload only when tl.out_x: an output that is the slot itself needs no copy), with
// their metadata unless tl.payload_only. Also keeps, for the handle, each row's (source, token)
// and local slot ids, and first marks the output rows past the valid ones (src and topk_idx -1,
// weights 0; their payload is unspecified). Payload and scales go a warp per row, the metadata
// flat among the threads (copy_row_meta). Past the wait, warp 0 arrives on `done` for the block
// and, in the block that arrives last, ends the kernel's part of the call (zeroes the data
// counters, commits the call number) while the other warps copy: every block is past its wait by
// then, and nothing after it reads the counters or the call number.
__device__ void lay_out_token_rows(const EpDims& dm, const EpTokenLayout& tl, unsigned* done, int* err) {
    EP_TRACE_POINT(kTraceLayoutStart);
    const int lane = threadIdx.x & 31;
    const int K = dm.topk;
    // A call that failed before (a count exchange timed out) derived no recv_base: it marks
    // nothing and stops at the wait below.
    const int rows = failed(err) ? tl.out_rows : reinterpret_cast<const int*>(tl.recv_base)[dm.world];
    if (!tl.payload_only) {
        // The rows past the valid ones take nothing from the peers: marked while the last rows travel.
        auto* out_topk = reinterpret_cast<int*>(tl.out_topk);
        auto* out_weights = reinterpret_cast<float*>(tl.out_weights);
        auto* out_src = reinterpret_cast<int*>(tl.out_src);
        const int64_t unused = max(int64_t{0}, static_cast<int64_t>(tl.out_rows) - rows);
        for (int64_t i = thread_id(); i < unused * K; i += thread_count()) {
            out_topk[static_cast<int64_t>(rows) * K + i] = -1;
            if (out_weights) out_weights[static_cast<int64_t>(rows) * K + i] = 0.f;
        }
        for (int64_t i = thread_id(); i < unused * 2; i += thread_count()) {
            out_src[2 * static_cast<int64_t>(rows) + i] = -1;
        }
    }
    const bool all_in = wait_rows_in(dm, reinterpret_cast<const int*>(tl.recv_base), err);
    EP_TRACE_POINT(kTraceLayoutFlags);
    const int per_block = static_cast<int>(blockDim.x >> 5), w = static_cast<int>(threadIdx.x >> 5);
    if (w == 0) {
        unsigned last = 0;
        if (lane == 0) last = count_block_in(done);
        if (__shfl_sync(0xffffffffu, last, 0)) {
            reset_data_counters(dm);
            if (lane == 0) commit_call(dm);
            EP_TRACE_POINT(kTraceSendEnd);
        }
    }
    // Warps 1.. copy (warp 0 too in a block of one warp): payload and scales a warp per row, then
    // the metadata flat among their threads.
    const int copiers = max(per_block - 1, 1), copier = per_block > 1 ? w - 1 : w;
    const bool copies = all_in && copier >= 0;
    for (int j = blockIdx.x * copiers + copier; copies && (tl.out_x || tl.out_scales) && j < rows;
         j += gridDim.x * copiers) {
        copy_staged_row(dm, reinterpret_cast<const uint8_t*>(tl.stage_x), reinterpret_cast<const float*>(tl.stage_scales),
                        j, tl.out_row_bytes, reinterpret_cast<uint8_t*>(tl.out_x),
                        reinterpret_cast<float*>(tl.out_scales), j, lane);
    }
    if (copies && !tl.payload_only) {
        copy_row_meta(tl, rows, K, (blockIdx.x * copiers + copier) * 32 + lane, gridDim.x * copiers * 32);
    }
    EP_TRACE_BLOCK(kTraceLayoutEnd);
}

// Sends every token once to each of its destination ranks (send_rows), one warp per (token,
// destination) so every destination's link is busy at once. A replay begins its call
// (dm.begins_call): it first publishes its own receive slot `recv_slot` and waits until every
// rank entered. Token-major (ex.send_warps 0), every warp sends and each block counts its rows in
// on every destination (count_rows_in); with tl.enabled, every block then lays out this rank's
// rows as they are all in (lay_out_token_rows), in this kernel rather than one of its own, which
// would first wait for this one to drain. Expert-major (ex.send_warps > 0), ex.send_warps warps of
// each block send and the others lay this rank's rows out as they arrive (expand_arrivals), each
// with `stage_bytes` of the dynamic shared memory for its bulk copies ((32 - send_warps) x
// stage_bytes per block, a multiple of 128 each); the last block then resets the arrival
// counters, all full by then.
extern "C" __global__ void __launch_bounds__(1024)
    ep_dispatch_send(EpPeers peers, EpDims dm, const uint8_t* x, const float* scales, const void* topk, int idx64,
                     const float* weights, const int* expert_rank, const int* local_index, const int* pos,
                     const int* my_base_on, const int* slot_rank, int num_tokens, int payload_only, int recv_slot,
                     EpExpand ex, int stage_bytes, EpTokenLayout tl, unsigned* done, int* err) {
    follow_prior_grids();
    EP_TRACE_POINT(kTraceSendStart);
    __shared__ unsigned block_units[EP_MAX_WORLD];  // token-major: this block's units per destination
    if (threadIdx.x < EP_MAX_WORLD) block_units[threadIdx.x] = 0;
    __syncthreads();
    // A replay's entry checks for an earlier failure; otherwise each warp does (send_rows, and
    // before the layout warps mark padding rows through bases that a failed call never derived).
    const bool go = dm.begins_call ? enter_call(peers, dm, recv_slot, err) : true;
    EP_TRACE_POINT(kTraceSendEntered);
    const int per_block = static_cast<int>(blockDim.x >> 5), w = static_cast<int>(threadIdx.x >> 5);
    const bool lays_out = ex.send_warps > 0;
    const int send_warps = lays_out ? min(ex.send_warps, per_block - 1) : per_block;
    if (go && w < send_warps) {
        send_rows(peers, dm, x, scales, topk, idx64, weights, expert_rank, local_index, pos, my_base_on, slot_rank,
                  num_tokens, payload_only, lays_out, block_units, err, blockIdx.x * send_warps + w,
                  gridDim.x * send_warps);
        EP_TRACE_WARP(kTraceSendWarpDone);
    } else if (go && !failed(err)) {
        const int layout_warps = per_block - send_warps;
        extern __shared__ __align__(128) uint8_t layout_stages[];  // layout_warps x stage_bytes
        expand_arrivals(dm, ex, layout_stages + static_cast<int64_t>(w - send_warps) * stage_bytes, stage_bytes,
                        blockIdx.x * layout_warps + (w - send_warps), gridDim.x * layout_warps, err);
    }
    EP_TRACE_BLOCK(kTraceSent);
    // Expert-major rows went with their own releases; token-major ones are counted in per block.
    // The last block to arrive (with tl.enabled, see lay_out_token_rows) zeroes the counters this
    // rank waited on here, and commits the call number once every block has read it.
    if (!lays_out) count_rows_in(peers, dm, block_units);
    if (tl.enabled) {
        lay_out_token_rows(dm, tl, done, err);
        return;
    }
    if (!arrive_last(done, false)) return;
    if (lays_out) reset_arrivals(dm, (dm.max_tokens + EP_CHUNK_TOKENS - 1) / EP_CHUNK_TOKENS);
    __syncthreads();
    EP_TRACE_POINT(kTraceSendEnd);
    if (threadIdx.x == 0) commit_call(dm);
}

// A call of its own (dm.begins_call): waits until every rank reached it, in stream order. One
// block.
extern "C" __global__ void ep_barrier(EpPeers peers, EpDims dm, int* err) {
    follow_prior_grids();
    EP_TRACE_DUMP(dm.rank);
    enter_call(peers, dm, -1, err);
    __syncthreads();
    EP_TRACE_POINT(kTraceBarrierEnd);
    if (threadIdx.x == 0) commit_call(dm);
}

// Holds the stream until the host stores `until` or more into `gate` (a word of mapped host
// memory), so that work queued behind it starts when the device gets to it rather than as the
// host queues it: a benchmark then times a call as a stream that runs ahead of the host sees it.
// Gives up after `timeout_ns`: a gate never opened delays the stream, it does not hang it. One
// thread.
extern "C" __global__ void ep_hold(const uint64_t* gate, uint64_t until, uint64_t timeout_ns) {
    const uint64_t deadline = global_timer_ns() + timeout_ns;
    while (ld_acquire_sys(gate) < until && global_timer_ns() < deadline) __nanosleep(256);
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

// Staged rows are grouped by source; sending them back in that order would load one link at a
// time. Work items interleave the sources instead (item i: source (i + rank) mod world, its
// (i / world)-th row), so every link is busy at once. Items per call: world * the largest
// source's row count; staged_row() is -1 for items past a source's rows.
__device__ __forceinline__ int interleaved_items(const EpDims& dm, const int* recv_base) {
    int most = 0;
    for (int s = 0; s < dm.world; ++s) most = max(most, recv_base[s + 1] - recv_base[s]);
    return most * dm.world;  // at most world * max_tokens
}

__device__ __forceinline__ int staged_row(const EpDims& dm, const int* recv_base, int item) {
    const int s = (item + dm.rank) % dm.world;
    const int k = item / dm.world;
    return recv_base[s] + k < recv_base[s + 1] ? recv_base[s] + k : -1;
}

// What travels back beside each row, [K] f32 per (token, destination).
enum SideMode {
    SIDE_NONE = 0,
    SIDE_ROW_K = 1,        // token-major: side[j][k] as given ([rows, K])
    SIDE_ROW_K_OWNED = 2,  // token-major: side[j][k] where slot k's expert is here, else 0
    SIDE_EXPANDED = 3,     // expert-major: side[exp_rows[j][k]] ([rows]), 0 where slot k is elsewhere
};

// Elements of T in 16 bytes, and their conversion to and from f32.
template <typename T>
struct Vec16 {
    static constexpr int kLen = 16 / sizeof(T);
    alignas(16) T e[kLen];

    // Buffers peers store into are read past L1 (__ldcg): the combine reads rows while others
    // still arrive, and L1 is not coherent with those stores.
    __device__ __forceinline__ void load(const int4* p) { *reinterpret_cast<int4*>(e) = __ldcg(p); }
    __device__ __forceinline__ void store(int4* p) const { *p = *reinterpret_cast<const int4*>(e); }
    // Element i as f32, exactly widen(e[i]). A bf16 is the top half of its f32, so of each 32-bit
    // word of two the high element takes one mask and the low one a shift, where widen on the
    // high element would first move it down (two instructions).
    __device__ __forceinline__ float wide(int i) const {
        if constexpr (std::is_same_v<T, __nv_bfloat16>) {
            const uint32_t word = reinterpret_cast<const uint32_t*>(e)[i / 2];
            return __uint_as_float(i % 2 ? word & 0xffff0000u : word << 16);
        } else {
            return widen(e[i]);
        }
    }
};

// Whether rows of H elements of T can move as 16-byte vectors from `p` (and from the library's
// own buffers, whose rows then stay 16-byte aligned too).
template <typename T>
__device__ __forceinline__ bool vector_rows(const EpDims& dm, const void* p) {
    return dm.hidden % Vec16<T>::kLen == 0 && aligned16(p);
}

// Adds, in ascending order of i, source i's vector (vector_of(i), in a buffer peers store into)
// of every source i set in `sources` (a warp-uniform bit set of at most 32) into one 16-byte
// vector's accumulators, acc = acc + v. Loads kBatch sources at once so their latencies overlap;
// the adds stay in order.
template <typename T, int kBatch, typename VectorOf>
__device__ __forceinline__ void sum_sources(float (&acc)[Vec16<T>::kLen], unsigned sources, VectorOf vector_of) {
    while (sources) {
        int idx[kBatch];
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
            idx[u] = sources ? __ffs(sources) - 1 : -1;
            sources &= sources - 1;
        }
        Vec16<T> in[kBatch];
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
            if (idx[u] >= 0) in[u].load(vector_of(idx[u]));
        }
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
            if (idx[u] < 0) continue;
#pragma unroll
            for (int i = 0; i < Vec16<T>::kLen; ++i) acc[i] = acc[i] + in[u].wide(i);
        }
    }
}

// The vectors first, first + 32, ... < end of a row: out_row[v] = the sum over the sources set in
// `sources` (at most kSources), ascending, of vector_of(d, v) (in a buffer peers store into), f32
// from +0.0, rounded once, the adds as in sum_sources. kStrides of the lane's vectors from every
// source are loaded before any is added, so kStrides x kSources loads are in flight at once: with
// few sources, sum_sources alone would keep only their count in flight.
template <typename T, int kStrides, int kSources, typename VectorOf>
__device__ __forceinline__ void reduce_vectors(int4* out_row, unsigned sources, int first, int end,
                                               VectorOf vector_of) {
    using V = Vec16<T>;
    int src[kSources];
#pragma unroll
    for (int q = 0; q < kSources; ++q) {
        src[q] = sources ? __ffs(sources) - 1 : -1;
        sources &= sources - 1;
    }
    for (int v0 = first; v0 < end; v0 += 32 * kStrides) {
        V in[kStrides][kSources];
#pragma unroll
        for (int u = 0; u < kStrides; ++u) {
#pragma unroll
            for (int q = 0; q < kSources; ++q) {
                if (v0 + 32 * u < end && src[q] >= 0) in[u][q].load(vector_of(src[q], v0 + 32 * u));
            }
        }
#pragma unroll
        for (int u = 0; u < kStrides; ++u) {
            if (v0 + 32 * u >= end) break;
            float acc[V::kLen];
#pragma unroll
            for (int i = 0; i < V::kLen; ++i) acc[i] = 0.f;
#pragma unroll
            for (int q = 0; q < kSources; ++q) {
                if (src[q] < 0) continue;
#pragma unroll
                for (int i = 0; i < V::kLen; ++i) acc[i] = acc[i] + in[u][q].wide(i);
            }
            V o;
#pragma unroll
            for (int i = 0; i < V::kLen; ++i) o.e[i] = narrow<T>(acc[i]);
            o.store(out_row + v0 + 32 * u);
        }
    }
}

// A warp's scratch in shared memory: per-row lookups read once from global memory, so the inner
// loops (whose stores the compiler cannot prove apart from those lookups) read them from here.
struct WarpTable {
    int row[32];
    float weight[32];
};

// The slots gather_slots reads, lane `lane`'s column of each: with N > 0, N slots whose row
// pointers and weights a lane holds in registers; with N == 0 (below), any count, looked up in the
// warp's table at each use.
template <typename T, int N>
struct HeldSlots {
    const int4* rows[N];
    float weights[N];
    __device__ __forceinline__ HeldSlots(const T* y, int H, const WarpTable* table, int lane) {
#pragma unroll
        for (int q = 0; q < N; ++q) {
            rows[q] = reinterpret_cast<const int4*>(y + static_cast<int64_t>(table->row[q]) * H) + lane;
            weights[q] = table->weight[q];
        }
    }
    __device__ __forceinline__ const int4* row(int q) const { return rows[q]; }
    __device__ __forceinline__ float weight(int q) const { return weights[q]; }
};

template <typename T>
struct HeldSlots<T, 0> {
    const T* y;
    int H;
    const WarpTable* table;
    int lane;
    __device__ __forceinline__ HeldSlots(const T* y, int H, const WarpTable* table, int lane)
        : y(y), H(H), table(table), lane(lane) {}
    __device__ __forceinline__ const int4* row(int q) const {
        return reinterpret_cast<const int4*>(y + static_cast<int64_t>(table->row[q]) * H) + lane;
    }
    __device__ __forceinline__ float weight(int q) const { return table->weight[q]; }
};

// Gathers the partial of gather_partial (below) for the n slots in `table` (rows and weights,
// each weight 1 for plain adds: fmaf(1, v, acc) rounds v + acc once, as the add does). With N > 0
// (n == N) the slots are held in registers (HeldSlots) and the slot loops unroll, so the inner
// loop is the loads, the conversions and the fmaf; N == 0 takes any n. gather_partial
// instantiates N up to 4: more spill, and instances for 5 to 8 made the world-2 T = 4096 combine
// slower (docs/perf-notes.md, v13).
template <typename T, int N>
__device__ __forceinline__ void gather_slots(T* dst, const T* y, int n, int H, const WarpTable* table, int4* ring,
                                             int ring_vecs, int lane) {
    using V = Vec16<T>;
    if constexpr (N > 0) n = N;
    const int units = H / V::kLen;
    const int batches = 2 * n <= ring_vecs ? 2 : 1;
    const int kv = ring_vecs / (batches * n);  // vectors per lane in a batch
    const HeldSlots<T, N> slot(y, H, table, lane);
    // Batch b's vector u of slot q sits at column[((b * kv + u) * n + q) * 32].
    int4* column = ring + lane;
    const auto issue = [&](int base, int b) {
        int4* at = column + b * kv * n * 32;
        for (int u = 0; u < kv && base + 32 * u + lane < units; ++u, at += n * 32) {
#pragma unroll
            for (int q = 0; q < (N > 0 ? N : n); ++q) cp_async16(at + q * 32, slot.row(q) + base + 32 * u);
        }
        cp_async_commit();
    };
    issue(0, 0);
    int b = 0;
    for (int base = 0; base < units; base += 32 * kv) {
        const int next = base + 32 * kv;
        if (batches == 2) {
            if (next < units) issue(next, b ^ 1);
            else cp_async_commit();  // an empty group keeps the count
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        const int4* at = column + b * kv * n * 32;
        for (int u = 0; u < kv; ++u, at += n * 32) {
            const int v = base + lane + 32 * u;
            if (v >= units) break;
            float acc[V::kLen];
#pragma unroll
            for (int i = 0; i < V::kLen; ++i) acc[i] = 0.f;
            const auto add = [&](int q, float w) {
                V in;
                *reinterpret_cast<int4*>(in.e) = at[q * 32];
#pragma unroll
                for (int i = 0; i < V::kLen; ++i) acc[i] = fmaf(w, in.wide(i), acc[i]);
            };
            if constexpr (N > 0) {
#pragma unroll
                for (int q = 0; q < N; ++q) add(q, slot.weight(q));
            } else {
                for (int q = 0; q < n; ++q) add(q, slot.weight(q));
            }
            V out;
#pragma unroll
            for (int i = 0; i < V::kLen; ++i) out.e[i] = narrow<T>(acc[i]);
            out.store(reinterpret_cast<int4*>(dst) + v);
        }
        // Each lane reads only its own column, which only its own later cp.async overwrites.
        if (batches == 2) {
            b ^= 1;
        } else if (next < units) {
            issue(next, 0);
        }
    }
    cp_async_wait<0>();
}

// The expert-major partial of one staged row into `dst`: for each 16-byte vector of the row, the
// sum in ascending slot order of w(row) * y[row] over the rows in `slots` (bit k: slot k, row
// er[k]; 1 <= popcount n <= ring_vecs), fmaf from +0.0, rounded once. Each lane gathers its
// vectors' inputs into its column of the warp's shared-memory ring (`ring`: ring_vecs x 32
// vectors) with cp.async, so loads are in flight without holding registers, then adds them in
// order. When the ring holds two batches (2n <= ring_vecs), the next batch's loads fly while this
// one is added and stored. The slots' rows and weights go to `table` first.
template <typename T, typename WeightOf>
__device__ __forceinline__ void gather_partial(T* dst, const T* y, const int* er, unsigned slots, int H, bool unit,
                                               WeightOf weight_of, int4* ring, int ring_vecs, WarpTable* table,
                                               int lane) {
    const int n = __popc(slots);
    __syncwarp();  // the previous row's reads of the table are done
    if ((slots >> lane) & 1u) {
        const int q = __popc(slots & ((1u << lane) - 1u));
        table->row[q] = er[lane];
        table->weight[q] = unit ? 1.f : weight_of(lane);
    }
    __syncwarp();
    switch (n) {
        case 1: gather_slots<T, 1>(dst, y, n, H, table, ring, ring_vecs, lane); break;
        case 2: gather_slots<T, 2>(dst, y, n, H, table, ring, ring_vecs, lane); break;
        case 3: gather_slots<T, 3>(dst, y, n, H, table, ring, ring_vecs, lane); break;
        case 4: gather_slots<T, 4>(dst, y, n, H, table, ring, ring_vecs, lane); break;
        default: gather_slots<T, 0>(dst, y, n, H, table, ring, ring_vecs, lane); break;
    }
}

// Each expert rank sends, for every staged row j (source s, token t), one row back to s: token-
// major y[j] itself; expert-major (`offsets` given) the partial sum over j's expansions in
// ascending slot order of w(row) * y[row] (fmaf from +0.0), rounded once (gather_partial, through
// this warp's `ring` of ring_vecs x 32 vectors). `weights`: per-row weights overriding the
// recorded `row_weights` (expert-major), or null; `unit_weights` makes every weight 1 (plain adds).
// Warps `warp`, `warp + warps`, ... of the grid take one staged row each (sources interleaved),
// 16 bytes a lane; token-major, with fewer rows than warps, a row goes in pieces as in send_rows
// (the first carries the side values). After each piece the warp adds its share of kRowUnits to
// s's arrival counter of t's chunk with a system-scope release, so s can reduce that chunk as
// soon as it is complete.
template <typename T>
__device__ void send_back_rows(const EpPeers& peers, const EpDims& dm, const T* y, const float* weights,
                               const float* row_weights, int unit_weights, const int* recv_base, const int* row_src,
                               const int* row_slots, const int* exp_rows, const float* side, int side_mode,
                               const int* offsets, int rows_given, int4* ring, int ring_vecs, WarpTable* table,
                               int* err, int warp, int warps) {
    const int K = dm.topk, H = dm.hidden, lane = threadIdx.x & 31;
    const bool vec = vector_rows<T>(dm, y), expert_major = offsets != nullptr;
    // Nothing goes after an earlier failure, or with too few rows handed back (rows_cover). Both
    // are read beside the first loads of the rows rather than ahead of them.
    const bool call_failed = failed(err);
    const bool covered = rows_cover(dm, recv_base, offsets, rows_given, err);
    const int items = interleaved_items(dm, recv_base);
    if (call_failed || !covered) return;
    const int parts = row_parts(items, warps, expert_major);
    const int64_t row_bytes = static_cast<int64_t>(H) * sizeof(T);
    const int64_t part_bytes = part_bytes_of(row_bytes, parts);
    for (int piece = warp; piece < items * parts; piece += warps) {
        const int item = piece / parts, part = piece - item * parts;
        const int j = staged_row(dm, recv_base, item);
        if (j < 0) continue;
        const int s = row_src[2 * j];
        const int64_t slot = static_cast<int64_t>(dm.rank) * dm.max_tokens + (j - recv_base[s]);
        T* dst = reinterpret_cast<T*>(peers.back[s]) + slot * H;
        const int* er = exp_rows + static_cast<int64_t>(j) * K;
        if (!expert_major) {
            copy_row_piece(reinterpret_cast<uint8_t*>(dst), reinterpret_cast<const uint8_t*>(y + static_cast<int64_t>(j) * H),
                           row_bytes, part, part_bytes, lane);
        } else if (const unsigned slots = __ballot_sync(0xffffffffu, lane < K && er[lane] >= 0);
                   vec && K <= 32 && slots != 0 && __popc(slots) <= ring_vecs) {
            gather_partial<T>(dst, y, er, slots, H, unit_weights,
                              [&](int k) { return weights ? weights[er[k]] : row_weights[er[k]]; }, ring, ring_vecs,
                              table, lane);
        } else {
            for (int h = lane; h < H; h += 32) {
                float acc = 0.f;
                for (int k = 0; k < K; ++k) {
                    const int r = er[k];
                    if (r < 0) continue;
                    const float v = widen(y[static_cast<int64_t>(r) * H + h]);
                    acc = unit_weights ? acc + v : fmaf(weights ? weights[r] : row_weights[r], v, acc);
                }
                dst[h] = narrow<T>(acc);
            }
        }
        if (part == 0 && side_mode != SIDE_NONE) {
            float* sd = reinterpret_cast<float*>(peers.back_side[s]) + slot * K;
            for (int k = lane; k < K; k += 32) {
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
        release_piece(arrival_counter(peers.signals[s], dm, dm.rank, row_src[2 * j + 1] / EP_CHUNK_TOKENS), parts,
                      lane);
    }
}

static_assert(EP_CHUNK_TOKENS == 32, "wait_chunk gives each lane one token of the chunk");

// Waits until every rank sent back all its rows for chunk c of this rank's tokens: for each rank
// d, the chunk's tokens routed to d (pos) against d's arrival counter. One warp; lane d watches
// rank d. False in every lane on timeout (naming the missing rank) or once the call failed.
__device__ bool wait_chunk(const EpDims& dm, const int* pos, int num_tokens, int c, int* err) {
    const int lane = threadIdx.x & 31;
    const int t = c * EP_CHUNK_TOKENS + lane;
    unsigned expected = 0;
    for (int d = 0; d < dm.world; ++d) {
        const bool goes = t < num_tokens && pos[static_cast<int64_t>(t) * dm.world + d] >= 0;
        const unsigned n = __popc(__ballot_sync(0xffffffffu, goes));
        if (lane == d) expected = n;
    }
    const bool ok = lane >= dm.world || expected == 0 || await_arrivals(dm, lane, c, expected * kRowUnits, err);
    // The acquiring lanes' view passes to the whole warp through the vote's barrier.
    return __all_sync(0xffffffffu, ok);
}

// Source side: out[t] = sum over destinations d ascending (those with pos[t][d] >= 0) of the row d
// sent back, f32 from +0.0, rounded once; the [K] side values likewise into out_side. A warp takes
// a token (or a part of one, see below) at a time, in ascending token order: from `next_item`
// (an atomic counter, so warps that join late share what is left) when given, else items `warp`,
// `warp + warps`, ... 16 bytes a lane. `warps`: how many warps take part in all. With
// `per_chunk`, a warp first waits for its token's chunk to be complete (wait_chunk); otherwise
// every row has already arrived.
template <typename T>
__device__ void reduce_tokens(const EpDims& dm, const T* back, const float* back_side, const int* pos, int num_tokens,
                              T* out, float* out_side, bool per_chunk, unsigned* next_item, WarpTable* table,
                              int warp, int warps, int* err) {
    using V = Vec16<T>;
    const int K = dm.topk, H = dm.hidden, lane = threadIdx.x & 31;
    const bool vec = vector_rows<T>(dm, out);
    // A lane walks its part of a row one dependent load batch after another; with few tokens, a
    // warp per token would leave most warps idle and those chains long. Each token's row is then
    // split into `parts` pieces of whole 32-lane strides, a warp each, down to one stride a warp.
    const int units = vec ? H / V::kLen : H;  // vectors or elements per row
    const int parts = max(1, min((units + 31) / 32, warps / max(num_tokens, 1)));
    const int per_part = ((units + parts - 1) / parts + 31) / 32 * 32;
    const int items = num_tokens * parts;  // at most warps, or max_tokens
    int ready_chunk = -1;
    for (int item = warp;; item += warps) {
        if (next_item) {
            unsigned taken = 0;
            if (lane == 0) taken = atomicAdd(next_item, 1u);
            item = static_cast<int>(min(__shfl_sync(0xffffffffu, taken, 0), static_cast<unsigned>(items)));
        }
        if (item >= items) break;
        const int t = item / parts, part = item % parts;
        // The token's row on each destination, loaded before the wait below: after it, the
        // acquire has emptied L1 and the load would be one more round trip once the chunk is in.
        const int row_on = lane < dm.world ? pos[static_cast<int64_t>(t) * dm.world + lane] : -1;
        if (per_chunk && t / EP_CHUNK_TOKENS != ready_chunk) {
            if (!wait_chunk(dm, pos, num_tokens, t / EP_CHUNK_TOKENS, err)) return;
            ready_chunk = t / EP_CHUNK_TOKENS;
            EP_TRACE_WARP(kTraceCombineChunkIn);
        }
        const int begin = part * per_part, end = min(units, begin + per_part);
        // Into the warp's table (read in the inner loops).
        __syncwarp();
        if (lane < dm.world) table->row[lane] = row_on;
        __syncwarp();
        const int* p = table->row;
        const auto back_row = [&](int d) { return back + (static_cast<int64_t>(d) * dm.max_tokens + p[d]) * H; };
        if (out && vec) {
            const unsigned sources = __ballot_sync(0xffffffffu, lane < dm.world && p[lane] >= 0);
            int4* out_row = reinterpret_cast<int4*>(out + static_cast<int64_t>(t) * H);
            const auto vector_of = [&](int d, int v) { return reinterpret_cast<const int4*>(back_row(d)) + v; };
            // At most two sources (world 2, or a token on two ranks): two of the lane's vectors at
            // once, four loads in flight, as many as sum_sources's batches hold for more sources.
            // (Two vectors of four sources would spill at the 64 registers of 1024 threads.)
            if (__popc(sources) <= 2) {
                reduce_vectors<T, 2, 2>(out_row, sources, begin + lane, end, vector_of);
            } else {
                for (int v = begin + lane; v < end; v += 32) {
                    float acc[V::kLen];
#pragma unroll
                    for (int i = 0; i < V::kLen; ++i) acc[i] = 0.f;
                    sum_sources<T, 4>(acc, sources, [&](int d) { return vector_of(d, v); });
                    V o;
#pragma unroll
                    for (int i = 0; i < V::kLen; ++i) o.e[i] = narrow<T>(acc[i]);
                    o.store(out_row + v);
                }
            }
        } else if (out) {
            for (int h = begin + lane; h < end; h += 32) {
                float acc = 0.f;
                for (int d = 0; d < dm.world; ++d) {
                    if (p[d] >= 0) acc = acc + widen(__ldcg(back_row(d) + h));
                }
                out[static_cast<int64_t>(t) * H + h] = narrow<T>(acc);
            }
        }
        for (int k = lane; part == 0 && out_side && k < K; k += 32) {
            float acc = 0.f;
            for (int d = 0; d < dm.world; ++d) {
                if (p[d] < 0) continue;
                acc = acc + __ldcg(back_side + (static_cast<int64_t>(d) * dm.max_tokens + p[d]) * K + k);
            }
            out_side[static_cast<int64_t>(t) * K + k] = acc;
        }
    }
}

// A whole combine-direction call in one kernel (combine, dispatch_backward): every rank sends its
// staged rows back (send_back_rows) while the sources reduce each chunk of tokens as soon as it is
// complete (reduce_tokens), so the reduce overlaps the transfer instead of following it. In each
// block, warps 0..send_warps-1 send and the others reduce from the start; senders join the reduce
// once their rows are out (items come from the counter done[1]). Begins its call: waits until
// every rank entered, so no source still reads the rows this overwrites, unless `skip_entry`. The
// host passes it when the call before this one was a barrier or a token-major dispatch-direction
// call: every rank passed that call's entry, so every rank finished the calls before it (the last
// to read its back buffers and arrival counters among them), and that call touched neither. Too
// few rows handed back: this rank sends nothing, so the sources time out naming it rather than
// reduce rows it never sent. The last block zeroes the item counter and this rank's arrival
// counters for the next call: every counter is full by then (each chunk was waited for), so no
// increment of this call is still on its way (see reset_arrivals for a failed call).
// Expert-major, each sending warp gathers its partials through a ring of ring_vecs x 32 vectors in
// the dynamic shared memory (send_warps x ring_vecs x 512 bytes per block; ring_vecs 0 without
// one).
template <typename T>
__device__ void combine(const EpPeers& peers, const EpDims& dm, const T* y, const float* weights,
                        const float* row_weights, int unit_weights, const int* recv_base, const int* row_src,
                        const int* row_slots, const int* exp_rows, const float* side, int side_mode,
                        const int* offsets, int rows_given, const T* back, const float* back_side, const int* pos,
                        int num_tokens, T* out, float* out_side, int skip_entry, int send_warps, int ring_vecs,
                        unsigned* done, int* err) {
    EP_TRACE_POINT(kTraceCombineStart);
    // Skipping the entry, nothing waits here: the sending warps check for an earlier failure
    // themselves (send_back_rows), and the reducing ones stop waiting on one.
    const bool entered = skip_entry || enter_call(peers, dm, -1, err);
    EP_TRACE_POINT(kTraceCombineEntered);
    const int per_block = static_cast<int>(blockDim.x >> 5), w = static_cast<int>(threadIdx.x >> 5);
    send_warps = min(max(send_warps, 1), per_block - 1);
    unsigned* next_item = done + 1;
    if (entered) {
        __shared__ WarpTable tables[32];
        if (w < send_warps) {
            extern __shared__ int4 rings[];  // send_warps x ring_vecs x 32 vectors (expert-major)
            send_back_rows<T>(peers, dm, y, weights, row_weights, unit_weights, recv_base, row_src, row_slots,
                              exp_rows, side, side_mode, offsets, rows_given, rings + w * ring_vecs * 32, ring_vecs,
                              &tables[w], err, blockIdx.x * send_warps + w, gridDim.x * send_warps);
            EP_TRACE_WARP(kTraceCombineSentBack);
        }
        reduce_tokens<T>(dm, back, back_side, pos, num_tokens, out, out_side, true, next_item, &tables[w], 0,
                         gridDim.x * per_block, err);
        EP_TRACE_WARP(kTraceCombineReduced);
    }
    EP_TRACE_BLOCK(kTraceCombineDone);
    // Every row went with its own release; this only tells the last block that every counter is
    // full, so it can reset them.
    if (!arrive_last(done, false)) return;
    EP_TRACE_POINT(kTraceCombineEnd);
    if (threadIdx.x == 0) *next_item = 0u;
    reset_arrivals(dm, (num_tokens + EP_CHUNK_TOKENS - 1) / EP_CHUNK_TOKENS);
    __syncthreads();
    if (threadIdx.x == 0) commit_call(dm);
}

// Waits for flag `sig` from every rank, then reduce_tokens with every warp of the grid (the side
// values of combine_backward, which arrive after a kernel of their own).
template <typename T>
__device__ void combine_reduce(const EpDims& dm, const T* back, const float* back_side, const int* pos,
                               int num_tokens, T* out, float* out_side, int sig, int* err) {
    const bool raised = flags_raised(dm, sig, err);
    if (!block_ok(err) || !raised) return;
    __shared__ WarpTable tables[32];
    reduce_tokens<T>(dm, back, back_side, pos, num_tokens, out, out_side, false, nullptr, &tables[threadIdx.x >> 5],
                     warp_id(), warp_count(), err);
}

// Expert-major combine_backward on the expert rank, once the staged gradient rows arrived:
// grad_y[row] = round(w(row) * g) for each row the staged gradient row j expands to; with y, also
// the weight gradient dot(g, y[row]) in the warp's order (lane l sums h = l, l+32, ... with fmaf;
// lanes fold by halves), sent back to the source as side values ([K] per staged row, 0 for slots
// elsewhere), after which the last block raises the second data flag. One warp per staged row.
template <typename T>
__device__ void combine_backward_expert(const EpPeers& peers, const EpDims& dm, const T* stage_g, const T* y,
                                        const float* row_weights, const int* recv_base, const int* row_src,
                                        const int* exp_rows, const int* offsets, int rows_given, T* grad_y,
                                        unsigned* done, int* err) {
    const int lane = threadIdx.x & 31;
    const int K = dm.topk, H = dm.hidden;
    const int64_t stage_elems = dm.stage_row_bytes / static_cast<int64_t>(sizeof(T));
    const bool arrived = wait_rows_in(dm, recv_base, err);
    // As in combine_send: too few rows of y, and no flag goes up.
    const bool covered = !y || rows_cover(dm, recv_base, offsets, rows_given, err);
    // Only K floats per row cross the links here, so rows go in staged order.
    const int rows = arrived && covered ? recv_base[dm.world] : 0;
    for (int j = warp_id(); j < rows; j += warp_count()) {
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
    // Every block waited: the last resets the data counters and, when side values went back
    // (covered by its fence), raises the second data flag.
    if (!arrive_last(done, y != nullptr)) return;
    reset_data_counters(dm);
    if (y && covered) signal_all(peers, dm, EP_SIG_DATA2);
}

#define EP_INSTANTIATE(SUFFIX, T)                                                                           \
    extern "C" __global__ void __launch_bounds__(1024) ep_combine_##SUFFIX(                                 \
        EpPeers peers, EpDims dm, const T* y, const float* weights, const float* row_weights,               \
        int unit_weights, const int* recv_base, const int* row_src, const int* row_slots,                   \
        const int* exp_rows, const float* side, int side_mode, const int* offsets, int rows_given,          \
        const T* back, const float* back_side, const int* pos, int num_tokens, T* out, float* out_side,     \
        int skip_entry, int send_warps, int ring_vecs, unsigned* done, int* err) {                          \
        follow_prior_grids();                                                                               \
        combine<T>(peers, dm, y, weights, row_weights, unit_weights, recv_base, row_src, row_slots,         \
                   exp_rows, side, side_mode, offsets, rows_given, back, back_side, pos, num_tokens, out,   \
                   out_side, skip_entry, send_warps, ring_vecs, done, err);                                 \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(1024) ep_combine_reduce_##SUFFIX(                          \
        EpDims dm, const T* back, const float* back_side, const int* pos, int num_tokens, T* out,           \
        float* out_side, int sig, int* err) {                                                               \
        follow_prior_grids();                                                                               \
        combine_reduce<T>(dm, back, back_side, pos, num_tokens, out, out_side, sig, err);                   \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(1024) ep_combine_backward_expert_##SUFFIX(                 \
        EpPeers peers, EpDims dm, const T* stage_g, const T* y, const float* row_weights,                   \
        const int* recv_base, const int* row_src, const int* exp_rows, const int* offsets, int rows_given,   \
        T* grad_y, unsigned* done, int* err) {                                                              \
        follow_prior_grids();                                                                               \
        combine_backward_expert<T>(peers, dm, stage_g, y, row_weights, recv_base, row_src, exp_rows,        \
                                   offsets, rows_given, grad_y, done, err);                                 \
    }

EP_INSTANTIATE(bf16, __nv_bfloat16)
EP_INSTANTIATE(f16, __half)
EP_INSTANTIATE(f32, float)
#include "baseline.cu"
