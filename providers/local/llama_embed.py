"""Sentence embeddings from a GGUF by llama.cpp (an embedding tier with
``engine = "llama_cpp"``).

The model is a ``.gguf`` embedding model (BERT-family: its pooling from its metadata), or
a BERT sentence-transformers directory converted once to one (``bert_gguf.py``). Texts
are packed into batches of whole sequences, one sequence id each, one ``llama_decode``
per batch; llama.cpp pools per sequence, and the vectors are L2-normalised as the
transformers path does. Blocking, one batch at a time: the provider calls it from its
one worker thread.
"""

from __future__ import annotations

import ctypes
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from providers.local.config import LocalTierConfig
from providers.errors import FatalError
from providers.local.llama_model import LlamaModel, LlamaTokenizer, import_llama_cpp
from providers.local.resolve import ModelSpecError, default_cache_dir, resolve_model

log = structlog.get_logger(__name__)

_SEQS = 64  # sequences in one decode


@dataclass
class LlamaEmbedder:
    model: LlamaModel
    tokenizer: LlamaTokenizer
    ctx: Any
    max_context: int
    dimensions: int
    batch_tokens: int
    name: str
    device: str = "cpu"

    def encode(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """One unit-length vector per text, and the tokens read."""
        import numpy as np

        lib = self.model.lib
        encoded = [self.tokenizer.encode(t, add_special_tokens=True) for t in texts]
        for i, ids in enumerate(encoded):
            if len(ids) > self.max_context:
                raise FatalError(
                    f"input {i} has {len(ids)} tokens; this embedding model takes at most "
                    f"{self.max_context}", tier=self.name, status=400,
                    code="context_length_exceeded", param="input")
        vectors: list[list[float]] = []
        start = 0
        while start < len(encoded):
            group: list[list[int]] = []
            size = 0
            while (start + len(group) < len(encoded) and len(group) < _SEQS
                   and size + len(encoded[start + len(group)]) <= self.batch_tokens):
                size += len(encoded[start + len(group)])
                group.append(encoded[start + len(group)])
            batch = lib.llama_batch_init(size, 0, 1)
            try:
                n = 0
                for seq, ids in enumerate(group):
                    for pos, token in enumerate(ids):
                        batch.token[n] = token
                        batch.pos[n] = pos
                        batch.n_seq_id[n] = 1
                        batch.seq_id[n][0] = seq
                        batch.logits[n] = 1
                        n += 1
                batch.n_tokens = n
                mem = lib.llama_get_memory(self.ctx)
                if mem:
                    lib.llama_memory_clear(mem, True)
                rc = lib.llama_decode(self.ctx, batch)
                if rc != 0:
                    raise RuntimeError(f"llama_decode returned {rc} for an embedding batch")
                for seq in range(len(group)):
                    ptr = lib.llama_get_embeddings_seq(self.ctx, seq)
                    vec = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                                shape=(self.dimensions,)).astype(np.float64)
                    norm = float(np.linalg.norm(vec)) or 1e-12
                    vectors.append((vec / norm).tolist())
            finally:
                lib.llama_batch_free(batch)
            start += len(group)
        return vectors, sum(len(ids) for ids in encoded)

    def close(self) -> None:
        if self.ctx:
            self.model.lib.llama_free(self.ctx)
            self.ctx = None
        self.model.close()


def load_llama_embedder(cfg: LocalTierConfig) -> LlamaEmbedder:
    lib = import_llama_cpp()
    resolved = resolve_model(cfg.model, allow_download=cfg.allow_download)
    path: Path = resolved.path
    trained: int | None = None  # sentence-transformers' max_seq_length, as the other path reads it
    if not resolved.is_gguf:
        from providers.local.bert_gguf import exported_gguf, is_bert_dir

        if not is_bert_dir(path):
            raise ModelSpecError(
                f"engine 'llama_cpp' embeds with a .gguf or a BERT directory; {cfg.model!r} is neither")
        try:
            trained = int(json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"])
        except (OSError, ValueError, KeyError, TypeError):
            trained = None
        path, _ = exported_gguf(path, default_cache_dir(cfg.cache_dir))
    model = LlamaModel(path, cfg)
    try:
        limit = min(model.n_ctx_train or 512, trained or 1 << 30)
        if cfg.max_context:
            limit = min(limit, cfg.max_context)
        tokens = max(limit, cfg.batch_tokens)
        params = lib.llama_context_default_params()
        params.n_ctx = tokens
        params.n_batch = tokens
        params.n_ubatch = tokens  # non-causal attention: a sequence stays in one ubatch
        params.n_seq_max = _SEQS
        params.n_threads = model.threads
        params.n_threads_batch = model.threads
        params.embeddings = True
        params.no_perf = True
        ctx = lib.llama_init_from_model(model.ptr, params)
        if not ctx:
            raise ModelSpecError(f"llama.cpp could not create an embedding context for {str(path)!r}")
        if int(lib.llama_pooling_type(ctx)) <= 0:  # none or unspecified: not a sentence embedder
            lib.llama_free(ctx)
            raise ModelSpecError(f"{str(path)!r} has no pooling: not a sentence-embedding model")
        dims = int(lib.llama_model_n_embd_out(model.ptr)) or model.n_embd
    except BaseException:
        model.close()
        raise
    log.info("local_embedding_model_loaded", tier=cfg.name, path=str(path), engine="llama_cpp",
             dimensions=dims)
    return LlamaEmbedder(model=model, tokenizer=LlamaTokenizer(model, None), ctx=ctx,
                         max_context=limit, dimensions=dims, batch_tokens=tokens, name=cfg.name)
