"""Incremental detokenisation and stop strings, on the asyncio side of the engine.

``IncrementalDetokenizer`` turns a growing list of token ids into text deltas without
ever splitting a UTF-8 character: a byte-level token that ends inside a multi-byte
character decodes to U+FFFD, so the text is held back until the character completes.
``StopMatcher`` finds stop strings across delta boundaries and holds back a tail that
could still grow into one, so the stop text itself is never sent.
"""

from __future__ import annotations

from typing import Any

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Decode token by token; ``push`` returns the new, complete text."""

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # decode from here, so tokens merge with their neighbours
        self._read = 0  # text of ids[prefix:read] has been returned already

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_ids: list[int] | tuple[int, ...]) -> str:
        self._ids.extend(token_ids)
        seen = self._decode(self._ids[self._prefix : self._read])
        full = self._decode(self._ids[self._prefix :])
        if len(full) <= len(seen) or full.endswith(_REPLACEMENT):
            return ""
        delta = full[len(seen) :]
        self._prefix = self._read
        self._read = len(self._ids)
        return delta

    def flush(self) -> str:
        """What is left at the end (an incomplete character stays as U+FFFD)."""
        seen = self._decode(self._ids[self._prefix : self._read])
        full = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return full[len(seen) :] if len(full) > len(seen) else ""


class StopMatcher:
    """Feed text deltas; get back what may be sent, and whether a stop string matched."""

    def __init__(self, stops: tuple[str, ...] | list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        if self.stopped:
            return ""
        if not self._stops:
            return delta
        text = self._held + delta
        first = -1
        for stop in self._stops:
            at = text.find(stop)
            if at != -1 and (first == -1 or at < first):
                first = at
        if first != -1:
            self.stopped = True
            self._held = ""
            return text[:first]
        hold = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:size]):
                    hold = max(hold, size)
                    break
        self._held = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held
