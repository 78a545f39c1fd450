"""llama.cpp's own tools, built once from the llama.cpp source that the installed
llama-cpp-python vendors, for side-by-side benchmarks (not for the daemon).

    .venv/bin/python bench/llama_ref.py        # build (or find) them; prints the folder

The source is the llama-cpp-python sdist of the installed version, fetched with pip; the
build goes to ``$TIERGATE_BENCH_CACHE`` (default ``~/.cache/tiergate/llama.cpp-<version>``),
outside the repository, and is reused by later runs. Flags: the same CPU build as the
bindings (``GGML_NATIVE``), no curl, no web UI. ``llama-server`` and
``llama-batched-bench`` only; a few minutes on two cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

TOOLS = ("llama-server", "llama-batched-bench")


def version() -> str:
    from importlib.metadata import version as dist_version

    return dist_version("llama-cpp-python")


def cache_dir() -> Path:
    configured = os.environ.get("TIERGATE_BENCH_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path(f"~/.cache/tiergate/llama.cpp-{version()}").expanduser()


def ensure_tools() -> Path:
    """The folder holding the built tools (building them first when missing)."""
    root = cache_dir()
    bin_dir = root / "build" / "bin"
    if all((bin_dir / t).exists() for t in TOOLS):
        return bin_dir
    root.mkdir(parents=True, exist_ok=True)
    src = root / "src"
    if not (src / "CMakeLists.txt").exists():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                            "--no-binary", ":all:", f"llama-cpp-python=={version()}", "-d", tmp],
                           check=True)
            (sdist,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
            with tarfile.open(sdist) as tar:
                members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name]
                tar.extractall(tmp, members=members, filter="data")
            (vendored,) = Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp")
            vendored.rename(src)
    print(f"building {', '.join(TOOLS)} from {src} (a few minutes)...", file=sys.stderr, flush=True)
    subprocess.run(["cmake", "-S", str(src), "-B", str(root / "build"), "-DCMAKE_BUILD_TYPE=Release",
                    "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF"],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(root / "build"), "--config", "Release",
                    "-j", str(os.cpu_count() or 2), "--target", *TOOLS],
                   check=True, stdout=subprocess.DEVNULL)
    return bin_dir


if __name__ == "__main__":
    print(ensure_tools())
