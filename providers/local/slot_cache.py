"""The continuous-batching engine's KV cache: one row per slot, a length per row.

Per layer one ``[slots, kv_heads, capacity, head_dim]`` tensor; every sequence has its
own length, so a sequence joins or leaves between any two decode steps (see
``engine.py``). It subclasses transformers' ``Cache``, so the generic forward of any
architecture with standard attention can write into it, whatever keyword arguments its
release passes to ``update``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache


class SlotCache(Cache):
    """A KV cache with one row per slot and a length per row (see module docstring).

    Attention layers call ``update(key, value, layer_idx, ...)`` with whatever keyword
    arguments their release passes (``cache_kwargs=`` in 4.x, ``kwargs=`` in 5.x) and get
    back the keys and values of the rows in this forward, ``_width`` positions wide. Positions come
    from explicit ``position_ids`` and the mask is a ready 4D mask, so the cache reports
    no length of its own (``get_seq_length() == 0``).
    """

    is_compileable = False

    def __init__(self, slots: int, max_capacity: int, device: Any) -> None:
        # No layer objects: this class keeps the tensors itself, per layer index.
        super().__init__(layers=[])
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
        self._rows = slice(0, rows)
        self._write = (torch.arange(rows, device=positions.device), positions)
        self._width = width

    def move(self, src: int, dst: int, length: int) -> None:
        for store in (self.keys, self.values):
            for tensor in store:
                tensor[dst, :, :length] = tensor[src, :, :length]

    # --- transformers' Cache interface ------------------------------------------------

    def update(self, key_states: Any, value_states: Any, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[Any, Any]:
        """Write this forward's keys and values; return the rows' keys and values so
        far. Extra arguments (rotary sin/cos, cache positions) are not needed: the write
        positions were set by ``for_prefill`` / ``for_decode``."""
        if layer_idx == len(self.keys):
            shape = (self.rows, key_states.shape[1], self.capacity, key_states.shape[3])
            self.keys.append(key_states.new_zeros(shape))
            self.values.append(value_states.new_zeros(shape))
        k_store, v_store = self.keys[layer_idx], self.values[layer_idx]
        rows = self._rows
        if self._write is None:
            k_store[rows, :, : key_states.shape[2]] = key_states
            v_store[rows, :, : value_states.shape[2]] = value_states
        else:
            row_idx, positions = self._write
            k_store[row_idx, :, positions] = key_states[:, :, 0]
            v_store[row_idx, :, positions] = value_states[:, :, 0]
        return k_store[rows, :, : self._width], v_store[rows, :, : self._width]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        """(key length, offset) of the keys ``update`` returns."""
        return self._width, 0

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_capacity

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_capacity

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self.keys)
