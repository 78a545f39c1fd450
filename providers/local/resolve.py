"""Where a local model lives and what it runs on: model spec, device and dtype.

A model spec is one of

- a path: a model directory (safetensors + tokenizer + config) or a ``.gguf`` file;
- ``package:<import_name>/<relative path>``: a file or directory shipped inside an
  installed Python package, found without importing the package;
- a Hugging Face id (``org/name``, or ``org/name/file.gguf`` for one GGUF file in a
  repository), taken from the local Hugging Face cache, downloaded only when the tier
  says ``allow_download = true``.

Everything here may block (file system, hub); callers run it off the event loop.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)


class ModelSpecError(Exception):
    """The model spec names nothing that can be loaded; the message says why."""


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """A model on the local disk: a directory, or a GGUF file."""

    path: Path
    is_gguf: bool
    spec: str


def resolve_model(spec: str, *, allow_download: bool = False) -> ResolvedModel:
    """Turn a tier's ``model`` string into a local path, or raise ``ModelSpecError``."""
    if spec.startswith("package:"):
        return _checked(_package_path(spec), spec)
    path = Path(spec).expanduser()
    if path.is_absolute() or spec.startswith(".") or path.exists():
        return _checked(path, spec)
    return _from_hub(spec, allow_download=allow_download)


def _checked(path: Path, spec: str) -> ResolvedModel:
    if not path.exists():
        raise ModelSpecError(f"model path {str(path)!r} does not exist (from {spec!r})")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelSpecError(f"model file {str(path)!r} is not a .gguf file")
        return ResolvedModel(path=path, is_gguf=True, spec=spec)
    if not (path / "config.json").exists():
        raise ModelSpecError(f"model directory {str(path)!r} has no config.json")
    return ResolvedModel(path=path, is_gguf=False, spec=spec)


def _package_path(spec: str) -> Path:
    rest = spec[len("package:") :]
    name, _, relative = rest.partition("/")
    if not name:
        raise ModelSpecError(f"model spec {spec!r}: expected package:<import_name>/<path>")
    try:
        found = importlib.util.find_spec(name)
    except (ImportError, ValueError) as exc:
        raise ModelSpecError(f"package {name!r} for model {spec!r}: {exc}") from exc
    if found is None or not found.submodule_search_locations:
        raise ModelSpecError(f"package {name!r} for model {spec!r} is not installed")
    return Path(list(found.submodule_search_locations)[0]) / relative


def _from_hub(spec: str, *, allow_download: bool) -> ResolvedModel:
    parts = spec.split("/")
    if len(parts) < 2:
        raise ModelSpecError(
            f"model {spec!r} is neither an existing path nor a Hugging Face id (org/name)"
        )
    try:
        import huggingface_hub
        from huggingface_hub.utils import HfHubHTTPError
    except ImportError as exc:  # pragma: no cover - huggingface_hub ships with transformers
        raise ModelSpecError(f"model {spec!r}: huggingface_hub is not installed") from exc
    repo_id = "/".join(parts[:2])
    filename = "/".join(parts[2:])
    offline = not allow_download
    if allow_download:
        log.info("local_model_download", model=spec)
    try:
        if filename:
            local = huggingface_hub.hf_hub_download(
                repo_id, filename, local_files_only=offline
            )
            return _checked(Path(local), spec)
        local_dir = huggingface_hub.snapshot_download(
            repo_id,
            local_files_only=offline,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"],
        )
        return _checked(Path(local_dir), spec)
    except (huggingface_hub.errors.LocalEntryNotFoundError, FileNotFoundError) as exc:
        hint = "" if allow_download else " (offline: set allow_download = true to fetch it)"
        raise ModelSpecError(f"model {spec!r} is not in the Hugging Face cache{hint}") from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelSpecError(f"model {spec!r}: {exc}") from exc


# --- device and dtype ---------------------------------------------------------------


def pick_device(requested: str) -> str:
    """``auto`` picks cuda, then mps, then cpu; an explicit device must exist."""
    import torch

    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
        return "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise ModelSpecError(f"device {requested!r} is not a device torch knows: {exc}") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelSpecError(f"device {requested!r}: CUDA is not available on this host")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelSpecError(
                f"device {requested!r}: only {torch.cuda.device_count()} CUDA device(s) here"
            )
    if device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ModelSpecError(f"device {requested!r}: MPS is not available on this host")
    return str(device)


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True when the processor computes bf16 natively (AVX512-BF16 or AMX)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


def pick_dtype(requested: str, device: str) -> Any:
    """The torch dtype for ``requested`` (``auto``: bf16/f16 on GPU, bf16 on a CPU with
    native bf16, else f32)."""
    import torch

    named = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if requested != "auto":
        return named[requested]
    kind = device.split(":")[0]
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if kind == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def default_cache_dir(configured: str | None, environ: os._Environ[str] | dict[str, str] | None = None) -> Path:
    """Where converted GGUF weights go: the tier's ``cache_dir``, else
    ``$TIERGATE_CACHE_DIR``, else systemd's ``$CACHE_DIRECTORY``, else ``~/.cache/tiergate``."""
    env = os.environ if environ is None else environ
    if configured:
        return Path(configured).expanduser()
    for name in ("TIERGATE_CACHE_DIR", "CACHE_DIRECTORY"):
        value = env.get(name)
        if value:
            # systemd may hand several directories separated by ':'; the first is ours.
            return Path(value.split(":")[0])
    return Path("~/.cache/tiergate").expanduser()
