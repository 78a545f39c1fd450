"""Per-sequence sampling over a batch of logits: greedy, temperature, top-k, top-p,
presence and frequency penalties, and a seeded generator per sequence.

Runs on the engine thread. Greedy rows share one batched ``argmax``; sampled rows are
handled one by one (a batch holds a few dozen rows at most).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one sequence picks its next token. ``temperature == 0`` means greedy."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


class SequenceSampler:
    """One sequence's sampling state: its generator and, if penalised, token counts."""

    __slots__ = ("params", "generator", "counts")

    def __init__(self, params: SamplingParams, vocab_size: int, device: Any) -> None:
        import torch

        self.params = params
        self.generator: Any = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)
        self.counts: Any = None
        if params.penalised:
            self.counts = torch.zeros(vocab_size, device=device, dtype=torch.float32)

    def observe(self, token: int) -> None:
        if self.counts is not None and token < self.counts.shape[0]:
            self.counts[token] += 1


def sample_batch(logits: Any, samplers: list[SequenceSampler]) -> list[int]:
    """Pick one token per row of ``logits`` ([n, vocab]) with each row's sampler."""
    import torch

    logits = logits.float()
    penalised = [i for i, s in enumerate(samplers) if s.counts is not None]
    if penalised:
        logits = logits.clone()
        for i in penalised:
            s = samplers[i]
            counts = s.counts[: logits.shape[1]]
            logits[i] -= s.params.presence_penalty * (counts > 0).float()
            logits[i] -= s.params.frequency_penalty * counts
    picks = logits.argmax(dim=-1).tolist()
    for i, s in enumerate(samplers):
        if not s.params.greedy:
            picks[i] = _sample_row(logits[i], s, torch)
    for token, s in zip(picks, samplers):
        s.observe(token)
    return picks


def _sample_row(row: Any, s: SequenceSampler, torch: Any) -> int:
    p = s.params
    row = row / p.temperature
    if p.top_k and p.top_k < row.shape[0]:
        values, indices = torch.topk(row, p.top_k)
    else:
        values, indices = torch.sort(row, descending=True)
    probs = torch.softmax(values, dim=-1)
    if p.top_p < 1.0:
        cumulative = torch.cumsum(probs, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (at least one token).
        keep = (cumulative - probs) < p.top_p
        keep[0] = True
        probs = probs * keep
        probs = probs / probs.sum()
    choice = torch.multinomial(probs, 1, generator=s.generator)
    return int(indices[choice].item())
