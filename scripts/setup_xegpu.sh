#!/usr/bin/env bash
# The xegpu target's system tools (the test setup runs this; root and apt needed):
#
#   Debian bookworm   llvm-22 (opt, llc with the SPIR-V backend, llvm-link), clang-22 (the
#                     emulated builtins, OpenCL C), spirv-tools (spirv-val), libze-dev (the Level
#                     Zero headers the XPU launcher, torch_xegpu_attn/csrc/xpu_launcher.cpp,
#                     is built with)
#   Debian sid        Intel's offline compiler ocloc 26.x with IGC 2.x and a current spirv-val
#                     (it knows the SPIR-V extensions the kernels use), in a minimal chroot
#                     at $XEGPU_ATTN_SID_ROOT (default /opt/xegpu-sid): they need a newer
#                     glibc than bookworm's.  Only the native-code checks use it.
#
#   bash scripts/setup_xegpu.sh           install what is missing (seconds when nothing is)
#   bash scripts/setup_xegpu.sh --check   say what is missing, change nothing (exit 1 if anything)
set -euo pipefail
SID_ROOT=${XEGPU_ATTN_SID_ROOT:-/opt/xegpu-sid}
MIRROR=${XEGPU_ATTN_DEBIAN_MIRROR:-http://deb.debian.org/debian}
PACKAGES="llvm-22 clang-22 spirv-tools libze-dev debootstrap"
SID_PACKAGES="intel-ocloc libigc2 libigdfcl2 spirv-tools"

missing_packages() {
    for p in $PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done
}
sid_ready() { { [ -L "$SID_ROOT/usr/bin/ocloc" ] || [ -e "$SID_ROOT/usr/bin/ocloc" ]; } && [ -f "$SID_ROOT/.xegpu-ready" ]; }

if [ "${1:-}" = "--check" ]; then
    todo=0
    m=$(missing_packages); [ -n "$m" ] && { echo "setup_xegpu would install:" $m; todo=1; }
    sid_ready || { echo "setup_xegpu would make the sid chroot with ocloc at $SID_ROOT"; todo=1; }
    [ "$todo" = 0 ] && echo "setup_xegpu: up to date"
    exit "$todo"
fi

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "setup_xegpu: needs root and apt-get (Debian bookworm); the xegpu tests will skip" >&2
    exit 1
fi
m=$(missing_packages)
if [ -n "$m" ]; then
    echo "setup_xegpu: installing" $m
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $m >/dev/null
fi
if ! sid_ready; then
    echo "setup_xegpu: making the Debian sid chroot with ocloc at $SID_ROOT (about a minute)"
    [ -d "$SID_ROOT/usr" ] || debootstrap --variant=minbase sid "$SID_ROOT" "$MIRROR" >/dev/null
    mountpoint -q "$SID_ROOT/proc" || mount --bind /proc "$SID_ROOT/proc"
    # the mirror's sid Release files can be past their Valid-Until date
    chroot "$SID_ROOT" bash -c "apt-get -o Acquire::Check-Valid-Until=false update -qq && \
        DEBIAN_FRONTEND=noninteractive apt-get -o Acquire::Check-Valid-Until=false install -y -qq \
        --no-install-recommends $SID_PACKAGES >/dev/null"
    touch "$SID_ROOT/.xegpu-ready"
fi
mountpoint -q "$SID_ROOT/proc" || mount --bind /proc "$SID_ROOT/proc"
echo "setup_xegpu: ready ($(chroot "$SID_ROOT" ocloc --version 2>/dev/null | head -1 || echo 'ocloc ?'))"
