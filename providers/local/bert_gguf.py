"""A BERT sentence-embedding directory (sentence-transformers layout: safetensors,
``vocab.txt``, ``1_Pooling``) written once as a GGUF that llama.cpp serves.

The embedding tier on ``engine = "llama_cpp"`` takes a ``.gguf`` as it is; a BERT
directory (the shipped all-MiniLM-L6-v2) is converted here into
``<cache>/gguf-export/<sha256 of model.safetensors>.gguf`` the first time, float32 as the
weights are, the way llama.cpp's ``convert_hf_to_gguf.py`` writes BERT (tensor names,
WordPiece vocabulary in its "phantom space" form, mean or CLS pooling). No torch: the
weights are read with ``safetensors.numpy`` and written with the ``gguf`` package.

Blocking; the provider runs it on its loading thread.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import structlog

from providers.local.gguf_cache import file_sha256
from providers.local.resolve import ModelSpecError

log = structlog.get_logger(__name__)

_EMBEDDINGS = {
    "embeddings.word_embeddings": "token_embd",
    "embeddings.position_embeddings": "position_embd",
    "embeddings.token_type_embeddings": "token_types",
    "embeddings.LayerNorm": "token_embd_norm",
}
_LAYER = {
    "attention.self.query": "attn_q",
    "attention.self.key": "attn_k",
    "attention.self.value": "attn_v",
    "attention.output.dense": "attn_output",
    "attention.output.LayerNorm": "attn_output_norm",
    "intermediate.dense": "ffn_up",
    "output.dense": "ffn_down",
    "output.LayerNorm": "layer_output_norm",
}


def is_bert_dir(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return config.get("model_type") == "bert" and (path / "vocab.txt").exists()


def exported_gguf(model_dir: Path, cache_dir: Path) -> tuple[Path, bool]:
    """The GGUF for ``model_dir`` (written first when not cached) and whether it was."""
    weights = model_dir / "model.safetensors"
    if not weights.exists():
        raise ModelSpecError(f"{str(model_dir)!r} has no model.safetensors to convert")
    target = cache_dir / "gguf-export" / f"{file_sha256(weights, cache_dir)}.gguf"
    if target.exists():
        return target, True
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".bert-", suffix=".gguf", dir=target.parent)
    os.close(fd)
    try:
        _write(model_dir, Path(tmp))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("gguf_exported", model=str(model_dir), path=str(target))
    return target, False


def _tensor_name(name: str) -> str | None:
    name = name.removeprefix("bert.")
    stem, _, kind = name.rpartition(".")
    if kind in ("gamma", "beta"):
        kind = "weight" if kind == "gamma" else "bias"
    if stem in _EMBEDDINGS:
        return f"{_EMBEDDINGS[stem]}.{kind}"
    parts = stem.split(".")
    if len(parts) > 3 and parts[0] == "encoder" and parts[1] == "layer":
        mapped = _LAYER.get(".".join(parts[3:]))
        if mapped:
            return f"blk.{parts[2]}.{mapped}.{kind}"
    return None  # position_ids, the pooler, heads: not used for embeddings


def _pooling(model_dir: Path) -> Any:
    import gguf

    try:
        config = json.loads((model_dir / "1_Pooling" / "config.json").read_text())
    except (OSError, ValueError):
        return gguf.PoolingType.MEAN
    if config.get("pooling_mode_cls_token"):
        return gguf.PoolingType.CLS
    if config.get("pooling_mode_mean_tokens", True):
        return gguf.PoolingType.MEAN
    raise ModelSpecError(f"{str(model_dir)!r}: only mean or CLS pooling converts to GGUF")


def _write(model_dir: Path, out: Path) -> None:
    import gguf
    from safetensors.numpy import load_file

    config: dict[str, Any] = json.loads((model_dir / "config.json").read_text())
    tokens = (model_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
    special: set[str] = set()
    try:
        tok_json = json.loads((model_dir / "tokenizer.json").read_text())
        special = {t["content"] for t in tok_json.get("added_tokens", []) if t.get("special")}
    except (OSError, ValueError):
        special = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}
    types = [int(gguf.TokenType.CONTROL) if t in special else int(gguf.TokenType.NORMAL) for t in tokens]
    # llama.cpp's WordPiece vocabulary: word starts carry U+2581, "##" pieces lose it.
    phantom = [t if t in special else (t[2:] if t.startswith("##") else "\u2581" + t) for t in tokens]
    ids = {t: i for i, t in enumerate(tokens)}

    writer = gguf.GGUFWriter(str(out), "bert")
    writer.add_name(model_dir.parent.name if model_dir.name == "model" else model_dir.name)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_layer_norm_eps(float(config.get("layer_norm_eps", 1e-12)))
    writer.add_causal_attention(False)
    writer.add_pooling_type(_pooling(model_dir))
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(phantom)
    writer.add_token_types(types)
    writer.add_token_type_count(int(config.get("type_vocab_size", 1)))
    for token, add in (("[CLS]", writer.add_bos_token_id), ("[SEP]", writer.add_sep_token_id),
                       ("[UNK]", writer.add_unk_token_id), ("[PAD]", writer.add_pad_token_id),
                       ("[MASK]", writer.add_mask_token_id)):
        if token in ids:
            add(ids[token])
    weights = load_file(str(model_dir / "model.safetensors"))
    written = 0
    for name, array in weights.items():
        mapped = _tensor_name(name)
        if mapped is None:
            continue
        writer.add_tensor(mapped, array.astype("float32"))
        written += 1
    if written == 0:
        raise ModelSpecError(f"{str(model_dir)!r}: no BERT tensors found")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
