#!/usr/bin/env python3
"""Where a call's time goes, from a bench run of kernels built with tracing.

Build the CLI with traced kernels, then bench with one rank per GPU (ranks sharing a GPU share
its stamps) and the calls held, so that the device runs them back to back:

    MOE_EP_KERNEL_TRACE=1 MOE_EP_NVCC=$(scripts/install-nvcc.sh) \
        cargo build --release -p moe-ep-cli --target-dir target/trace
    target/trace/release/moe-ep bench --backend cuda --world 2 --baselines none \
        --iters 20 --warmup 3 --tokens 128 --start held > trace.log
    scripts/kernel-trace.py trace.log

The kernels print "EP_TRACE rank call point first last": for each point of moe_ep.cu's
EpTracePoint, the first and the last block's %globaltimer, in ns after the end of the barrier
kernel that starts the timed call (where its start event lands). This prints, for each kind of
call, the median of each point over the calls of every rank, in us, first block and last block.
Run one T per bench: the calls of different T are not told apart.
"""

import collections
import statistics
import sys

# moe_ep.cu's EpTracePoint, in order.
POINTS = [
    "barrier end",
    "route kernel: start",
    "route kernel: routing blocks done",
    "route kernel: experts counted",
    "route kernel: every rank's counts in",
    "route kernel: end",
    "send kernel: start",
    "send kernel: every rank entered",
    "send kernel: each block's work done",
    "send kernel: end",
    "send kernel, token-major layout: start",
    "send kernel, token-major layout: every rank's rows in",
    "send kernel, token-major layout: each block done",
    "combine: start",
    "combine: every rank entered",
    "combine: each block sent and reduced",
    "combine: end",
    "send kernel: each sending warp's rows out",
    "combine: each sending warp's rows back",
    "combine: a chunk complete (each reducing warp)",
    "combine: each warp's reduce done",
]
ROUTE, SEND, COMBINE = 1, 6, 13
SKIPPED_CALLS = 3  # the first calls of each rank run before the timed ones settle


def calls(lines):
    """Each traced call as {point: (first us, last us)}, grouped by what ran in it."""
    stamps = collections.defaultdict(dict)
    for line in lines:
        fields = line.split()
        if len(fields) != 6 or fields[0] != "EP_TRACE":
            continue
        rank, call, point, first, last = map(int, fields[1:])
        stamps[(rank, call)][point] = (first / 1000, last / 1000)
    kinds = collections.defaultdict(list)
    for (rank, call), points in sorted(stamps.items()):
        if call < SKIPPED_CALLS:
            continue
        if ROUTE in points and COMBINE in points:
            kind = "dispatch + combine"
        elif ROUTE in points:
            kind = "dispatch"
        elif SEND in points:
            kind = "cached dispatch (or a replay)"
        elif COMBINE in points:
            kind = "combine"
        else:
            continue
        kinds[kind].append(points)
    return kinds


def main():
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} BENCH_LOG")
    with open(sys.argv[1]) as log:
        kinds = calls(log)
    if not kinds:
        sys.exit(f"no EP_TRACE lines in {sys.argv[1]}: were the kernels built with MOE_EP_KERNEL_TRACE=1?")
    for kind, traced in kinds.items():
        print(f"\n{kind} ({len(traced)} calls; us after the barrier's end, first block / last block)")
        seen = sorted({p for points in traced for p in points if p > 0})
        rows = []
        for p in seen:
            firsts = [points[p][0] for points in traced if p in points]
            lasts = [points[p][1] for points in traced if p in points]
            rows.append((statistics.median(firsts), statistics.median(lasts), POINTS[p]))
        for first, last, name in sorted(rows):
            print(f"  {name:44s} {first:8.2f} {last:8.2f}")


if __name__ == "__main__":
    main()
