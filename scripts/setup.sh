#!/usr/bin/env bash
# Create .venv and install trtkit with everything its tests and the example need (CPU only).
# Idempotent: rerunning only checks what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
pip install -q --upgrade pip
# First, and pinned: 2.13.0 is the CPU build; an unpinned torch would pull a multi-GB CUDA build.
pip install -q torch==2.13.0
pip install -q -e ".[torch,rtx,dev,ray]"  # ray: the optional engine, tested on a local cluster
# tensorrt-stubs depends on the real tensorrt, which cannot be installed from PyPI: types only.
pip install -q --no-deps tensorrt-stubs
pip install -q --no-deps -e plugins_contrib/trtkit-onnxslim
