"""The local embedding tier: a sentence-embedding encoder, mean pooled and normalised.

Same lifecycle as the chat tier (``start`` loads on a thread; ``ready``, ``load_error``;
``CapacityError`` before ready). Encoding runs on one worker thread, in batches.

``EmbeddingResult.vectors`` are floats; ``encoding_format = "base64"`` is the wire's
business (``gateway.wire.vector_to_base64``). ``dimensions`` is accepted only when it equals the model's own
size (this model was not trained to be truncated); anything else is a clear 400.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog

from providers.base import Capabilities
from providers.errors import CapacityError, FatalError
from providers.local.config import LocalTierConfig
from providers.local.lifecycle import BackgroundLoad
from providers.schemas import (
    ChatChunk,
    ChatRequest,
    ChatResult,
    EmbeddingRequest,
    EmbeddingResult,
    Health,
    Usage,
)

log = structlog.get_logger(__name__)

_BATCH = 32


class LocalEmbeddingProvider(BackgroundLoad):
    """An embeddings tier served by an in-process encoder."""

    kind = "local"

    def __init__(self, cfg: LocalTierConfig) -> None:
        super().__init__(cfg)
        self.capabilities = Capabilities(
            chat=False, stream=False, embeddings=True, tools=False, resume=False, retry_timeouts=False
        )
        self.model_name = cfg.model
        self.dimensions = 0
        self._loaded: Any = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tiergate-emb-{cfg.name}")

    def _load_blocking(self) -> Any:
        from providers.local.engines import chosen_engine

        if chosen_engine(self.cfg) == "llama_cpp":
            from providers.local.llama_embed import load_llama_embedder

            return load_llama_embedder(self.cfg)
        from providers.local.loader import load_embedding_model

        return load_embedding_model(self.cfg)

    def _loaded_ok(self, loaded: Any) -> None:
        dims = getattr(loaded, "dimensions", None)  # llama.cpp's embedder says it
        self.dimensions = int(dims or loaded.model.config.hidden_size)
        self._loaded = loaded

    @property
    def ready(self) -> bool:
        return self._loaded is not None

    async def probe(self) -> Health:
        if self._loaded is None:
            return Health(ok=False, detail=self.load_error or "loading")
        return Health(ok=True, detail=f"{self.dimensions} dimensions")

    async def aclose(self) -> None:
        await self._finish_loading()
        loaded, self._loaded = self._loaded, None
        # An encode in flight ends before its model goes (off the loop: it may take a while).
        await asyncio.to_thread(self._executor.shutdown, True)
        close = getattr(loaded, "close", None)
        if close is not None:
            await asyncio.to_thread(close)

    async def chat(self, req: ChatRequest) -> ChatResult:
        raise FatalError(f"tier {self.name} serves embeddings, not chat", tier=self.name,
                         status=400, code="unsupported_task", param="model")

    async def stream(self, req: ChatRequest):  # type: ignore[no-untyped-def]
        raise FatalError(f"tier {self.name} serves embeddings, not chat", tier=self.name,
                         status=400, code="unsupported_task", param="model")
        yield ChatChunk()  # an async generator, like every provider's stream

    async def embed(self, req: EmbeddingRequest) -> EmbeddingResult:
        loaded = self._loaded
        if loaded is None:
            raise CapacityError(
                f"tier {self.name} is not ready: {self.load_error or 'the model is still loading'}",
                tier=self.name, status=503,
            )
        if req.dimensions is not None and req.dimensions != self.dimensions:
            raise FatalError(
                f"tier {self.name} cannot honour 'dimensions' = {req.dimensions}: this model "
                f"gives {self.dimensions}-dimensional vectors only",
                tier=self.name, status=400, code="unsupported_parameter", param="dimensions",
            )
        if req.encoding_format not in ("float", "base64"):
            raise FatalError(
                f"encoding_format must be 'float' or 'base64', not {req.encoding_format!r}",
                tier=self.name, status=400, code="unsupported_parameter", param="encoding_format",
            )
        if not req.inputs:
            raise FatalError("input must not be empty", tier=self.name, status=400,
                             code="invalid_input", param="input")
        loop = asyncio.get_running_loop()
        vectors, tokens = await loop.run_in_executor(self._executor, self._encode, list(req.inputs))
        return EmbeddingResult(vectors=vectors, usage=Usage(prompt_tokens=tokens),
                               model=self.model_name)

    def _encode(self, texts: list[str]) -> tuple[list[list[float]], int]:
        loaded = self._loaded
        if hasattr(loaded, "encode"):  # llama.cpp (llama_embed.py)
            return loaded.encode(texts)
        import torch

        tokenizer, model = loaded.tokenizer, loaded.model
        limit = loaded.max_context
        encoded = tokenizer(texts, add_special_tokens=True)["input_ids"]
        for i, ids in enumerate(encoded):
            if len(ids) > limit:
                raise FatalError(
                    f"input {i} has {len(ids)} tokens; this embedding model takes at most {limit}",
                    tier=self.name, status=400, code="context_length_exceeded", param="input",
                )
        total = sum(len(ids) for ids in encoded)
        vectors: list[list[float]] = []
        with torch.inference_mode():
            for start in range(0, len(texts), _BATCH):
                batch = tokenizer(
                    texts[start : start + _BATCH], padding=True, return_tensors="pt"
                ).to(loaded.device)
                hidden = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled.float(), p=2, dim=1)
                vectors.extend(pooled.cpu().tolist())
        return vectors, total
