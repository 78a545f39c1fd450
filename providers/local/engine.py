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
  prefill fails that sequence with ``CapacityError``, not the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
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


class SlotCache:
    """A KV cache with one row per slot and a length per row (see module docstring).

    Quacks like a transformers ``Cache`` for the one call attention layers make:
    ``update(key, value, layer_idx) -> (keys, values)`` for the rows in this forward.
    """

    is_compileable = False

    def __init__(self, slots: int, max_capacity: int, device: Any) -> None:
        self.slots = slots
        self.max_capacity = max_capacity
        self.capacity = min(256, max_capacity)
        # Rows and length both grow on demand: a tier with 256 slots that serves four
        # streams holds memory for four.
        self.rows = min(slots, 4)
        self.device = device
        self.keys: list[Any] = []
        self.values: list[Any] = []
        self._rows = slice(0, 0)
        self._write: Any = None  # decode: (row indices, positions); prefill: width
        self._width = 0

    def ensure(self, needed: int, rows: int = 0) -> None:
        """Room for ``needed`` positions in ``rows`` slots (grows by doubling)."""
        new_capacity, new_rows = self.capacity, self.rows
        while new_capacity < needed:
            new_capacity *= 2
        while new_rows < rows:
            new_rows *= 2
        new_capacity = min(new_capacity, self.max_capacity)
        new_rows = min(new_rows, self.slots)
        if (new_capacity, new_rows) == (self.capacity, self.rows):
            return
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = old.new_zeros(new_rows, old.shape[1], new_capacity, old.shape[3])
                new[: self.rows, :, : self.capacity] = old
                store[i] = new
        self.capacity, self.rows = new_capacity, new_rows

    def for_prefill(self, first_slot: int, rows: int, width: int) -> None:
        self._rows = slice(first_slot, first_slot + rows)
        self._write = None
        self._width = width

    def for_decode(self, rows: int, positions: Any, width: int) -> None:
        import torch

        self._rows = slice(0, rows)
        self._write = (torch.arange(rows, device=positions.device), positions)
        self._width = width

    def move(self, src: int, dst: int, length: int) -> None:
        for store in (self.keys, self.values):
            for tensor in store:
                tensor[dst, :, :length] = tensor[src, :, :length]

    def update(self, key: Any, value: Any, layer_idx: int, cache_kwargs: Any = None,
               **kwargs: Any) -> tuple[Any, Any]:  # transformers 5.24 passes kwargs=...
        if layer_idx == len(self.keys):
            shape = (self.rows, key.shape[1], self.capacity, key.shape[3])
            self.keys.append(key.new_zeros(shape))
            self.values.append(value.new_zeros(shape))
        k_store, v_store = self.keys[layer_idx], self.values[layer_idx]
        rows = self._rows
        if self._write is None:
            k_store[rows, :, : key.shape[2]] = key
            v_store[rows, :, : value.shape[2]] = value
        else:
            row_idx, positions = self._write
            k_store[row_idx, :, positions] = key[:, :, 0]
            v_store[row_idx, :, positions] = value[:, :, 0]
        return k_store[rows, :, : self._width], v_store[rows, :, : self._width]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


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
    ) -> None:
        import torch

        from providers.local.fastpath import LlamaFastPath

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
        self._cache = SlotCache(max_batch, max_context, self._device)
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._queue: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._cancelled: set[int] = set()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run, and their time: for benchmarks
        self.decode_s = 0.0

    # --- the interface --------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"tiergate-engine-{self._name}", daemon=True
            )
            self._thread.start()

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Sink,
               loop: asyncio.AbstractEventLoop) -> int:
        with self._cond:
            if self._closed:
                raise RetryableError("the local engine is stopped", tier=self._name)
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

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

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
        torch = self._torch
        try:
            with torch.inference_mode(), self._attention_kernels():
                while True:
                    with self._cond:
                        while not self._closed and not self._queue and not self._running:
                            self._cond.wait()
                        if self._closed:
                            break
                        cancelled, self._cancelled = self._cancelled, set()
                        admitted = self._take_admissions()
                    out: dict[asyncio.AbstractEventLoop, list[tuple[Sink, EngineEvent]]] = {}
                    if cancelled:
                        self._remove([s for s in self._running if s.id in cancelled])
                    if admitted:
                        self._prefill(admitted, out)
                        self._deliver(out)  # first tokens out before the next step
                        out = {}
                    if self._running:
                        self._decode(out)
                    self._deliver(out)
        except Exception as exc:  # the engine must never die silently
            log.exception("local_engine_crashed", tier=self._name)
            self._fail_all(RetryableError(f"local engine failed: {exc}", tier=self._name))
            return
        self._fail_all(RetryableError("the local engine stopped", tier=self._name))

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
                past_key_values=self._cache,
                use_cache=True,
                logits_to_keep=keep,
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
                    past_key_values=self._cache,
                    use_cache=True,
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
