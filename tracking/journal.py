"""Usage that could not reach Redis, kept on disk until it can.

Append-only JSON lines, one ``UsageEvent`` a line. Appends are group-committed: the
events that arrive while a write is in flight go out together in the next write, and
``append`` returns only after ``fsync`` has made its line durable. File I/O runs in a
worker thread, never on the event loop.

Replay is crash-safe without bookkeeping because every event carries an id and Redis
counts an id once (see ``keyspace``): the journal is first renamed to
``<name>.replaying`` (new appends start a fresh file), the renamed file is replayed in
order, and only then deleted. A crash or a Redis failure anywhere in between leaves the
file in place, and the next replay sends its events again; those already counted are
skipped by id.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import structlog

from tracking.records import UsageEvent

log = structlog.get_logger(__name__)

ReplayBatch = Callable[[Sequence[UsageEvent]], Awaitable[int]]


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.replaying_path = path.with_name(path.name + ".replaying")
        self._lock = asyncio.Lock()  # a write and a rotation never overlap
        self._replay_lock = asyncio.Lock()
        self._pending: list[tuple[str, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def append(self, event: UsageEvent) -> None:
        """Return once the event is on disk (fsync'd)."""
        await self.append_many((event,))

    async def append_many(self, events: Sequence[UsageEvent]) -> None:
        """Return once every one of ``events`` is on disk (one write, one fsync)."""
        if not events:
            return
        lines = "".join(json.dumps(e.to_json(), separators=(",", ":")) + "\n" for e in events)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((lines, done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_pending())
        await done

    async def _write_pending(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                async with self._lock:
                    await asyncio.to_thread(self._write_lines, [line for line, _ in batch])
            except OSError as exc:
                log.error("journal_write_failed", path=str(self.path), error=str(exc))
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                continue
            for _, done in batch:
                if not done.done():
                    done.set_result(None)

    def _write_lines(self, lines: list[str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())

    async def flush(self) -> None:
        """Wait for appends in flight (used at shutdown)."""
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)

    def has_entries(self) -> bool:
        return self.replaying_path.exists() or (self.path.exists() and self.path.stat().st_size > 0)

    async def replay(self, send: ReplayBatch, batch_size: int = 200) -> tuple[int, int]:
        """Send every journaled event, oldest first, through ``send``.

        ``send`` counts a batch in Redis and returns how many were new; it raises if
        Redis fails, which leaves the journal for the next replay. Returns (events
        read, events newly counted).
        """
        read = counted = 0
        async with self._replay_lock:
            if not self.replaying_path.exists():
                async with self._lock:
                    if not self.path.exists():
                        return 0, 0
                    await asyncio.to_thread(self._rotate)
            # Appends go on into a fresh file at self.path meanwhile.
            events = await asyncio.to_thread(self._read, self.replaying_path)
            for start in range(0, len(events), batch_size):
                batch = events[start : start + batch_size]
                counted += await send(batch)
                read += len(batch)
            await asyncio.to_thread(self._remove_replayed)
        return read, counted

    def _rotate(self) -> None:
        os.replace(self.path, self.replaying_path)
        self._fsync_dir()

    def _remove_replayed(self) -> None:
        self.replaying_path.unlink()
        self._fsync_dir()

    def _fsync_dir(self) -> None:
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _read(self, path: Path) -> list[UsageEvent]:
        events: list[UsageEvent] = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    events.append(UsageEvent.from_json(json.loads(line)))
                except (ValueError, KeyError, TypeError) as exc:
                    # A torn last line (crash mid-write, never fsync'd, never acknowledged).
                    log.warning("journal_line_skipped", path=str(path), line=n, error=str(exc))
        return events
