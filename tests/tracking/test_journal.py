from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from tracking import UsageEvent
from tracking.journal import Journal


def _event(i: int) -> UsageEvent:
    return UsageEvent(tier="local", model="smol", key=None, prompt_tokens=i, ts=1_700_000_000.0 + i)


async def test_appends_are_durable_lines_in_order(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "state" / "usage.jsonl")
    events = [_event(i) for i in range(40)]
    await asyncio.gather(*[journal.append(e) for e in events])
    lines = (tmp_path / "state" / "usage.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [e.id for e in events]
    assert UsageEvent.from_json(json.loads(lines[3])) == events[3]


async def test_replay_sends_everything_once_then_removes_the_file(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "usage.jsonl")
    events = [_event(i) for i in range(25)]
    for e in events:
        await journal.append(e)
    seen: list[str] = []

    async def send(batch: Sequence[UsageEvent]) -> int:
        seen.extend(e.id for e in batch)
        return len(batch)

    assert await journal.replay(send, batch_size=10) == (25, 25)
    assert seen == [e.id for e in events]
    assert not journal.has_entries()
    assert await journal.replay(send) == (0, 0)


async def test_replay_failing_midway_keeps_the_file_and_new_appends(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "usage.jsonl")
    old = [_event(i) for i in range(30)]
    for e in old:
        await journal.append(e)
    sent: list[str] = []

    async def flaky(batch: Sequence[UsageEvent]) -> int:
        if sent:
            # Redis went away after the first batch; meanwhile more usage arrives.
            await journal.append(late)
            raise ConnectionError("redis went away")
        sent.extend(e.id for e in batch)
        return len(batch)

    late = _event(99)
    with pytest.raises(ConnectionError):
        await journal.replay(flaky, batch_size=10)
    assert journal.has_entries()

    delivered: list[str] = []

    async def ok(batch: Sequence[UsageEvent]) -> int:
        delivered.extend(e.id for e in batch)
        return len(batch)

    # First the interrupted file, from its start (ids make the repeat harmless)...
    await journal.replay(ok, batch_size=10)
    assert delivered == [e.id for e in old]
    # ...then what was appended meanwhile.
    await journal.replay(ok)
    assert delivered[-1] == late.id and len(delivered) == 31
    assert not journal.has_entries()


async def test_torn_last_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    journal = Journal(path)
    await journal.append(_event(1))
    with open(path, "a") as f:
        f.write('{"id": "abc", "tier": "lo')  # a crash mid-write, never acknowledged
    got: list[UsageEvent] = []

    async def send(batch: Sequence[UsageEvent]) -> int:
        got.extend(batch)
        return len(batch)

    assert await journal.replay(send) == (1, 1)
    assert got[0].prompt_tokens == 1
