"""Running a decoder layer on a subset of the batch: selecting the rows' inputs and a cache view for them."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["RowSubsetCache", "take_rows"]


def take_rows(value, rows: torch.Tensor, batch_size: int):
    """Selects `rows` of every batch-shaped tensor in `value` (tensors whose dim 0 is 1 broadcast and stay)."""
    if isinstance(value, torch.Tensor):
        if value.dim() > 0 and value.shape[0] == batch_size and batch_size > 1:
            return value.index_select(0, rows.to(value.device))
        return value
    if isinstance(value, tuple):
        return tuple(take_rows(v, rows, batch_size) for v in value)
    if isinstance(value, list):
        return [take_rows(v, rows, batch_size) for v in value]
    return value


class RowSubsetCache:
    """A view of a KV cache for a layer call that runs on a subset of the batch.

    The attention module calls `update(key, value, layer_idx)` with the running rows' new K/V; we complete the
    batch with the skipping rows' propagated K/V, update the real cache once for the whole batch (so every
    layer's cache keeps one length) and hand back the running rows' slice.
    """

    def __init__(self, cache, rows: torch.Tensor, fill: Callable[[], tuple[torch.Tensor, torch.Tensor]]):
        self._cache = cache
        self._rows = rows
        self._fill = fill

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        full_k, full_v = self._fill()
        rows = self._rows.to(full_k.device)
        full_k = full_k.index_copy(0, rows, key_states.to(full_k.dtype))
        full_v = full_v.index_copy(0, rows, value_states.to(full_v.dtype))
        keys, values = self._cache.update(full_k, full_v, layer_idx, *args, **kwargs)
        return keys.index_select(0, rows.to(keys.device)), values.index_select(0, rows.to(values.device))

    def __getattr__(self, name):
        return getattr(self._cache, name)
