#!/usr/bin/env bash
# libxsmm's rate on the block contractions of one flash step (libxsmm_rate.c), one thread.
#
#     bash benchmarks/ukernel/run.sh [calls per timing, default 20000]
#     LIBXSMM_TARGET=hsw bash benchmarks/ukernel/run.sh     # libxsmm's AVX2 code on any host
#
# Needs Debian's libxsmm-dev (apt-get install libxsmm-dev); not part of the project's setup:
# this is the measurement behind docs/cpu.md's choice of generating the micro-kernel.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cc -O2 -o "$out/libxsmm_rate" "$here/libxsmm_rate.c" -lxsmm -lxsmmnoblas -lm -lpthread -ldl
"$out/libxsmm_rate" "$@"
