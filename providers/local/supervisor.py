"""Keep an engine's thread alive: a worker that dies is noticed at once and restarted.

An engine runs its batching loop on a thread of its own. If that loop ever raises, the
thread ends; nothing on the asyncio side would notice, and every request queued to it
would wait for its tier's whole timeout. ``EngineSupervisor`` prevents that:

- the loop runs on a **worker** thread; a small **supervisor** thread (which runs no
  engine code, so no engine fault can stop it) joins the worker;
- when the worker ends without ``stop()`` having been asked, the supervisor records why
  (``down_reason``), calls the engine's ``on_death`` (fail every open sequence, drop
  state the dead loop may have left half-written), waits a backoff, and starts a new
  worker on the same weights;
- while it is down, ``down_reason`` says why: the engine refuses submissions at once and
  its tier reports not ready, so the router moves on in milliseconds;
- backoff doubles from ``backoff_initial_s`` up to ``backoff_max_s`` while the loop keeps
  dying, and starts over once a worker has run ``stable_after_s``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)


class EngineSupervisor:
    """Runs ``loop`` (which returns only once the engine is closed) on a worker thread
    and restarts it when it dies. ``on_death(reason)`` runs on the supervisor thread
    after each death, before the backoff."""

    def __init__(
        self,
        name: str,
        loop: Callable[[], None],
        on_death: Callable[[str], None],
        *,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        stable_after_s: float = 60.0,
    ) -> None:
        self.name = name
        self._loop = loop
        self._on_death = on_death
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._stable_after_s = stable_after_s
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._worker: threading.Thread | None = None
        self._down_reason: str | None = None
        self._crash: BaseException | None = None
        self.deaths = 0
        self.restarts = 0

    # --- what the engine asks ------------------------------------------------------

    @property
    def down_reason(self) -> str | None:
        """Why the engine cannot take work now (None while it serves)."""
        if self._down_reason is not None:
            return self._down_reason
        if self._thread is None:
            return "the engine is not started"
        if self._stopping.is_set():
            return "the engine is stopped"
        if not self._thread.is_alive():  # pragma: no cover - the supervisor runs no engine code
            return "the engine's supervisor thread exited"
        return None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._supervise, name=f"tiergate-engine-{self.name}-supervisor", daemon=True
            )
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> bool:
        """Ask for the end; the engine's loop must notice its own close flag and return.
        Joins the supervisor (and so the worker) for at most ``timeout`` seconds; False
        when the worker is still running then (stuck inside a step)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
            return not self._thread.is_alive()
        return True

    # --- the supervisor thread ------------------------------------------------------

    def _run_worker(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # the worker's whole life: its end is the supervisor's to judge
            self._crash = exc
            log.exception("local_engine_died", tier=self.name)

    def _supervise(self) -> None:
        delay = self.backoff_initial_s
        while True:
            self._crash = None
            started = time.monotonic()
            worker = threading.Thread(
                target=self._run_worker, name=f"tiergate-engine-{self.name}", daemon=True
            )
            self._worker = worker
            worker.start()
            worker.join()
            if self._stopping.is_set() and self._crash is None:
                return
            crash = self._crash
            reason = (
                f"the engine thread died: {type(crash).__name__}: {crash}"
                if crash is not None
                else "the engine thread exited unexpectedly"
            )
            self.deaths += 1
            if time.monotonic() - started >= self._stable_after_s:
                delay = self.backoff_initial_s
            self._down_reason = reason
            log.error("local_engine_down", tier=self.name, reason=reason,
                      deaths=self.deaths, restart_in_s=delay)
            try:
                self._on_death(reason)
            except Exception:  # a failing clean-up must not stop the restart
                log.exception("local_engine_cleanup_failed", tier=self.name)
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, self.backoff_max_s)
            self.restarts += 1
            self._down_reason = None
            log.info("local_engine_restarted", tier=self.name, restarts=self.restarts)
