"""The Hugging Face tier: the Inference Providers router or a dedicated endpoint.

Both speak the OpenAI chat-completions API, so this is ``OpenAICompatProvider`` with
Hugging Face's differences:

- ``base_url`` defaults to the router, ``https://router.huggingface.co/v1`` (model ids
  like ``meta-llama/Llama-3.1-8B-Instruct``, optionally with a ``:provider`` suffix). A
  dedicated Inference Endpoint / TGI serves the Messages API under ``/v1``, so a
  ``base_url`` that does not end in ``/v1`` gets it appended.
- The token is ``HF_TOKEN`` unless the tier names another; the tier does not serve
  without one.
- A model still loading answers 503 ``{"error": "... is currently loading",
  "estimated_time": 20.0}``: that is a ``RetryableError`` with ``retry_after`` set to
  the estimate. Plain ``{"error": "text"}`` bodies become OpenAI-shaped errors.
- Embeddings: on the router, the hf-inference feature-extraction pipeline
  (``POST /hf-inference/models/{model}/pipeline/feature-extraction`` with
  ``{"inputs": [...]}``, answering a list of vectors; it reports no token usage). On a
  dedicated endpoint (TEI), the OpenAI-style ``/v1/embeddings``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal
from urllib.parse import quote

from providers.config import RemoteTierConfig
from providers.errors import ProviderError, RetryableError
from providers.http import mask
from providers.openai_compat import OpenAICompatProvider
from providers.schemas import EmbeddingRequest, EmbeddingResult, Usage

HF_ROUTER_URL = "https://router.huggingface.co/v1"


class HuggingFaceTierConfig(RemoteTierConfig):
    """``kind = "huggingface"``: the router unless ``base_url`` names an endpoint."""

    kind: Literal["huggingface"] = "huggingface"
    default_key_env: ClassVar[str | None] = "HF_TOKEN"
    key_required: ClassVar[bool] = True

    @property
    def location(self) -> str:
        return self.base_url or HF_ROUTER_URL


def _with_v1(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


def pooled(vector: Any) -> list[float]:
    """A sentence vector: as given, or the mean over tokens when the model returns one
    vector per token (a feature-extraction model without a pooling layer)."""
    if vector and isinstance(vector[0], Sequence):
        width = len(vector[0])
        return [sum(token[i] for token in vector) / len(vector) for i in range(width)]
    return list(vector)


class HuggingFaceProvider(OpenAICompatProvider):
    """``kind = "huggingface"``. ``router_url`` is for tests that stand in for the router."""

    kind = "huggingface"

    def __init__(self, cfg: RemoteTierConfig, api_key: str | None, *, router_url: str = HF_ROUTER_URL) -> None:
        self._router_url = _with_v1(router_url)
        super().__init__(cfg, api_key)

    def _api_root(self, cfg: RemoteTierConfig) -> str:
        return _with_v1(cfg.base_url or self._router_url)

    @property
    def on_router(self) -> bool:
        return self.api_root == self._router_url

    def feature_extraction_url(self, model: str) -> str:
        """The router's hf-inference route; a ``:provider`` suffix is not part of the id."""
        model_id = model.split(":", 1)[0]
        origin = self._router_url.removesuffix("/v1")
        return f"{origin}/hf-inference/models/{quote(model_id, safe='/')}/pipeline/feature-extraction"

    def upstream_error(self, status: int, headers: Mapping[str, str], payload: Any) -> ProviderError:
        if status == 503 and isinstance(payload, dict) and "estimated_time" in payload:
            try:
                estimate = float(payload["estimated_time"])
            except (TypeError, ValueError):
                estimate = None
            text = payload.get("error") if isinstance(payload.get("error"), str) else "model loading"
            return RetryableError(
                f"upstream model loading: {mask(text, self._api_key)}",
                tier=self.name,
                status=status,
                retry_after=estimate,
            )
        return super().upstream_error(status, headers, payload)

    async def embed(self, req: EmbeddingRequest) -> EmbeddingResult:
        if not self.on_router:
            return await super().embed(req)
        model = self.upstream_model(req.model)
        payload = await self.post_json(self.feature_extraction_url(model), {"inputs": list(req.inputs)})
        if not isinstance(payload, list) or len(payload) != len(req.inputs):
            raise RetryableError("upstream answered with malformed embeddings", tier=self.name)
        return EmbeddingResult(vectors=[pooled(v) for v in payload], usage=Usage(), model=model)
