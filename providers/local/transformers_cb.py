"""transformers' ``ContinuousBatchingManager`` behind the ``Engine`` interface
(``engine = "transformers_cb"``).

The manager samples with one generation config for all requests, so this engine decodes
greedily and refuses per-request sampling (temperature > 0, penalties) with a 400; use
the default ``continuous`` engine for those. A pump thread reads the manager's results
and hands new tokens to asyncio with ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from dataclasses import dataclass
from typing import Any

import structlog

from providers.errors import CapacityError, FatalError, RetryableError
from providers.local.engine import EngineEvent, Sink
from providers.local.sampling import SamplingParams
from providers.local.supervisor import EngineSupervisor

log = structlog.get_logger(__name__)


@dataclass
class _Open:
    seq_id: int
    request_id: str
    sink: Sink
    loop: asyncio.AbstractEventLoop
    sent: int = 0


class TransformersCBEngine:
    def __init__(self, model: Any, *, eos_token_ids: frozenset[int], max_context: int,
                 max_batch: int = 16, max_queue: int = 64, name: str = "local") -> None:
        from transformers import GenerationConfig

        self._eos = eos_token_ids
        self._max_open = max_batch + max_queue
        self._name = name
        eos = sorted(eos_token_ids)
        config = GenerationConfig(
            do_sample=False,
            max_new_tokens=max_context,
            eos_token_id=eos or None,
            pad_token_id=eos[0] if eos else 0,
        )
        self._manager = model.init_continuous_batching(generation_config=config)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._open: dict[str, _Open] = {}
        self._by_seq: dict[int, str] = {}
        self._stopping = threading.Event()
        # The pump: restarted if it dies, failing what was open (supervisor.py).
        self._pump = EngineSupervisor(name, self._run, self._after_death)

    def start(self) -> None:
        self._manager.start()
        self._pump.start()

    @property
    def down_reason(self) -> str | None:
        if self._stopping.is_set():
            return "the local engine is stopped"
        return self._pump.down_reason

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Sink,
               loop: asyncio.AbstractEventLoop) -> int:
        if not params.greedy or params.penalised:
            raise FatalError(
                f"tier {self._name} (engine transformers_cb) decodes greedily: temperature "
                "must be 0 and penalties unset",
                tier=self._name, status=400, code="unsupported_parameter", param="temperature",
            )
        down = self.down_reason
        if down is not None:
            raise RetryableError(f"tier {self._name}: {down}", tier=self._name, status=503)
        with self._lock:
            if len(self._open) >= self._max_open:
                raise CapacityError(f"tier {self._name}: {len(self._open)} requests open",
                                    tier=self._name, status=503)
            seq_id = next(self._ids)
            request_id = f"tg-{seq_id}"
            self._open[request_id] = _Open(seq_id, request_id, sink, loop)
            self._by_seq[seq_id] = request_id
        self._manager.add_request(list(prompt_ids), request_id=request_id,
                                  max_new_tokens=params.max_new_tokens, streaming=True)
        return seq_id

    def cancel(self, seq_id: int) -> None:
        with self._lock:
            request_id = self._by_seq.pop(seq_id, None)
            if request_id is None:
                return
            self._open.pop(request_id, None)
        self._manager.cancel_request(request_id)

    @property
    def active(self) -> int:
        return len(self._open)

    @property
    def waiting(self) -> int:
        return 0

    def close(self) -> None:
        self._stopping.set()
        self._manager.stop(block=True, timeout=30)
        self._pump.stop(timeout=5)
        self._fail_open(RetryableError("the local engine stopped", tier=self._name))

    def _after_death(self, reason: str) -> None:
        self._fail_open(CapacityError(f"tier {self._name}: {reason}", tier=self._name, status=503))

    def _fail_open(self, error: BaseException) -> None:
        with self._lock:
            left = list(self._open.values())
            self._open.clear()
            self._by_seq.clear()
        for entry in left:
            _send(entry, EngineEvent(error=error))

    def _run(self) -> None:
        while not self._stopping.is_set():
            result = self._manager.get_result(timeout=0.1)
            if result is None:
                continue
            with self._lock:
                entry = self._open.get(result.request_id)
            if entry is None:
                continue  # cancelled meanwhile
            tokens = list(result.generated_tokens)
            new = tuple(tokens[entry.sent :])
            entry.sent = len(tokens)
            finish = None
            error: BaseException | None = None
            if result.is_finished():
                with self._lock:
                    self._open.pop(entry.request_id, None)
                    self._by_seq.pop(entry.seq_id, None)
                if result.error:
                    error = RetryableError(f"tier {self._name}: {result.error}", tier=self._name)
                else:
                    finish = "stop" if tokens and tokens[-1] in self._eos else "length"
            if new or finish or error:
                _send(entry, EngineEvent(token_ids=new, finish_reason=finish, error=error))


def _send(entry: _Open, event: EngineEvent) -> None:
    try:
        entry.loop.call_soon_threadsafe(entry.sink, event)
    except RuntimeError:
        log.debug("local_engine_loop_closed")
