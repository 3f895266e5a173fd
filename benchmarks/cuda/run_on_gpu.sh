#!/usr/bin/env bash
# On the GPU machine (torch with CUDA, the CUDA toolkit; no MLIR), from the repository root,
# with the cache benchmarks/cuda/precompile.sh filled (or its .tar.xz beside, unpacked here):
#     XEGPU_ATTN_CACHE_DIR=.nvproto/cache OUT=results bash benchmarks/cuda/run_on_gpu.sh
# Builds the two extensions (_C, the CUDA launcher), then runs the steps named in $STEPS (default
# all, in this order): kernels (the training kernels checked one by one), tests (the GPU tests),
# sanitizers (compute-sanitizer memcheck, racecheck, synccheck on tail-heavy calls), variants (the
# backward's schedule variants; $VARIANTS, $VARIANT_LENGTHS and $VARIANT_HEAD_DIMS narrow them),
# decode (the decode variants), host (the host-cost breakdown), bench (bench_cuda.py, CSV in
# $OUT; $BENCH_ARGS passed on).  A .payload/ of ../shared/tools/fa4_payload.sh (carried with the
# call) is unpacked first and adds FlashAttention-4's columns to the benchmark.
set -o pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XEGPU_ATTN_CACHE_DIR=$(realpath -m "${XEGPU_ATTN_CACHE_DIR:-.nvproto/cache}")
OUT=${OUT:-gpu-results}; mkdir -p "$OUT"
STEPS=${STEPS:-kernels tests sanitizers variants decode host bench}
if [ ! -d "$XEGPU_ATTN_CACHE_DIR" ] && [ -f "$XEGPU_ATTN_CACHE_DIR.tar.xz" ]; then
  mkdir -p "$XEGPU_ATTN_CACHE_DIR" && xz -dc "$XEGPU_ATTN_CACHE_DIR.tar.xz" | tar xf - -C "$XEGPU_ATTN_CACHE_DIR"
fi
site=/tmp/fa4-site
if [ -d .payload ] && [ ! -d $site/flash_attn ]; then
  mkdir -p $site && (for f in .payload/fa4_so.tar.xz .payload/fa4_rest.tar.xz; do xz -dc $f | tar xf - -C $site; done) &
fi
python3 -c "import torch_xegpu_attn; from torch_xegpu_attn.runtime import cuda; cuda.extension(); print('extensions built')"
wait
for step in $STEPS; do
  case $step in
  kernels) python3 benchmarks/cuda/check_training_kernels.py 2>&1 | tee "$OUT/training_kernels.log" ;;
  tests) python3 -m pytest -q -p no:cacheprovider -rfE tests/test_nvvm_gpu.py 2>&1 | tee "$OUT/pytest.log" | tail -3 ;;
  sanitizers)
    for tool in memcheck racecheck synccheck; do
      compute-sanitizer --tool $tool python3 benchmarks/cuda/sanitize.py > "$OUT/sanitizer_$tool.log" 2>&1
      echo "$tool: $(tail -1 "$OUT/sanitizer_$tool.log")"
    done ;;
  variants)
    for n in ${VARIANT_LENGTHS:-4096}; do
      # VARIANTS: shell words (each variant's JSON quoted by the caller), hence eval
      eval "python3 benchmarks/cuda/backward_variants.py --length $n --head-dims ${VARIANT_HEAD_DIMS:-64 128} \
        ${VARIANTS:+--variants $VARIANTS}" 2>&1 | tee -a "$OUT/backward_variants.log"
    done ;;
  decode) python3 benchmarks/cuda/decode_variants.py 2>&1 | grep B= | tee "$OUT/decode.log" ;;
  host) python3 benchmarks/cuda/host_breakdown.py 2>&1 | tee "$OUT/host.log" ;;
  bench)
    # shellcheck disable=SC2086
    PYTHONPATH=$PWD:$site:$site/nvidia_cutlass_dsl/dsl_packages python3 -W ignore benchmarks/bench_cuda.py \
      --csv "$OUT/bench.csv" $BENCH_ARGS 2>&1 | tee "$OUT/bench.log" ;;
  *) echo "run_on_gpu.sh: no step $step"; exit 2 ;;
  esac
done
