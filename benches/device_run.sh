#!/usr/bin/env bash
# Runs falconer's GPU checks on a machine with an NVIDIA GPU, from binaries built
# elsewhere (the device machines carry a small tree, not target/):
#
#   cargo build --release --features cuda --tests --benches --examples
#   mkdir -p .gpu/m && cp "$(ls -t target/release/deps/integration-* | grep -v '\.d$' | head -1)" .gpu/m/integration
#   cp "$(ls -t target/release/deps/gpu_decode-* | grep -v '\.d$' | head -1)" .gpu/m/gpu_decode
#   cp target/release/examples/specbench .gpu/m/ && strip .gpu/m/* && tar cJf .gpu/bins.tar.xz -C .gpu m
#
# then, on the GPU machine, from the repository root (results go under $OUT):
#
#   OUT=out bash benches/device_run.sh [LIMIT_SECONDS]
#
# Environment: NOTEST=1 skips the CUDA tests; HF=1 runs benches/hf_baseline.py first
# and hands its figures to the bench (HF_BASELINE_JSON); ONLY=a,b picks the bench's
# sections (BENCH_ONLY; default decode,verify), FULL=1 runs all of them (BENCH_MATRIX,
# passed through, limits the decode section to the listed launch settings); SPEC=1 runs
# specbench --device cuda; PROF=1 runs the profile pass under ncu (kernel times);
# NARROW=1 also runs the golden, graph and fork tests with FALCONER_FORK_WIDE=0 (the
# fork only in one-row shared-norm steps), and specbench (with SPEC=1) once more so.
set -uo pipefail
LIMIT=${1:-540}
T0=$(date +%s)
left() { echo $((LIMIT - ($(date +%s) - T0))); }
OUT=${OUT:?set OUT to a results folder}
mkdir -p "$OUT"
BINS=${BINS:-.gpu/bins.tar.xz}
DIR=$(dirname "$BINS")
tar xJf "$BINS" -C "$DIR"
B=$DIR/m
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
if [ -z "${NOTEST:-}" ]; then
  echo "== tests ($(left)s left)"
  timeout 240 "$B/integration" cuda_ --test-threads=1 >"$OUT/tests.txt" 2>&1
  echo "tests rc=$?"
  grep -E "test result|FAILED|panicked|failed" "$OUT/tests.txt" | head -40
  if [ -n "${NARROW:-}" ]; then
    echo "== tests, FALCONER_FORK_WIDE=0 ($(left)s left)"
    FALCONER_FORK_WIDE=0 timeout 180 "$B/integration" cuda_golden cuda_graphs cuda_fork \
      --test-threads=1 >"$OUT/tests_narrow.txt" 2>&1
    echo "narrow tests rc=$?"
    grep -E "test result|FAILED|panicked|failed" "$OUT/tests_narrow.txt" | head -40
  fi
fi
if [ -n "${HF:-}" ] && [ "$(left)" -gt 200 ]; then
  echo "== hf ($(left)s left)"
  PYTHONUNBUFFERED=1 timeout 150 python3 benches/hf_baseline.py "$OUT/hf.json" >"$OUT/hf.txt" 2>&1
  echo "hf rc=$?"
  tail -3 "$OUT/hf.txt"
  export HF_BASELINE_JSON=$OUT/hf.json
fi
if [ "$(left)" -gt 60 ]; then
  echo "== bench ($(left)s left)"
  if [ -z "${FULL:-}" ]; then export BENCH_ONLY=${ONLY:-decode,verify}; fi
  BENCH_OUT=$OUT/bench.json timeout $(($(left) - 20)) "$B/gpu_decode" >"$OUT/bench.txt" 2>&1
  echo "bench rc=$?"
  sed -n '/^falconer CUDA backend/,$p' "$OUT/bench.txt"
fi
if [ -n "${SPEC:-}" ] && [ "$(left)" -gt 90 ]; then
  echo "== specbench ($(left)s left)"
  timeout $(($(left) - 10)) "$B/specbench" --device cuda --out "$OUT" >"$OUT/spec.txt" 2>&1
  echo "spec rc=$?"
  tail -25 "$OUT/spec.txt"
  if [ -n "${NARROW:-}" ] && [ "$(left)" -gt 90 ]; then
    echo "== specbench, FALCONER_FORK_WIDE=0 ($(left)s left)"
    mkdir -p "$OUT/narrow"
    FALCONER_FORK_WIDE=0 timeout $(($(left) - 10)) "$B/specbench" --device cuda --out "$OUT/narrow" \
      >"$OUT/spec_narrow.txt" 2>&1
    echo "spec narrow rc=$?"
    tail -25 "$OUT/spec_narrow.txt"
  fi
fi
if [ -n "${PROF:-}" ] && [ "$(left)" -gt 60 ]; then
  echo "== ncu ($(left)s left)"
  NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
  if [ -n "$NCU" ]; then
    BENCH_ONLY=profile timeout $(($(left) - 10)) "$NCU" --csv \
      --metrics gpu__time_duration.sum,dram__bytes_read.sum,sm__warps_active.avg.pct_of_peak_sustained_active \
      -k regex:"attn_decode_tc|attn_combine|rope_qkv|attn_decode_hd" "$B/gpu_decode" >"$OUT/ncu.csv" 2>"$OUT/ncu.err"
    echo "ncu rc=$?"
  else
    echo "no ncu on this machine"
  fi
fi
echo "done in $(($(date +%s) - T0))s"
