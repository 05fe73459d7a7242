#!/usr/bin/env bash
# A/B timing on a GPU machine, the way docs/perf-notes.md measures a change: the variants run
# alternately in one device call, held (`--start held`: the device runs the calls back to back,
# whatever the host), two rounds each, and each run prints its latency columns (T, dispatch,
# cached, combine) and the oracle check of every T.
#
#   scripts/bench-ab.sh bins BIN...         # one CLI binary per variant
#                                           #   (e.g. .bin/ab/base .bin/moe-ep)
#   scripts/bench-ab.sh envs BIN SETTING... # one binary, one environment setting per variant
#                                           #   (e.g. X=default MOE_EP_COMBINE_SEND_WARPS=20)
#
# W (world, default 2), TOKENS (default 128,4096), ITERS and WARMUP (10, 3), BACKEND (cuda),
# EXTRA (more bench flags, e.g. '--layout expert-major') and ROUNDS (2) shape every run. Build
# the variants here: the "base" of a change is the CLI built from the commit before it (git
# worktree add, then cargo build --release -p moe-ep-cli with MOE_EP_NVCC and
# MOE_EP_REQUIRE_KERNELS=1), kept in .bin/ab/, which `scripts/gpu-suite.sh build` leaves in
# place; carry .bin to the device.
set -uo pipefail

usage() {
    sed -n '2,17p' "$0" >&2
    exit 2
}

# run LABEL ENV BIN: one held bench of BIN with the environment setting ENV ("" for none).
run() {
    local label="$1" setting="$2" bin="$3" log
    log="$(mktemp)"
    echo "== $label, round $round, T ${TOKENS:-128,4096} ${EXTRA:-}"
    # shellcheck disable=SC2086 # EXTRA and the setting are lists of words
    env ${setting} "$bin" bench --backend "${BACKEND:-cuda}" --world "${W:-2}" --baselines none \
        --iters "${ITERS:-10}" --warmup "${WARMUP:-3}" --start held --tokens "${TOKENS:-128,4096}" \
        ${EXTRA:-} >"$log" 2>&1
    echo "rc=$?"
    sed -n '/^Latency/,/^$/p' "$log" | cut -d'|' -f1-5 | tail -n +4
    grep -iE 'mismatch|fail|error' "$log" | head -n 3
    echo "check:$(grep -A 12 '^Summary' "$log" | awk -F'|' 'NR > 3 && NF > 8 { printf " %s", $9 }')"
    rm -f "$log"
}

mode="${1:-}"
[ $# -ge 2 ] || usage
shift
for round in $(seq 1 "${ROUNDS:-2}"); do
    case "$mode" in
        bins) for bin in "$@"; do run "$bin" "" "$bin"; done ;;
        envs)
            bin="$1"
            for setting in "${@:2}"; do run "$setting" "$setting" "$bin"; done
            ;;
        *) usage ;;
    esac
done
