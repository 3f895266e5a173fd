#!/usr/bin/env bash
# On the GPU machine (torch with CUDA, the CUDA toolkit; no MLIR), from the repository root,
# with the cache benchmarks/cuda/precompile.sh filled:
#     XEGPU_ATTN_CACHE_DIR=.nvproto/cache OUT=results bash benchmarks/cuda/run_on_gpu.sh
# Builds the two extensions (_C, the CUDA launcher), checks the training kernels one by one, runs
# the GPU tests, compute-sanitizer
# (memcheck, racecheck, synccheck) on tail-heavy calls, the backward and decode variants, the host-cost
# breakdown and the benchmark (CSV in $OUT).
set -o pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XEGPU_ATTN_CACHE_DIR=$(realpath -m "${XEGPU_ATTN_CACHE_DIR:-.nvproto/cache}")
OUT=${OUT:-gpu-results}; mkdir -p "$OUT"
python3 -c "import torch_xegpu_attn; from torch_xegpu_attn.runtime import cuda; cuda.extension(); print('extensions built')"
python3 benchmarks/cuda/check_training_kernels.py 2>&1 | tee "$OUT/training_kernels.log"
python3 -m pytest -q -p no:cacheprovider -rfE tests/test_nvvm_gpu.py 2>&1 | tee "$OUT/pytest.log" | tail -3
for tool in memcheck racecheck synccheck; do
  compute-sanitizer --tool $tool python3 benchmarks/cuda/sanitize.py > "$OUT/sanitizer_$tool.log" 2>&1
  echo "$tool: $(tail -1 "$OUT/sanitizer_$tool.log")"
done
python3 benchmarks/cuda/backward_variants.py 2>&1 | tee "$OUT/backward_variants.log"
python3 benchmarks/cuda/decode_variants.py 2>&1 | grep B= | tee "$OUT/decode.log"
python3 benchmarks/cuda/host_breakdown.py 2>&1 | tee "$OUT/host.log"
python3 -W ignore benchmarks/bench_cuda.py --csv "$OUT/bench.csv" 2>&1 | tee "$OUT/bench.log"
