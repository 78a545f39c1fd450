"""A GGUF file converted once into a plain safetensors model directory.

transformers dequantizes a GGUF file tensor by tensor, in Python: tens of seconds even
for a 135M model. The result is saved under ``<cache>/gguf/<sha256 of the file>/`` so the
next start loads safetensors in well under a second. The file's hash is itself cached by
(path, size, mtime), so a restart does not read the whole file again either.

Everything here blocks; the loader runs it on its own thread.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

_MARKER = "tiergate-conversion.json"
_HASHES = "hashes.json"


@dataclass(frozen=True, slots=True)
class ConvertedModel:
    path: Path
    sha256: str
    cache_hit: bool  # True when an earlier conversion was reused


def file_sha256(path: Path, cache_dir: Path) -> str:
    """The file's sha256, remembered by (path, size, mtime) in ``cache_dir``."""
    stat = path.stat()
    key = str(path.resolve())
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    index_path = cache_dir / _HASHES
    index: dict[str, Any] = {}
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    known = index.get(key)
    if isinstance(known, dict) and all(known.get(k) == v for k, v in stamp.items()):
        return str(known["sha256"])
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(4 << 20), b""):
            digest.update(block)
    sha = digest.hexdigest()
    index[key] = {**stamp, "sha256": sha}
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(index_path, json.dumps(index, indent=1))
    except OSError as exc:
        log.warning("gguf_hash_index_unwritable", path=str(index_path), error=str(exc))
    return sha


def converted_gguf(gguf: Path, cache_dir: Path) -> ConvertedModel:
    """The converted directory for ``gguf``, converting it first when not cached."""
    sha = file_sha256(gguf, cache_dir)
    target = cache_dir / "gguf" / sha
    if (target / _MARKER).exists():
        log.info("gguf_cache_hit", file=str(gguf), path=str(target))
        return ConvertedModel(path=target, sha256=sha, cache_hit=True)
    log.info("gguf_converting", file=str(gguf), path=str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{sha[:12]}-", dir=target.parent))
    try:
        _convert(gguf, tmp)
        (tmp / _MARKER).write_text(json.dumps({"source": str(gguf), "sha256": sha}))
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process converted the same file meanwhile: keep theirs.
            if not (target / _MARKER).exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("gguf_converted", file=str(gguf), path=str(target))
    return ConvertedModel(path=target, sha256=sha, cache_hit=False)


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are dequantized now: drop the GGUF quantizer so save_pretrained writes
    # a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
