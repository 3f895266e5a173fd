#!/usr/bin/env bash
# On the machine with MLIR (and ptxas): compile every kernel the GPU tests, the sanitizer script
# and the benchmarks call into one cache directory, to carry to the GPU machine.
#     bash benchmarks/cuda/precompile.sh [cache-dir] [arch]      (default .nvproto/cache sm_90a)
# BENCH_ARGS (e.g. "--quick --lengths 2048,4096") narrows the benchmark's rows as it will run them;
# VARIANTS, VARIANT_LENGTHS, VARIANT_HEAD_DIMS the backward variants (as run_on_gpu.sh takes them).
# Also writes <cache-dir>.tar.xz, what to carry to the GPU machine (the carry is limited in size).
set -euo pipefail
cd "$(dirname "$0")/../.."
cache=$(realpath -m "${1:-.nvproto/cache}")
arch=${2:-sm_90a}
export XEGPU_ATTN_CACHE_DIR=$cache
# The GPU tests run on meta tensors and precompile what they would call (sanitize.py and
# host_breakdown.py call kernels of the same specs).
XEGPU_ATTN_TEST_PRECOMPILE=$arch .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_nvvm_gpu.py
# the benchmark's own rows (its long prompts and bf16 rows are not all among the tests')
# shellcheck disable=SC2086
.venv/bin/python benchmarks/bench_cuda.py --precompile "$arch" ${BENCH_ARGS:-}
# the training kernels' direct check
.venv/bin/python benchmarks/cuda/check_training_kernels.py --precompile "$arch"
# backward_variants.py's schedule variants
for n in ${VARIANT_LENGTHS:-4096}; do
  eval ".venv/bin/python benchmarks/cuda/backward_variants.py --precompile $arch --length $n \
    --head-dims ${VARIANT_HEAD_DIMS:-64 128} ${VARIANTS:+--variants $VARIANTS}"
done
# decode_variants.py's schedule variants
.venv/bin/python benchmarks/cuda/decode_variants.py --precompile "$arch"
tar cf - -C "$cache" . | xz -T2 -6 > "$cache.tar.xz"
du -sh "$cache" "$cache.tar.xz"
