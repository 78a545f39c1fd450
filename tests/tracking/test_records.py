"""Event ids: unique, a uuid4's length, different in a forked child."""

from __future__ import annotations

import os
import re

from tracking.records import new_event_id

ID = re.compile(r"[0-9a-f]{32}")


def test_ids_are_32_hex_digits_and_unique() -> None:
    ids = [new_event_id() for _ in range(10_000)]
    assert all(ID.fullmatch(i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_a_process_shares_its_prefix_and_counts_on() -> None:
    first, second = new_event_id(), new_event_id()
    assert first[:16] == second[:16]
    assert int(second[16:], 16) == int(first[16:], 16) + 1


def test_a_forked_child_draws_its_own_prefix() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: send an id and leave at once
        os.write(write, new_event_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert ID.fullmatch(child)
    assert child[:16] != new_event_id()[:16]
