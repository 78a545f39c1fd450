"""The ``llama_cpp`` engine: continuous batching over llama.cpp's own KV cache.

The same ``Engine`` interface as ``BatchedEngine`` (``engine.py``); the model is a GGUF
served in this process by llama.cpp (``llama_model.py`` opens it), its quantized weights
used as they are.

- Every sequence has its own sequence id in one llama.cpp context. By default each id
  has its own KV stream of ``context_size / max_batch`` cells, as ``llama-server
  --parallel`` lays it out: attention reads only a sequence's own cells, and greedy
  output is exactly llama.cpp's single-sequence output whatever else is batched (a
  test checks it). ``kv_unified = true`` makes one pool that any sequence may fill.
- A step is **one** ``llama_decode``: the next token of every decoding sequence, then as
  many prompt tokens of newly admitted sequences as the batch holds (``batch_tokens``;
  a longer prompt is prefilled in chunks over several steps while the others decode).
  Sequences join and leave between steps.
- Sampling is per sequence with llama.cpp's own samplers (a chain per sequence:
  penalties, temperature, top-k, top-p, a seeded draw; greedy is llama.cpp's argmax).
- A cancelled sequence's cells are freed at once (``llama_memory_seq_rm``). A finished
  one's are kept as a prefix cache entry until its id (or, unified, its memory) is
  needed: a new sequence whose prompt starts with tokens already in the cache (of a
  finished or a running sequence) takes that id over, or copies those cells
  (``llama_memory_seq_cp``), and prefills only the rest. A unified cache that is full
  drops cached entries first (least recently used), then fails the youngest running
  sequence with ``CapacityError``.
- The thread runs discrete steps; a step that raises fails the sequences it carried
  (their cells freed) and the thread goes on. If the loop itself dies, the
  ``EngineSupervisor`` (``supervisor.py``) fails what was open, refuses new work while it
  waits a backoff (``down_reason`` says why), and restarts the loop on the same model
  and context with every cell cleared.
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import structlog

from providers.errors import CapacityError, RetryableError
from providers.local.engine import EngineEvent, Sink
from providers.local.llama_model import LlamaModel
from providers.local.sampling import SamplingParams
from providers.local.supervisor import EngineSupervisor

log = structlog.get_logger(__name__)

_MAX_SEQ = 256  # llama.cpp's LLAMA_MAX_SEQ
# A new sequence waits for a sibling's prefill to end (to copy it) only when that saves
# at least this many prompt tokens: shorter shared heads are cheaper to prefill again.
_WAIT_FOR_PREFIX = 64


class _Sequence:
    __slots__ = ("id", "slot", "prompt", "params", "sink", "loop", "sampler", "tokens",
                 "n_past", "generated", "output", "chunk", "reused")

    def __init__(self, seq_id: int, prompt: list[int], params: SamplingParams, sink: Sink,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.id = seq_id
        self.slot = -1  # llama.cpp sequence id while admitted
        self.prompt = prompt
        self.params = params
        self.sink = sink
        self.loop = loop
        self.sampler: Any = None
        self.tokens = list(prompt)  # prompt, then every sampled token
        self.n_past = 0  # tokens[:n_past] are in the KV cache
        self.generated = 0
        self.output = -1  # batch index of this step's logits
        self.chunk = 0  # prompt tokens in this step's batch
        self.reused = 0  # prompt tokens copied from another sequence's cells

    @property
    def prefilled(self) -> bool:
        return self.n_past >= len(self.prompt)


class _Cached:
    """A finished sequence's cells, kept for prefix reuse."""

    __slots__ = ("slot", "tokens")

    def __init__(self, slot: int, tokens: list[int]) -> None:
        self.slot = slot
        self.tokens = tokens


def _common(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class _Batch:
    """A ``llama_batch`` over numpy arrays this object owns: one sequence id per token."""

    def __init__(self, lib: Any, size: int) -> None:
        import numpy as np

        self.size = size
        self.token = np.zeros(size, dtype=np.int32)
        self.pos = np.zeros(size, dtype=np.int32)
        self.n_seq_id = np.ones(size, dtype=np.int32)
        self.seq_id = np.zeros(size, dtype=np.int32)
        self.logits = np.zeros(size, dtype=np.int8)
        i32 = ctypes.POINTER(ctypes.c_int32)
        base = self.seq_id.ctypes.data
        self._seq_ptrs = (i32 * size)(*(ctypes.cast(base + 4 * i, i32) for i in range(size)))
        self.struct = lib.llama_batch()
        self.struct.token = self.token.ctypes.data_as(i32)
        self.struct.embd = None
        self.struct.pos = self.pos.ctypes.data_as(i32)
        self.struct.n_seq_id = self.n_seq_id.ctypes.data_as(i32)
        self.struct.seq_id = self._seq_ptrs
        self.struct.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self.n = 0

    def clear(self) -> None:
        self.n = 0

    def add(self, tokens: list[int], start: int, slot: int, last_logits: bool) -> int:
        """Tokens at positions ``start...`` of sequence ``slot``; returns the batch index
        of the last one (logits there when ``last_logits``)."""
        n, k = self.n, len(tokens)
        self.token[n : n + k] = tokens
        self.pos[n : n + k] = range(start, start + k)
        self.seq_id[n : n + k] = slot
        self.logits[n : n + k] = 0
        if last_logits:
            self.logits[n + k - 1] = 1
        self.n = n + k
        return n + k - 1


class _KVFull(Exception):
    """llama_decode found no room in the KV cache for the batch."""


class LlamaCppEngine:
    """Continuous batching on one llama.cpp context, on a dedicated thread."""

    def __init__(
        self,
        model: LlamaModel,
        *,
        max_context: int,
        max_batch: int = 16,
        max_queue: int = 64,
        name: str = "local",
        context_size: int | None = None,
        batch_tokens: int = 512,
        prefix_cache: bool = True,
        kv_unified: bool = False,
    ) -> None:
        lib = model.lib
        self._lib = lib
        self._model = model
        self._name = name
        self._max_batch = max_batch
        self._max_queue = max_queue
        self._prefix_cache = prefix_cache
        self._unified = kv_unified
        # Unified: one pool, and spare ids for finished sequences kept for reuse. Split:
        # one stream of context_size / max_batch cells per id; a finished sequence's
        # cells stay in its stream until the id is taken again.
        spare = min(max_batch, _MAX_SEQ - max_batch) if prefix_cache and kv_unified else 0
        n_seq = max_batch + spare
        if n_seq > _MAX_SEQ:
            raise ValueError(f"max_batch {max_batch} is over llama.cpp's {_MAX_SEQ} sequences")
        n_ctx = context_size or model.n_ctx_train or 4096
        self._n_batch = max(batch_tokens, max_batch + 1)
        self._max_context = min(max_context, n_ctx if kv_unified else n_ctx // n_seq)
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = self._n_batch
        params.n_ubatch = self._n_batch
        params.n_seq_max = n_seq
        params.n_threads = model.threads
        params.n_threads_batch = model.threads
        params.kv_unified = kv_unified
        params.embeddings = False
        params.no_perf = True
        self._ctx = lib.llama_init_from_model(model.ptr, params)
        if not self._ctx:
            raise CapacityError(
                f"tier {name}: llama.cpp could not create a context of {n_ctx} cells "
                f"for {n_seq} sequences (out of memory?)", tier=name, status=503)
        self.context_size = int(lib.llama_n_ctx(self._ctx))
        self._mem = lib.llama_get_memory(self._ctx)
        self._batch = _Batch(lib, self._n_batch)
        self._n_seq = n_seq
        self._free_slots: deque[int] = deque(range(n_seq))
        self._cache: OrderedDict[int, _Cached] = OrderedDict()  # slot -> entry, oldest first
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._queue: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []  # admission order: prefilling ones last
        self._cancelled: set[int] = set()
        self._closed = False
        self.supervisor = EngineSupervisor(name, self._run, self._after_death)
        # Tests only: called with "admit" and "step" before each; what it raises is what
        # a fault in that part of the loop would raise.
        self.fault_hook: Callable[[str], None] | None = None
        # Counters for benchmarks and tests.
        self.steps = 0
        self.decode_s = 0.0
        self.failed_steps = 0
        self.prefilled_tokens = 0
        self.reused_tokens = 0

    # --- the interface --------------------------------------------------------------

    def start(self) -> None:
        self.supervisor.start()

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Sink,
               loop: asyncio.AbstractEventLoop) -> int:
        if not prompt_ids:
            raise ValueError("a sequence needs at least one prompt token")
        with self._cond:
            down = self.down_reason
            if down is not None:
                raise RetryableError(f"tier {self._name}: {down}", tier=self._name, status=503)
            free = self._max_batch - len(self._running)
            if len(self._queue) >= free + self._max_queue:
                raise CapacityError(
                    f"tier {self._name}: {len(self._running)} sequences running and "
                    f"{len(self._queue)} queued (max_queue {self._max_queue})",
                    tier=self._name, status=503)
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

    def kv_cells(self) -> int:
        """Cells held, summed over sequence ids (a shared cell counts once per holder);
        tests and benchmarks read it, between steps."""
        held = 0
        for slot in range(self._n_seq):
            top = int(self._lib.llama_memory_seq_pos_max(self._mem, slot))
            if top >= 0:
                held += top - int(self._lib.llama_memory_seq_pos_min(self._mem, slot)) + 1
        return held

    @property
    def max_context(self) -> int:
        """Tokens one sequence may hold (a split cache gives each its share)."""
        return self._max_context

    @property
    def cached_prefixes(self) -> int:
        return len(self._cache)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if not self.supervisor.stop(timeout=30):  # stuck in a decode: freeing under it would crash
            log.error("local_engine_stuck_on_close", tier=self._name)
            return
        self._fail_all(RetryableError("the local engine stopped", tier=self._name))
        if self._ctx:
            self._lib.llama_free(self._ctx)
            self._ctx = None
        self._model.close()

    # --- the thread -----------------------------------------------------------------

    def _run(self) -> None:
        """The loop, on the worker thread; returns once closed. What it raises ends the
        thread: the supervisor restarts it (``_after_death``)."""
        while True:
            with self._cond:
                while (not self._closed and not self._queue and not self._running
                       and not self._cancelled):
                    self._cond.wait()
                if self._closed:
                    return
                cancelled, self._cancelled = self._cancelled, set()
            if cancelled:
                self._drop([s for s in self._running if s.id in cancelled], keep=False)
            with self._cond:
                self._fault("admit")
                self._admit()
            if not self._running:
                continue
            out: dict[asyncio.AbstractEventLoop, list[tuple[Sink, EngineEvent]]] = {}
            try:
                self._fault("step")
                self._step(out)
            except Exception as exc:  # one bad step fails what it carried, not the engine
                self.failed_steps += 1
                log.exception("local_engine_step_failed", tier=self._name)
                carried = list(self._running)
                self._drop(carried, keep=False)
                error = CapacityError(f"tier {self._name}: the engine step failed "
                                      f"({type(exc).__name__}: {exc})", tier=self._name, status=503)
                for seq in carried:
                    _emit(out, seq, EngineEvent(error=error))
            _deliver(out)

    def _fault(self, stage: str) -> None:
        if self.fault_hook is not None:
            self.fault_hook(stage)

    def _after_death(self, reason: str) -> None:
        """On the supervisor thread, once the loop died: fail every open sequence and
        start the next loop with every cell cleared (the dead one may have left a batch
        half-decoded)."""
        self._fail_all(CapacityError(f"tier {self._name}: {reason}", tier=self._name, status=503))
        with self._cond:
            self._cancelled.clear()
            self._cache.clear()
            self._free_slots = deque(range(self._n_seq))
        if self._ctx:
            self._lib.llama_memory_clear(self._mem, True)

    def _admit(self) -> None:
        """Queued sequences into free places (under the lock), sharing cached prefixes."""
        while self._queue and len(self._running) < self._max_batch:
            seq = self._queue[0]
            source, shared = self._best_prefix(seq)
            if self._prefix_cache and self._sibling_would_save(seq, shared):
                break  # wait a step or two: a running prefill will have this prefix
            if source is not None and source in self._cache:
                # A finished sequence's cells: take its id over, keep the shared part.
                del self._cache[source]
                slot = source
                self._lib.llama_memory_seq_rm(self._mem, slot, shared, -1)
            else:
                slot = self._take_slot()
                if slot is None:
                    break
                if source is not None and shared:
                    self._copy(source, slot, shared)
            self._queue.popleft()
            seq.slot = slot
            if shared:
                seq.n_past = seq.reused = shared
                self.reused_tokens += shared
            seq.sampler = self._new_sampler(seq.params)
            self._running.append(seq)

    def _best_prefix(self, seq: _Sequence) -> tuple[int | None, int]:
        """The sequence id whose cells hold the longest prefix of ``seq``'s prompt, and
        that length (at most the prompt less one token: the last one is decoded for its
        logits)."""
        if not self._prefix_cache:
            return None, 0
        limit = len(seq.prompt) - 1
        best, best_len = None, 0
        for other in self._running:
            n = _common(seq.prompt, other.tokens, min(limit, other.n_past))
            if n > best_len:
                best, best_len = other.slot, n
        for slot, entry in self._cache.items():
            n = _common(seq.prompt, entry.tokens, limit)
            if n > best_len:
                best, best_len = slot, n
        return best, best_len

    def _sibling_would_save(self, seq: _Sequence, shared: int) -> bool:
        limit = len(seq.prompt) - 1
        for other in self._running:
            if not other.prefilled:
                if _common(seq.prompt, other.prompt, limit) - shared >= _WAIT_FOR_PREFIX:
                    return True
        return False

    def _take_slot(self) -> int | None:
        if not self._free_slots and self._cache:
            self._evict(next(iter(self._cache)))  # the least recently used
        return self._free_slots.popleft() if self._free_slots else None

    def _copy(self, source: int, slot: int, shared: int) -> None:
        """The first ``shared`` cells of ``source`` into ``slot`` (empty)."""
        if self._unified:  # the cells gain a sequence id; no data moves
            self._lib.llama_memory_seq_cp(self._mem, source, slot, 0, shared)
        else:  # across streams llama.cpp copies whole streams: copy, then trim
            self._lib.llama_memory_seq_cp(self._mem, source, slot, -1, -1)
            self._lib.llama_memory_seq_rm(self._mem, slot, shared, -1)

    def _evict(self, slot: int) -> None:
        del self._cache[slot]
        self._lib.llama_memory_seq_rm(self._mem, slot, -1, -1)
        self._free_slots.append(slot)

    def _new_sampler(self, p: SamplingParams) -> Any:
        """A llama.cpp sampler chain; None for plain greedy (``_argmax`` picks)."""
        if p.greedy and not p.penalised:
            return None
        lib = self._lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if p.penalised:
            # OpenAI's penalties: logit -= frequency * count + presence * (count > 0),
            # over the tokens generated so far; no multiplicative repeat penalty.
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_penalties(
                self._model.n_vocab, p.max_new_tokens, 1.0, p.frequency_penalty, p.presence_penalty))
        if p.greedy:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
            return chain
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(p.temperature))
        if p.top_k > 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(p.top_k))
        if p.top_p < 1.0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(p.top_p, 1))
        seed = lib.LLAMA_DEFAULT_SEED if p.seed is None else p.seed % lib.LLAMA_DEFAULT_SEED
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed))
        return chain

    def _fill(self) -> None:
        """This step's batch: one token per decoding sequence, then prompt chunks."""
        batch = self._batch
        batch.clear()
        for seq in self._running:
            seq.chunk = 0
            seq.output = -1
            if seq.prefilled:
                seq.output = batch.add([seq.tokens[-1]], seq.n_past, seq.slot, True)
        for seq in self._running:
            room = batch.size - batch.n
            if room <= 0:
                break
            if not seq.prefilled:
                chunk = seq.prompt[seq.n_past : seq.n_past + room]
                done = seq.n_past + len(chunk) == len(seq.prompt)
                index = batch.add(chunk, seq.n_past, seq.slot, done)
                seq.chunk = len(chunk)
                if done:
                    seq.output = index

    def _decode(self) -> None:
        """One llama_decode over this step's batch, making room when the cache is full."""
        while True:
            self._fill()
            started = time.perf_counter()
            self._batch.struct.n_tokens = self._batch.n
            rc = int(self._lib.llama_decode(self._ctx, self._batch.struct))
            self.decode_s += time.perf_counter() - started
            if rc == 0:
                return
            if rc != 1:
                raise RuntimeError(f"llama_decode returned {rc}")
            # No room for the batch (the state is as before the call): free cached
            # prefixes first, then the youngest sequence.
            if self._cache:
                self._evict(next(iter(self._cache)))
                continue
            raise _KVFull()

    def _step(self, out: dict) -> None:
        try:
            self._decode()
        except _KVFull:
            victim = self._running[-1]
            log.warning("local_kv_cache_full", tier=self._name, seq=victim.id,
                        cells=self.context_size)
            self._drop([victim], keep=False)
            _emit(out, victim, EngineEvent(error=CapacityError(
                f"tier {self._name}: the KV cache ({self.context_size} cells) is full",
                tier=self._name, status=503)))
            return
        self.steps += 1
        done: list[_Sequence] = []
        for seq in self._running:
            if seq.chunk:
                seq.n_past += seq.chunk
                self.prefilled_tokens += seq.chunk
            elif seq.output >= 0:
                seq.n_past += 1
            if seq.output < 0:
                continue
            if seq.sampler is None:
                token = self._argmax(seq.output)
            else:
                token = int(self._lib.llama_sampler_sample(seq.sampler, self._ctx, seq.output))
            seq.tokens.append(token)
            seq.generated += 1
            finish = None
            if self._model.is_eog(token):
                finish = "stop"
            elif seq.generated >= seq.params.max_new_tokens or seq.n_past + 1 >= self._max_context:
                finish = "length"
            _emit(out, seq, EngineEvent(token_ids=(token,), finish_reason=finish))
            if finish:
                done.append(seq)
        if done:
            self._drop(done, keep=self._prefix_cache)

    def _argmax(self, index: int) -> int:
        # Greedy straight off the logits: llama_sampler_sample builds a candidate array
        # of the whole vocabulary per call (BENCHMARKS.md, "llama_cpp: greedy by argmax").
        # The first maximum, as llama.cpp's greedy sampler picks.
        import numpy as np

        row = self._lib.llama_get_logits_ith(self._ctx, index)
        return int(np.ctypeslib.as_array(row, shape=(self._model.n_vocab,)).argmax())

    def _drop(self, seqs: list[_Sequence], *, keep: bool) -> None:
        """Take ``seqs`` out of the batch; their cells are freed, or kept as a cache entry."""
        for seq in seqs:
            if seq not in self._running:
                continue
            self._running.remove(seq)
            if seq.sampler is not None:
                self._lib.llama_sampler_free(seq.sampler)
                seq.sampler = None
            if keep and seq.n_past > 0:
                self._cache[seq.slot] = _Cached(seq.slot, seq.tokens[: seq.n_past])
            else:
                self._lib.llama_memory_seq_rm(self._mem, seq.slot, -1, -1)
                self._free_slots.append(seq.slot)
            seq.slot = -1

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            seqs = list(self._queue) + list(self._running)
            self._queue.clear()
        running = [s for s in seqs if s.slot >= 0]
        if running and self._ctx:
            self._drop(running, keep=False)
        self._running.clear()
        out: dict = {}
        for seq in seqs:
            _emit(out, seq, EngineEvent(error=error))
        _deliver(out)


def _emit(out: dict, seq: _Sequence, event: EngineEvent) -> None:
    out.setdefault(seq.loop, []).append((seq.sink, event))


def _deliver(out: dict) -> None:
    for loop, items in out.items():
        try:
            loop.call_soon_threadsafe(_dispatch, items)
        except RuntimeError:
            log.debug("local_engine_loop_closed")  # nobody is waiting for these tokens


def _dispatch(items: list[tuple[Sink, EngineEvent]]) -> None:
    for sink, event in items:
        sink(event)
