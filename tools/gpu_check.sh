#!/usr/bin/env bash
# One call on the GPU machine: build babyrt with CUDA, run the CUDA tests, and run the GPU
# benchmarks. Results land in $OUT (or ./gpu_out).
# Usage: bash tools/gpu_check.sh [tests|int8|attn|bench|step|variants|ncu|gemv-ncu|profile|chain|seed|sweep|mfu|all]...
#   step: the one-kernel decode step on and off per shape, and its per-phase trace; ncu: its
#   warp stall reasons under Nsight Compute; variants: the opt-in kernel variants (VARIANTS).
#   gemv-ncu: one int8 GEMV call per shape of INT8_SHAPES under Nsight Compute.
#   attn: decode attention alone and after its QKV GEMV (benchmarks/attention_cuda.py), by
#   default and under each setting of ATTN_VARIANTS.
#   profile: the kernels of a decode step, per shape (benchmarks/cuda_decode_profile.py), with
#   PDL off so that kernel durations do not overlap (PROFILE_PDL=1: on, for the marginal times).
#   chain: benchmarks/kernel_chain.cu (what a kernel boundary costs, apart from babyrt's kernels),
#   with PDL on, and with every kernel (then every GEMV) preferring all shared memory
#   (CHAIN_RUNS: e.g. ";--no-pdl" for PDL on and off).
#   sweep: tools/seed_sweep.py over the specs in $SWEEP_FILE (one NAME:PRESET:JSON per line), all
#   at once on the GPU, while the tests run (int8 runs before it, bench after it).
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CMAKE_CUDA_ARCHITECTURES=90 CMAKE_BUILD_PARALLEL_LEVEL=16
what=${*:-all}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pip install --no-build-isolation --no-deps -q . 2>&1 | tail -20 || exit 1
echo "build and install: $SECONDS s"
# A libstdc++ linked statically into libbabyrt crashes on its first ostream use (seen once).
lib=$(python3 -c "import babyrt, os; print(os.path.dirname(babyrt.__file__))")/libbabyrt.so
echo "libstdc++ symbols defined in libbabyrt: $(nm -D --defined-only "$lib" | grep -c codecvt)"
echo "static or libstdc++ link flags in build.ninja: $(grep -ho -- "-static[^ ]*\|[^ ]*stdc++[^ ]*" \
  build/*/build.ninja 2>/dev/null | sort -u | tr '\n' ' ')(none is right)"
echo "CUDA architectures compiled (one is right): $(grep -ho -- "-gencode [^ ]*\|--generate-code=[^ ]*" \
  build/*/build.ninja 2>/dev/null | sort -u | tr '\n' ' ')"
cd /tmp  # import the installed package, not the source tree
repo=$OLDPWD
# --shape artifacts exported once in this call and reused by every bench and profile run.
cache=$(mktemp -d /tmp/babyrt-bench-cache.XXXXXX)
trap 'rm -rf "$cache"' EXIT
# Runs a command under a setting: "none" or comma-separated NAME=VALUE environment variables.
with_setting() {
  local settings=()
  [[ $1 != none ]] && IFS=, read -ra settings <<< "$1"
  env "${settings[@]}" "${@:2}"
}
# babyrt bench (bf16 and int8) per shape once per setting given, same build and machine.
bench_settings() {
  for shape in ${BENCH_SHAPES:-stories15M stories110M 1b-gqa}; do
    for v in "$@"; do
      with_setting "$v" timeout 150 babyrt bench --shape $shape --device cuda --quantize int8 \
        --no-peers --cache-dir "$cache" --json "$OUT/bench_${v//[=,]/_}_$shape.json" 2>&1 | grep -E '^\| *babyrt' | sed "s/^/$v /"
    done
  done
}
if [[ $what == *int8* || $what == all ]]; then
  # INT8_VARIANTS: settings to time besides the default (as for bench_settings); INT8_SHAPES.
  shapes=${INT8_SHAPES:+--shapes $INT8_SHAPES}
  python3 "$repo/benchmarks/int8_gemv_cuda.py" $shapes --json "$OUT/int8_gemv_cuda.json"
  for v in ${INT8_VARIANTS:-BABYRT_PDL=0 BABYRT_GEMV=wide}; do
    with_setting "$v" python3 "$repo/benchmarks/int8_gemv_cuda.py" $shapes | sed "s/^/$v: /" \
      | tee -a "$OUT/int8_variants.txt"
  done
fi
if [[ $what == *attn* ]]; then
  # Decode attention alone and after its QKV GEMV, by default and under each of ATTN_VARIANTS.
  for v in none ${ATTN_VARIANTS:-BABYRT_PDL=0}; do
    with_setting "$v" timeout 120 python3 "$repo/benchmarks/attention_cuda.py" ${ATTN_SHAPES:+--shapes $ATTN_SHAPES} \
      2>&1 | grep -v Warn | sed "s/^/$v: /" | tee -a "$OUT/attention.txt"
  done
fi
if [[ $what == *sweep* ]]; then
  mapfile -t specs < "$repo/${SWEEP_FILE:-tools/sweeps/llama2-ema.txt}"
  python3 "$repo/tools/seed_sweep.py" "${SEED_DATA:-$repo/.gpu_data/ALL_eminem.txt}" "$OUT/sweep" \
    "${specs[@]}" > "$OUT/sweep.md" 2> "$OUT/sweep.err" &
  sweep_pid=$!
fi
if [[ $what == *tests* || $what == all ]]; then
  # TESTS: pytest arguments in place of the CUDA-relevant test files (paths from the repo root).
  # TESTS_K: a pytest -k expression, e.g. "not variant and not linear_kernel and not unfused"
  # leaves out the tests that rerun others under an opt-in switch in subprocesses.
  # TESTS_SETTING: a setting (as for bench_settings) to run pytest under, e.g.
  # BABYRT_CARVEOUT=100,BABYRT_ATTN_LINEAR=1 (the reruns then skip). TESTS may hold pytest
  # options too, e.g. "--timeout=60 -o timeout_method=thread tests/test_ops.py" (pytest-timeout:
  # a hung test ends the run with every thread's stack).
  tests=(tests/test_cuda.py tests/test_batch.py tests/test_parity.py tests/test_ops.py
         tests/test_quantize.py tests/test_hardening.py)
  [[ -n ${TESTS:-} ]] && read -ra tests <<< "$TESTS"
  with_setting "${TESTS_SETTING:-none}" timeout ${TESTS_TIMEOUT:-480} python3 -m pytest -q -p no:cacheprovider --durations=25 ${TESTS_K:+-k "$TESTS_K"} "${tests[@]/#tests\//$repo/tests/}" > "$OUT/pytest.log" 2>&1
  echo "pytest exit $?"; grep -E "passed|failed|Fatal|Segmentation|File \"$repo" "$OUT/pytest.log" | tail -15
fi
if [[ -n ${sweep_pid:-} ]]; then
  wait $sweep_pid; cat "$OUT/sweep.md"; tail -3 "$OUT/sweep.err"
  # int8 accuracy through the CUDA kernels, on the first run's checkpoint.
  ckpt=$(ls -d "$OUT"/sweep/*/ | head -1)
  python3 "$repo/benchmarks/int8_accuracy.py" "$ckpt" --device cuda --kernel-path --max-windows 40 \
    --json "$OUT/int8_accuracy_cuda.json" 2>&1 | grep -v Warn
  (cd "$OUT" && tar czf sweep_logs.tar.gz sweep/*/log.json sweep/*/summary.json sweep/*/config.json && rm -rf sweep)
fi
if [[ $what == *bench* || $what == all ]]; then
  for shape in ${BENCH_SHAPES:-stories15M stories110M 1b-gqa}; do
    babyrt bench --shape $shape --device cuda --quantize int8 --cache-dir "$cache" --json "$OUT/bench_$shape.json" \
      ${BENCH_ARGS:-} 2>&1 | grep -v Warning
  done
fi
if [[ $what == *step* ]]; then
  # The one-kernel decode step against the op-by-op kernels; then its per-phase trace on stories15M.
  bench_settings BABYRT_DECODE_STEP=1 BABYRT_DECODE_STEP=0
  BABYRT_STEP_TRACE=1 BABYRT_DECODE_STEP=1 timeout 120 python3 "$repo/benchmarks/decode_step_trace.py" \
    --shape stories15M 2>&1 | grep -v Warning
fi
if [[ $what == *variants* ]]; then
  # Opt-in variants of the op-by-op path against the default (VARIANTS: space-separated settings).
  bench_settings ${VARIANTS:-none BABYRT_GEMV=wide BABYRT_GEMV=stream}
fi
if [[ " $what " == *" ncu "* ]]; then
  # Warp stall reasons of the one-kernel step (stories15M), per kernel and per SASS instruction
  # (sampled): "no_instruction" is instruction fetch, "barrier" the block's syncs.
  BABYRT_DECODE_STEP=1 timeout 300 ncu --clock-control none -k regex:decode_step_kernel -s 5 -c 1 \
    --section WarpStateStats --section SourceCounters -o "$OUT/ncu_step" \
    --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
    python3 "$repo/benchmarks/decode_step_trace.py" --shape stories15M --no-trace 2>&1 | grep -v Warning | tail -3
  ncu -i "$OUT/ncu_step.ncu-rep" --page raw --csv > "$OUT/ncu_step_raw.csv"
  ncu -i "$OUT/ncu_step.ncu-rep" --page source --csv --print-source sass > "$OUT/ncu_step_sass.csv"
  rm -f "$OUT/ncu_step.ncu-rep"
  python3 - "$OUT/ncu_step_raw.csv" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))
stalls = [(float(v.replace(",", "")), k) for k, v in zip(rows[0], rows[-1])
          if "issue_stalled" in k and v.replace(",", "").replace(".", "").isdigit()]
for v, k in sorted(stalls, reverse=True)[:14]:
    print(f"{v:8.3f} {k}")
PY
fi
if [[ $what == *gemv-ncu* ]]; then
  # One int8 GEMV call per shape under Nsight Compute (in isolation, so without PDL overlap):
  # DRAM throughput, memory and warp stall breakdowns, for the shapes of the 70% bar.
  ncu_shapes=${INT8_SHAPES:-2048x5632,5632x2048}
  for shape in ${ncu_shapes//,/ }; do
    timeout 150 ncu --clock-control none --kernel-name-base demangled -k 'regex:gemv_kernel<.*signed char' \
      -s 5 -c 1 --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
      --section Occupancy --section LaunchStats \
      python3 "$repo/benchmarks/int8_gemv_cuda.py" --shapes "$shape" > "$OUT/ncu_gemv_$shape.txt" 2>&1
    grep -E "Duration|DRAM Throughput|Memory Throughput|Registers|Achieved Occupancy|Stall|Warp Cycles" \
      "$OUT/ncu_gemv_$shape.txt" | sed "s/^/$shape: /" | head -30
  done
fi
if [[ $what == *profile* ]]; then
  for shape in ${BENCH_SHAPES:-stories15M stories110M 1b-gqa}; do
    for q in "" "--quantize int8"; do
      # PROFILE_SETTING: a setting to profile under (as for bench_settings).
      with_setting "${PROFILE_SETTING:-none}" env BABYRT_PDL=${PROFILE_PDL:-0} timeout 120 python3 "$repo/benchmarks/cuda_decode_profile.py" --shape $shape $q \
        --cache-dir "$cache" --json "$OUT/profile_${shape}${q:+_int8}.json" 2>&1 | grep -v Warning
    done
  done
  BABYRT_GRAPH_STEPS=1 python3 "$repo/benchmarks/cuda_decode_profile.py" --shape stories15M --top 0 --cache-dir "$cache" \
    2>&1 | grep -v Warning | sed 's/^/one graph per token: /'
fi
if [[ $what == *chain* ]]; then
  # CHAIN_RUNS: the argument sets to run it with, separated by ";".
  if nvcc -O3 -std=c++17 -arch=sm_90a "$repo/benchmarks/kernel_chain.cu" -o "$OUT/kernel_chain"; then
    IFS=';' read -ra chain_runs <<< "${CHAIN_RUNS:-;--carveout 100;--carveout-gemvs 100}"
    for args in "${chain_runs[@]}"; do "$OUT/kernel_chain" $args | tee -a "$OUT/kernel_chain.txt"; done
  fi
  rm -f "$OUT/kernel_chain"
fi
if [[ $what == *seed* || $what == all ]]; then
  # The seed table, every model at once on the one GPU (each is far too small to fill it).
  data=${SEED_DATA:-$repo/.gpu_data/ALL_eminem.txt}
  for m in ${SEED_MODELS:-llama2 babygpt llama1 ngram bigram}; do
    babyrt train --preset seed-$m --data "$data" --out "$OUT/seed-$m" --device cuda \
      --precision bf16 ${SEED_ARGS:-} > "$OUT/seed-$m.log" 2>&1 &
  done
  wait
  for m in ${SEED_MODELS:-llama2 babygpt llama1 ngram bigram}; do tail -1 "$OUT/seed-$m.log"; done
  python3 "$repo/benchmarks/seed_table.py" "$OUT"/seed-* | tee "$OUT/seed_table.md"
  # Only the logs come back (the device returns at most 8 files).
  (cd "$OUT" && tar czf seed_runs.tar.gz seed-*/log.json seed-*/summary.json seed-*/config.json \
     seed-*/loss.png seed-*.log && rm -rf seed-*)
fi
if [[ $what == *mfu* || $what == all ]]; then
  python3 "$repo/benchmarks/train_mfu.py" --json "$OUT/train_mfu.json" 2>&1 | tail -3
fi
