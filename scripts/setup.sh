#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with the pinned
# dependencies, and this package built in it (with its C++ extension).
#
#   bash scripts/setup.sh            what the package and the demo need (requirements.txt)
#   bash scripts/setup.sh --test     also the test dependencies (requirements-test.txt) and
#                                    the xegpu target's system tools (scripts/setup_xegpu.sh)
#   bash scripts/setup.sh --check    say what a run would do, do nothing (exit 1 if anything)
#
# Idempotent: each step leaves a stamp in .venv (the SHA-256 of what it was made
# from), and a second run with nothing changed only checks that the package
# imports (seconds).  A changed requirements file reinstalls it; a changed
# torch_xegpu_attn/csrc/ (but the CUDA and XPU launchers, built at their first use),
# setup.py, pyproject.toml or requirements.txt rebuilds the extension.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
MODE=${1:-}
case "$MODE" in
    ""|--test|--check|--check-test) ;;
    *) echo "setup: unknown option $MODE (use --test, --check or --check-test)" >&2; exit 2 ;;
esac

# The SHA-256 of files (and of the interpreter they are for), one line.
digest() {
    { .venv/bin/python -c 'import sys; print(sys.version)' 2>/dev/null || echo none
      for f in "$@"; do echo "== $f"; cat "$f"; done; } | sha256sum | cut -d' ' -f1
}
stamp_ok() {  # stamp_ok NAME DIGEST
    [ -f ".venv/.setup-$1" ] && [ "$(cat ".venv/.setup-$1")" = "$2" ]
}
build_inputs() {
    echo setup.py pyproject.toml requirements.txt
    find torch_xegpu_attn/csrc -type f ! -name 'cuda_*' ! -name 'xpu_*' | LC_ALL=C sort
}

requirements="requirements.txt"
case "$MODE" in --test|--check-test) requirements="requirements.txt requirements-test.txt" ;; esac

if [ "${MODE#--check}" != "$MODE" ]; then
    todo=0
    if [ ! -x .venv/bin/python ]; then echo "setup would create .venv"; exit 1; fi
    for r in $requirements; do
        stamp_ok "$r" "$(digest "$r")" || { echo "setup would install $r"; todo=1; }
    done
    # shellcheck disable=SC2046
    stamp_ok build "$(digest $(build_inputs))" || { echo "setup would rebuild the C++ extension"; todo=1; }
    if [ "$MODE" = --check-test ]; then bash scripts/setup_xegpu.sh --check >/dev/null || { echo "setup would install the xegpu tools (scripts/setup_xegpu.sh)"; todo=1; }; fi
    [ "$todo" = 0 ] && echo "setup: up to date"
    exit "$todo"
fi

if ! command -v cc >/dev/null 2>&1; then
    echo "setup: a C compiler (cc) is needed to build the launcher and link kernels" >&2
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq gcc g++ >/dev/null
    else
        exit 1
    fi
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
for r in $requirements; do
    want=$(digest "$r")
    if ! stamp_ok "$r" "$want"; then
        .venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$r"
        echo "$want" > ".venv/.setup-$r"
    fi
done
if [ "$MODE" = --test ]; then
    # the xegpu target's system tools (Debian llvm-22, clang-22, spirv-tools, ocloc in a sid chroot)
    bash scripts/setup_xegpu.sh || echo "setup: without the xegpu tools, the xegpu tests skip" >&2
fi
build() {
    echo "setup: building torch-xegpu-attn (C++ extension, about a minute)"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-build-isolation -e .
    echo "$1" > .venv/.setup-build
}
ready() {
    .venv/bin/python -c "import torch_xegpu_attn, torch_xegpu_attn._C; print('torch-xegpu-attn', torch_xegpu_attn.__version__, 'ready')"
}
# shellcheck disable=SC2046
want=$(digest $(build_inputs))
if ! stamp_ok build "$want"; then
    build "$want"
    ready
elif ! ready 2>/dev/null; then  # stamped, but the build is gone or broken: build again
    build "$want"
    ready
fi
