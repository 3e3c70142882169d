"""Running a decoder layer on a subset of the batch: selecting the rows' inputs and a cache view for them, and the
K/V that rows which skip a layer get from their frozen hidden states."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import compat
from ..architectures import core as arch

__all__ = ["RowSubsetCache", "frozen_kv", "subset_inputs", "take_rows"]


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


def frozen_kv(model, layer, hidden: torch.Tensor, kwargs, rows: torch.Tensor):
    """Full-batch K/V tensors for `layer` whose `rows` entries come from those rows' (frozen) hidden states.

    The other rows' entries are left zero: `RowSubsetCache.update` overwrites them with the values the layer
    computes for the running rows.
    """
    batch_size = hidden.shape[0]
    pos_emb = take_rows(kwargs.get("position_embeddings"), rows, batch_size)
    hidden = hidden.index_select(0, rows.to(hidden.device))
    k, v = arch.spec_of(model).layer_kv_states(model, layer, hidden, pos_emb)
    if rows.numel() == batch_size:
        return k, v
    full_k = k.new_zeros((batch_size, *k.shape[1:]))
    full_v = v.new_zeros((batch_size, *v.shape[1:]))
    r = rows.to(k.device)
    return full_k.index_copy(0, r, k), full_v.index_copy(0, r, v)


def subset_inputs(model, layer, rows: torch.Tensor, skipping: torch.Tensor, hidden: torch.Tensor, args, kwargs):
    """A layer call's inputs for `rows` only: their hidden states, arguments, and (with a cache) a row-subset view
    of it that completes the batch with the `skipping` rows' (host bool mask) K/V from their frozen states."""
    batch_size = hidden.shape[0]
    sub_args = take_rows(args, rows, batch_size)
    sub_kwargs = {k: take_rows(v, rows, batch_size) for k, v in kwargs.items()}
    cache = compat.layer_cache(kwargs)
    if cache is not None:
        skipped = skipping.nonzero().squeeze(-1)
        sub_kwargs = compat.with_layer_cache(sub_kwargs, RowSubsetCache(
            cache, rows, lambda: frozen_kv(model, layer, hidden, kwargs, skipped)))
    return hidden.index_select(0, rows.to(hidden.device)), sub_args, sub_kwargs
