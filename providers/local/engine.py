"""The generation engine: one thread, continuous batching, tokens handed to asyncio.

``Engine`` is the small interface the chat provider talks to; a faster engine only has
to honour it. ``BatchedEngine`` is the default (``engine = "continuous"``):

- a slot KV cache (``SlotCache``): per layer one ``[slots, kv_heads, capacity, head_dim]``
  tensor; every sequence has its own length, so a sequence joins or leaves between any
  two decode steps. Active sequences occupy slots ``0..n-1``; when one leaves, the last
  one moves into its slot, so a decode step always works on a contiguous slice;
- each step first admits waiting sequences (their prompts prefilled together, padded,
  with a per-row causal mask), then decodes one token for every active sequence with a
  single forward over the whole batch (per-row positions, a padding mask per row);
- the model is the transformers model itself, driven through its public forward with a
  4D mask, explicit positions and the slot cache, so any architecture with standard
  attention works; Llama-architecture models take ``LlamaFastPath`` instead (the same
  weights, products shaped for a few rows; ``fastpath.py``);
- sampling is per sequence (``sampling.py``); tokens go to the asyncio side with one
  ``loop.call_soon_threadsafe`` per step;
- cancellation removes a sequence between steps and frees its slot; out-of-memory in a
  prefill fails that sequence with ``CapacityError``, not the engine;
- a step that raises fails the sequences it carried (each gets a ``CapacityError`` naming
  the cause) and the loop goes on with the rest; if the loop itself dies, the
  ``EngineSupervisor`` (``supervisor.py``) fails what was open, refuses new work while it
  waits a backoff, and restarts the loop on the same weights with a fresh cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from providers.errors import CapacityError, RetryableError
from providers.local.sampling import SamplingParams, SequenceSampler, sample_batch
from providers.local.supervisor import EngineSupervisor

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class EngineEvent:
    """New tokens for one sequence; ``finish_reason`` ("stop" at an end-of-sequence
    token, "length" at the token cap or the context end) or ``error`` closes it."""

    token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None
    error: BaseException | None = None


Sink = Callable[[EngineEvent], None]


class Engine(Protocol):
    """What the chat provider needs from a generation engine."""

    def start(self) -> None:
        """Start the engine thread."""

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        sink: Sink,
        loop: asyncio.AbstractEventLoop,
    ) -> int:
        """Queue a sequence; ``sink`` is called on ``loop``. Raises ``CapacityError``
        when the batch and the queue are full."""

    def cancel(self, seq_id: int) -> None:
        """Drop a sequence (queued or running) and free its slot. Thread-safe."""

    @property
    def active(self) -> int:
        """Sequences being decoded now."""

    @property
    def waiting(self) -> int:
        """Sequences queued for a slot."""

    @property
    def down_reason(self) -> str | None:
        """Why the engine takes no work now (its thread died and awaits a restart, or it
        is stopped); None while it serves."""

    def close(self) -> None:
        """Stop the thread; sequences still open get a ``RetryableError``."""


class _Sequence:
    __slots__ = ("id", "prompt", "params", "sink", "loop", "sampler", "length", "generated",
                 "last_token", "slot")

    def __init__(self, seq_id: int, prompt: list[int], params: SamplingParams, sink: Sink,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.id = seq_id
        self.prompt = prompt
        self.params = params
        self.sink = sink
        self.loop = loop
        self.sampler: SequenceSampler | None = None
        self.length = 0  # tokens in the cache
        self.generated = 0
        self.last_token = 0
        self.slot = -1


class BatchedEngine:
    """Continuous batching over a ``SlotCache`` on a dedicated thread."""

    def __init__(
        self,
        model: Any,
        *,
        eos_token_ids: frozenset[int],
        max_context: int,
        max_batch: int = 16,
        max_queue: int = 64,
        name: str = "local",
        prefill_token_budget: int = 4096,
        fast_path: bool = True,
        restart_backoff_s: float = 0.5,
    ) -> None:
        import torch

        from providers.local.fastpath import LlamaFastPath
        from providers.local.slot_cache import SlotCache

        self._torch = torch
        self._model = model
        self._device = next(model.parameters()).device
        self._vocab = int(model.get_output_embeddings().weight.shape[0])
        self._eos = eos_token_ids
        self._max_context = max_context
        self._max_batch = max_batch
        self._max_queue = max_queue
        self._name = name
        self._prefill_budget = prefill_token_budget
        # The fast forward for Llama-architecture models; the generic one otherwise.
        self._fast = LlamaFastPath(model) if fast_path and LlamaFastPath.supports(model) else None
        # The generic forward takes the cache as ``cache`` from transformers 5.x on
        # (``past_key_values`` before, deprecated since).
        forward = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in forward else "past_key_values"
        self._new_cache = lambda: SlotCache(max_batch, max_context, self._device)
        self._cache = self._new_cache()
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._queue: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._cancelled: set[int] = set()
        self._closed = False
        self.supervisor = EngineSupervisor(
            name, self._run, self._after_death, backoff_initial_s=restart_backoff_s
        )
        # Tests only: called with "admit", "prefill" or "decode" before each; what it
        # raises is what a fault in that part of the loop would raise.
        self.fault_hook: Callable[[str], None] | None = None
        self.steps = 0  # decode steps run, and their time: for benchmarks
        self.decode_s = 0.0
        self.step_failures = 0

    # --- the interface --------------------------------------------------------------

    def start(self) -> None:
        self.supervisor.start()

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Sink,
               loop: asyncio.AbstractEventLoop) -> int:
        with self._cond:
            down = self.down_reason
            if down is not None:
                raise RetryableError(f"tier {self._name}: {down}", tier=self._name, status=503)
            free_slots = self._max_batch - len(self._running)
            if len(self._queue) >= free_slots + self._max_queue:
                raise CapacityError(
                    f"tier {self._name}: {len(self._running)} sequences running and "
                    f"{len(self._queue)} queued (max_queue {self._max_queue})",
                    tier=self._name,
                    status=503,
                )
            seq = _Sequence(next(self._ids), list(prompt_ids), params, sink, loop)
            self._queue.append(seq)
            self._cond.notify()
            return seq.id

    def cancel(self, seq_id: int) -> None:
        with self._cond:
            for seq in self._queue:
                if seq.id == seq_id:
                    self._queue.remove(seq)
                    return
            # Running, being admitted, or already done: the thread sorts it out between
            # steps (an id that matches nothing is dropped there).
            self._cancelled.add(seq_id)
            self._cond.notify()

    @property
    def active(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def down_reason(self) -> str | None:
        if self._closed:
            return "the local engine is stopped"
        return self.supervisor.down_reason

    @property
    def restarts(self) -> int:
        return self.supervisor.restarts

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self.supervisor.stop(timeout=30)

    # --- the thread -----------------------------------------------------------------

    def _attention_kernels(self) -> Any:
        """On CUDA, attention without the cuDNN kernel. Every decode step attends over a
        key width one longer than the last, and cuDNN's attention builds a plan per
        shape: on an H100 it held the host 1.8 ms a layer, 55 of a 75 ms step (torch's
        profiler, 16 streams). The memory-efficient kernel takes the same boolean mask
        with no per-shape setup. Elsewhere: nothing changes."""
        if self._device.type != "cuda":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

    def _run(self) -> None:
        """The loop, on the worker thread; returns once closed. What it raises ends the
        thread: the supervisor restarts it (``_after_death``)."""
        torch = self._torch
        with torch.inference_mode(), self._attention_kernels():
            while True:
                with self._cond:
                    while not self._closed and not self._queue and not self._running:
                        self._cond.wait()
                    if self._closed:
                        break
                    cancelled, self._cancelled = self._cancelled, set()
                    self._fault("admit")
                    admitted = self._take_admissions()
                out: dict[asyncio.AbstractEventLoop, list[tuple[Sink, EngineEvent]]] = {}
                if cancelled:
                    self._remove([s for s in self._running if s.id in cancelled])
                if admitted:
                    self._step("prefill", self._prefill, admitted, out)
                    self._deliver(out)  # first tokens out before the next step
                    out = {}
                if self._running:
                    self._step("decode", self._decode, list(self._running), out)
                self._deliver(out)
        self._fail_all(RetryableError("the local engine stopped", tier=self._name))

    def _fault(self, stage: str) -> None:
        if self.fault_hook is not None:
            self.fault_hook(stage)

    def _step(self, stage: str, step: Callable[..., None], carried: list[_Sequence],
              out: dict) -> None:
        """Run one prefill or decode step; if it raises, fail the sequences it carried
        (each told why) and leave the others to go on."""
        try:
            self._fault(stage)
            if stage == "prefill":
                step(carried, out)
            else:
                step(out)
        except Exception as exc:  # one bad step must not take the tier down
            self.step_failures += 1
            log.exception("local_engine_step_failed", tier=self._name, stage=stage,
                          sequences=len(carried))
            self._remove([seq for seq in carried if seq.slot >= 0])
            error = CapacityError(
                f"tier {self._name}: the local engine failed on this request "
                f"({type(exc).__name__}: {exc})", tier=self._name, status=503)
            for seq in carried:
                self._emit(out, seq, EngineEvent(error=error))

    def _after_death(self, reason: str) -> None:
        """On the supervisor thread, once the loop died: fail every open sequence and
        start the next loop from an empty cache (the dead one may have left it
        half-written)."""
        self._fail_all(CapacityError(f"tier {self._name}: {reason}", tier=self._name, status=503))
        with self._cond:
            self._cancelled.clear()
        self._cache = self._new_cache()

    def _take_admissions(self) -> list[_Sequence]:
        """Waiting sequences that fit in free slots and the prefill token budget."""
        admitted: list[_Sequence] = []
        free = self._max_batch - len(self._running)
        widest = 0
        while self._queue and len(admitted) < free:
            nxt = self._queue[0]
            width = max(widest, len(nxt.prompt))
            if admitted and width * (len(admitted) + 1) > self._prefill_budget:
                break
            widest = width
            admitted.append(self._queue.popleft())
        return admitted

    def _prefill(self, seqs: list[_Sequence], out: dict) -> None:
        torch = self._torch
        try:
            self._prefill_group(seqs, out)
        except torch.OutOfMemoryError:
            # A group too big for memory: one by one, failing only what does not fit.
            self._free_memory()
            for seq in seqs:
                if seq.slot >= 0:
                    self._remove([seq])
                    seq.slot = -1
                try:
                    self._prefill_group([seq], out)
                except torch.OutOfMemoryError:
                    self._free_memory()
                    if seq.slot >= 0:
                        self._remove([seq])
                    log.warning("local_request_out_of_memory", tier=self._name, seq=seq.id)
                    self._emit(out, seq, EngineEvent(error=CapacityError(
                        f"tier {self._name}: out of memory for this request",
                        tier=self._name, status=503)))

    def _prefill_group(self, seqs: list[_Sequence], out: dict) -> None:
        torch = self._torch
        first = len(self._running)
        width = max(len(s.prompt) for s in seqs)
        self._cache.ensure(width + 1, first + len(seqs))
        for i, seq in enumerate(seqs):
            seq.slot = first + i
            seq.length = len(seq.prompt)
            self._running.append(seq)
        lengths = torch.tensor([s.length for s in seqs], device=self._device)
        ids = torch.zeros((len(seqs), width), dtype=torch.long, device=self._device)
        for i, seq in enumerate(seqs):
            ids[i, : seq.length] = torch.tensor(seq.prompt, dtype=torch.long)
        pos = torch.arange(width, device=self._device)
        causal = pos[None, :] <= pos[:, None]  # [q, k]
        mask = causal[None, None] & (pos[None, None, None, :] < lengths[:, None, None, None])
        self._cache.for_prefill(first, len(seqs), width)
        keep = lengths - 1
        positions = pos[None, :].expand(len(seqs), width)
        if self._fast is not None:
            logits = self._fast.forward(ids, positions, mask, self._cache, keep)
        else:
            output = self._model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=keep,
                **{self._cache_kwarg: self._cache},
            )
            rows = torch.arange(len(seqs), device=self._device)
            logits = output.logits[rows, rows]  # each row's own last prompt position
        for seq in seqs:
            seq.sampler = SequenceSampler(seq.params, self._vocab, self._device)
        self._advance(seqs, sample_batch(logits, [s.sampler for s in seqs]), out)

    def _decode(self, out: dict) -> None:
        torch = self._torch
        running = self._running
        n = len(running)
        lengths = torch.tensor([s.length for s in running], device=self._device)
        width = int(max(s.length for s in running)) + 1
        self._cache.ensure(width, n)
        ids = torch.tensor([[s.last_token] for s in running], device=self._device)
        keys = torch.arange(width, device=self._device)
        mask = (keys[None, :] <= lengths[:, None])[:, None, None, :]
        self._cache.for_decode(n, lengths, width)
        started = time.perf_counter()
        try:
            if self._fast is not None:
                logits = self._fast.forward(ids, lengths[:, None], mask, self._cache,
                                             torch.zeros_like(lengths))
            else:
                logits = self._model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=lengths[:, None],
                    use_cache=True,
                    **{self._cache_kwarg: self._cache},
                ).logits[:, -1]
        except torch.OutOfMemoryError:
            self._free_memory()
            victim = running[-1]
            log.warning("local_request_out_of_memory", tier=self._name, seq=victim.id)
            self._remove([victim])
            self._emit(out, victim, EngineEvent(error=CapacityError(
                f"tier {self._name}: out of memory for this request", tier=self._name,
                status=503)))
            return
        self.steps += 1
        self.decode_s += time.perf_counter() - started
        for seq in running:
            seq.length += 1
        picks = sample_batch(logits, [s.sampler for s in running])
        self._advance(list(running), picks, out)

    def _advance(self, seqs: list[_Sequence], picks: list[int], out: dict) -> None:
        done: list[_Sequence] = []
        for seq, token in zip(seqs, picks):
            seq.generated += 1
            seq.last_token = token
            finish = None
            if token in self._eos:
                finish = "stop"
            elif seq.generated >= seq.params.max_new_tokens or seq.length + 1 >= self._max_context:
                finish = "length"
            self._emit(out, seq, EngineEvent(token_ids=(token,), finish_reason=finish))
            if finish:
                done.append(seq)
        if done:
            self._remove(done)

    def _remove(self, seqs: list[_Sequence]) -> None:
        """Free the slots of ``seqs``, moving the last sequences into the holes."""
        for seq in sorted(seqs, key=lambda s: s.slot, reverse=True):
            if seq.slot < 0 or seq not in self._running:
                continue
            last = self._running[-1]
            if last is not seq:
                self._cache.move(last.slot, seq.slot, last.length)
                self._running[seq.slot] = last
                last.slot = seq.slot
            self._running.pop()
            seq.slot = -1

    @staticmethod
    def _emit(out: dict, seq: _Sequence, event: EngineEvent) -> None:
        out.setdefault(seq.loop, []).append((seq.sink, event))

    @staticmethod
    def _deliver(out: dict) -> None:
        for loop, items in out.items():
            try:
                loop.call_soon_threadsafe(_dispatch, items)
            except RuntimeError:
                # The loop closed under a request: nobody is waiting for these tokens.
                log.debug("local_engine_loop_closed")

    def _free_memory(self) -> None:
        torch = self._torch
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            seqs = list(self._queue) + list(self._running)
            self._queue.clear()
            self._running.clear()
        out: dict = {}
        for seq in seqs:
            self._emit(out, seq, EngineEvent(error=error))
        self._deliver(out)


def _dispatch(items: list[tuple[Sink, EngineEvent]]) -> None:
    for sink, event in items:
        sink(event)
