#!/usr/bin/env bash
# The whole GPU suite in one device call.
#
#   scripts/gpu-suite.sh build   # here (no GPU needed): kernels + release test binaries into .bin/
#                                # (keeps .bin/ab, the binaries of scripts/bench-ab.sh)
#   scripts/gpu-suite.sh run     # on the GPU machine, from the repo root; prints a table last
#   scripts/gpu-suite.sh sweep   # on the GPU machine: the speed sweeps (issue 4), summaries, table
#
# Device call: run(command="bash scripts/gpu-suite.sh run", carry=[".bin"]).
# `run` uses every GPU it finds: the conformance suite with 4 ranks on GPU 0, and with ranks on
# distinct GPUs when there are several; the CUDA-vs-CPU and timeout tests; compute-sanitizer
# memcheck and racecheck on the one-rank case (the sanitizers serialize kernels, so ranks that
# wait for each other inside kernels would only time out under them); short benches, token-major and
# expert-major. Logs go to $OUT (or .bin/logs).
# GPU_SUITE_ONLY=WORD runs only the steps whose name contains WORD; GPU_SUITE_SKIP=REGEX skips the
# steps whose name matches it (e.g. 'racecheck|ranks on gpus').
# Each step is stopped after GPU_SUITE_STEP_TIMEOUT seconds (default 450: the conformance suite
# with one rank per GPU takes about 270 s on 8 GPUs), so a hang costs one step.
set -uo pipefail
cd "$(dirname "$0")/.."

build() {
    set -e
    local nvcc
    nvcc="$(scripts/install-nvcc.sh)"
    export MOE_EP_NVCC="$nvcc" MOE_EP_REQUIRE_KERNELS=1
    cargo build --release -p moe-ep-cli
    local list
    list="$(cargo test --release --no-run -p moe-ep --test conformance_cuda --test cuda_backend \
        --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])')"
    # .bin/ab holds the binaries of A/B runs (scripts/bench-ab.sh), built apart: kept.
    mkdir -p .bin && find .bin -mindepth 1 -maxdepth 1 ! -name ab -exec rm -rf {} +
    while read -r name exe; do cp "$exe" ".bin/$name"; done <<<"$list"
    cp target/release/moe-ep .bin/moe-ep
    find .bin -mindepth 1 -maxdepth 1 -type f -exec strip {} +
    ls -la .bin
}

rows=()
# step NAME COMMAND...: runs it, logs its output, and adds a table row from libtest's summary.
step() {
    local name="$1"; shift
    if [ -n "${GPU_SUITE_ONLY:-}" ] && [[ "$name" != *"$GPU_SUITE_ONLY"* ]]; then return 0; fi
    if [ -n "${GPU_SUITE_SKIP:-}" ] && [[ "$name" =~ $GPU_SUITE_SKIP ]]; then return 0; fi
    local log="$LOGS/$(echo "$name" | tr -c 'A-Za-z0-9_.\n-' '_').log"
    local start=$SECONDS
    timeout "${GPU_SUITE_STEP_TIMEOUT:-450}" "$@" >"$log" 2>&1
    local rc=$?
    local summary
    summary="$(grep -E '^test result:' "$log" | tail -n 1 | sed -E 's/^test result: //; s/; 0 measured.*//')"
    local skipped
    skipped="$(grep -o 'SKIPPED [A-Za-z0-9_]*:' "$log" | wc -l)"
    [ "$skipped" != 0 ] && summary="$summary; $skipped SKIPPED ($(grep -m1 '^SKIPPED' "$log" | cut -c1-60))"
    [ -z "$summary" ] && summary="$(tail -n 1 "$log" | cut -c1-90)"
    local verdict=PASS
    [ $rc -ne 0 ] && verdict="FAIL($rc)"
    rows+=("$(printf '| %-34s | %-8s | %4ss | %s' "$name" "$verdict" $((SECONDS - start)) "$summary")")
    echo "== $name: $verdict"
    [ $rc -ne 0 ] && tail -n 40 "$log"
    return 0
}

run() {
    LOGS="${OUT:-.bin/logs}"
    mkdir -p "$LOGS"
    # Up to 8 ranks share a GPU here; each needs its own hardware queue (see Group::cuda_local).
    export PATH="/usr/local/cuda/bin:$PATH" RUST_BACKTRACE=1 CUDA_DEVICE_MAX_CONNECTIONS=32
    nvidia-smi -L
    nvidia-smi topo -m 2>/dev/null | head -n 12
    local n
    n="$(nvidia-smi -L | wc -l)"
    local all
    all="$(seq -s, 0 $((n - 1)))"
    .bin/moe-ep info
    step "conformance 4 ranks on gpu 0" env MOE_EP_TEST_DEVICES=0,0,0,0 .bin/conformance_cuda --test-threads=1
    if [ "$n" -ge 2 ]; then
        step "conformance ranks on gpus $all" env MOE_EP_TEST_DEVICES="$all" .bin/conformance_cuda --test-threads=1
    fi
    step "cuda vs cpu, timeout (gpus $all)" env MOE_EP_TEST_DEVICES="$all" .bin/cuda_backend --test-threads=1
    step "memcheck (1 rank)" env MOE_EP_TEST_DEVICES=0 compute-sanitizer --tool memcheck --error-exitcode 9 \
        .bin/conformance_cuda --exact world_1
    step "racecheck (1 rank)" env MOE_EP_TEST_DEVICES=0 compute-sanitizer --tool racecheck --error-exitcode 9 \
        .bin/conformance_cuda --exact world_1
    step "bench world $n" .bin/moe-ep bench --backend cuda --world "$n" --tokens 1,128,512,4096,8192 \
        --iters 10 --warmup 3 --json "$LOGS/world$n.json" --plot "$LOGS/world$n.svg"
    step "bench world $n expert-major" .bin/moe-ep bench --backend cuda --world "$n" --tokens 1,128,4096 \
        --layout expert-major --baselines ceiling --iters 10 --warmup 3 --json "$LOGS/world${n}_em.json"
    for f in "$LOGS/bench_world_$n.log" "$LOGS/bench_world_${n}_expert-major.log"; do
        [ -f "$f" ] && grep -A 12 -E '^(Host queuing|Summary)' "$f"
    done
    table
}

# The speed sweeps of issue 4: every bench prints its tables into its log (and JSON, SVG into $LOGS).
sweep() {
    LOGS="${OUT:-.bin/logs}"
    mkdir -p "$LOGS"
    export PATH="/usr/local/cuda/bin:$PATH" CUDA_DEVICE_MAX_CONNECTIONS=32
    nvidia-smi -L
    local n
    n="$(nvidia-smi -L | wc -l)"
    local b=(timeout 300 .bin/moe-ep bench --backend cuda --iters 10 --warmup 3)
    local all_t=1,16,128,512,1024,4096,8192
    for w in 8 4 2; do
        [ "$n" -ge "$w" ] || continue
        step "bench w$w token-major" "${b[@]}" --world $w --tokens $all_t --json "$LOGS/w$w.json" --plot "$LOGS/w$w.svg"
        [ $w != 2 ] && step "bench w$w expert-major" "${b[@]}" --world $w --tokens 1,128,4096 --layout expert-major --json "$LOGS/w${w}_em.json"
        step "bench w$w iris" "${b[@]}" --world $w --tokens 128,4096 --hidden 4096 --topk 2 --num-experts $((8 * w)) --json "$LOGS/w${w}_iris.json"
        step "bench w$w small" "${b[@]}" --world $w --tokens 128,4096 --hidden 2048 --topk 6 --num-experts 64 --json "$LOGS/w${w}_small.json"
    done
    if [ "$n" -ge 4 ]; then
        for sms in 48 132; do
            step "bench w4 num-sms $sms" "${b[@]}" --world 4 --tokens 128,4096 --baselines ceiling --num-sms $sms
        done
        step "bench w4 zipf" "${b[@]}" --world 4 --tokens 4096 --routing zipf --baselines ceiling
    fi
    for f in "$LOGS"/bench_w*.log; do echo "== $f"; grep -A 12 '^Summary' "$f"; done
    table
}

table() {
    echo
    printf '| %-34s | %-8s | %5s | %s\n' step result time summary
    printf '|%s|\n' "------------------------------------|----------|-------|------------------------------"
    printf '%s\n' "${rows[@]}"
}

case "${1:-}" in
    build) build ;;
    run) run ;;
    sweep) sweep ;;
    *) echo "usage: $0 build|run|sweep" >&2; exit 2 ;;
esac
