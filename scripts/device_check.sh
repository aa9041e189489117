#!/usr/bin/env bash
# On the GPU machine (its own torch, nvcc, CMake; no network): build the extension against that
# torch, run the CUDA tests, the Python and C++ benchmarks, and print a short table at the end.
# Everything is logged under $OUT (or ./device_out). Meant to finish in well under 8 minutes.
# Carry .deps/benchmark (made here by scripts/fetch_benchmark.sh) for the C++ benchmarks.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/device_out}"
mkdir -p "$out"
py="${PYTHON:-python3}"
status=0
step() {  # step NAME COMMAND...: run, log to $out/NAME.log, remember failures
  local name=$1
  shift
  local t0=$SECONDS
  echo "=== $name: $*"
  if "$@" >"$out/$name.log" 2>&1; then
    echo "=== $name: ok ($((SECONDS - t0)) s)"
  else
    echo "=== $name: FAILED ($((SECONDS - t0)) s); tail of $name.log:"
    tail -n 40 "$out/$name.log"
    status=1
  fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv >"$out/gpu.txt" 2>&1
cat "$out/gpu.txt"
export MAX_JOBS=${MAX_JOBS:-16} TORCHSPEC_BUILD_CUDA=1
step build "$py" setup.py build_ext --inplace
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
step cuda_tests "$py" -m pytest -q -x python_tests -m cuda
# Every Python benchmark part (topk, draft_loss, tree, pipeline, train, acceptance) in one report with plots.
step bench_all "$py" -m torchspec_ext.bench all --device cuda --out "$out/report"
if [ -d .deps/benchmark/usr ]; then
  step cmake_build bash -c "cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH=$PWD/.deps/benchmark/usr >/dev/null && cmake --build build/cmake -j16"
  step cpp_bench_topk build/cmake/bench_topk --benchmark_filter=cuda --benchmark_min_time=0.2 \
    --benchmark_out="$out/cpp_bench_topk.json" --benchmark_out_format=json
  step cpp_bench_draft_loss build/cmake/bench_draft_loss --benchmark_filter=cuda --benchmark_min_time=0.2 \
    --benchmark_out="$out/cpp_bench_draft_loss.json" --benchmark_out_format=json
  step cpp_bench_tree build/cmake/bench_tree --benchmark_filter=cuda --benchmark_min_time=0.2 \
    --benchmark_out="$out/cpp_bench_tree.json" --benchmark_out_format=json
  step cpp_bench_pipeline build/cmake/bench_pipeline --benchmark_filter=nccl --benchmark_min_time=0.2 \
    --benchmark_out="$out/cpp_bench_pipeline.json" --benchmark_out_format=json
else
  echo "=== C++ benchmarks skipped: .deps/benchmark not carried"
fi

echo
echo "=== tests:"; tail -n 3 "$out/cuda_tests.log"
# The report's part titles, failures and tables (headers left in $out/report/report.md).
echo "=== python benchmark report:"; grep -E '^## |^\*\*|^\||transport' "$out/report/report.md" || tail -n 20 "$out/bench_all.log"
[ -f "$out/cpp_bench_topk.log" ] && { echo "=== C++ benchmark:"; grep -E 'cuda_' "$out/cpp_bench_topk.log" "$out/cpp_bench_draft_loss.log" "$out/cpp_bench_tree.log"; }
[ -f "$out/cpp_bench_pipeline.log" ] && { echo "=== C++ pipeline benchmark:"; grep -E 'nccl_|skipped' "$out/cpp_bench_pipeline.log"; }
exit $status
