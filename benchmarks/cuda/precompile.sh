#!/usr/bin/env bash
# On the machine with MLIR (and ptxas): compile every kernel the GPU tests, the sanitizer script
# and the benchmarks call into one cache directory, to carry to the GPU machine.
#     bash benchmarks/cuda/precompile.sh [cache-dir] [arch]      (default .nvproto/cache sm_90a)
set -euo pipefail
cd "$(dirname "$0")/../.."
cache=$(realpath -m "${1:-.nvproto/cache}")
arch=${2:-sm_90a}
export XEGPU_ATTN_CACHE_DIR=$cache
# The GPU tests run on meta tensors and precompile what they would call (sanitize.py and
# host_breakdown.py call kernels of the same specs).
XEGPU_ATTN_TEST_PRECOMPILE=$arch .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_nvvm_gpu.py
# the benchmark's own rows (its long prompts and bf16 rows are not all among the tests')
.venv/bin/python benchmarks/bench_cuda.py --precompile "$arch"
# the training kernels' direct check
.venv/bin/python benchmarks/cuda/check_training_kernels.py --precompile "$arch"
# backward_variants.py's schedule variants
.venv/bin/python benchmarks/cuda/backward_variants.py --precompile "$arch"
# decode_variants.py's schedule variants
.venv/bin/python benchmarks/cuda/decode_variants.py --precompile "$arch"
du -sh "$cache"
