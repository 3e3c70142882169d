"""The exact KV-cache option: layers a token skipped run for it later, when a later token goes deeper.

With state propagation (the default) a token that exits after layer k gets K/V for layers k+1..L computed from its
layer-k hidden state: cheap (only the K/V projections) but an approximation of what those layers would hold.
`ExactExitCache` instead remembers, for every position some layer has not seen yet, its hidden state at the
deepest layer it reached. When a later token runs layer l, the positions layer l still owes are run through layer l
first, in the same call (one longer query), so every cached K/V equals what the dense model would hold.

The positions layer l owes are always a suffix [len_l, t) of the sequence (a token goes as deep as the batch goes,
and every owed position is caught up before a later token is processed), so one buffer of frontier states for
positions [len_L, t) suffices: those owed by layer l have exactly l-1 layers done.

The batch shares one depth per step: rows that exited keep computing (they are not frozen) until every row of the
batch has exited, so each row's cache stays exact; each row's output is still its own exit layer's logits.
"""

from __future__ import annotations

import functools

import torch

from .. import compat
from ..compat import DynamicCache
from .base import ExitCacheStrategy, LayerPlan, cache_layer_lengths, inconsistent_cache_error

__all__ = ["CACHE_MODES", "ExactExitCache", "ExactStrategy"]

CACHE_MODES = ("propagate", "exact")


class ExactExitCache(DynamicCache):
    """A `DynamicCache` that also holds the hidden states of positions some layers have not processed yet.

    Pass it as the model's cache argument (or `model.generate(..., exit_cache="exact")`) to select the exact option.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pending_hidden: torch.Tensor | None = None  # [B, P, H]: frontier states of positions [len_L, t)
        self.pending_positions: torch.Tensor | None = None  # [B, P] their position ids

    def layer_length(self, layer_idx: int) -> int:
        """Positions cached by layer `layer_idx` (0-based)."""
        return self.get_seq_length(layer_idx)

    def _apply_to_pending(self, fn) -> None:
        if self.pending_hidden is not None:
            self.pending_hidden = fn(self.pending_hidden)
            self.pending_positions = fn(self.pending_positions)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        self._apply_to_pending(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self._apply_to_pending(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        self._apply_to_pending(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("ExactExitCache cannot be cropped (assisted decoding is not supported).")

    def reset(self):
        super().reset()
        self.pending_hidden = self.pending_positions = None


class ExactStrategy(ExitCacheStrategy):
    """The exact option's loop behaviour: every row runs until the whole batch has exited (rows that exited keep
    computing for the cache; their output stays their exit layer's), and a layer first catches up the positions
    it still owes from earlier steps."""

    name = "exact"
    needs_position_ids = True

    def __init__(self, cache):
        super().__init__(cache)
        self.frontier: torch.Tensor | None = None  # this step's output of the deepest layer run, when not the last
        # This step's catch-up inputs, shared by the layers that owe the same positions: (owed, cached length,
        # layer type, rows, device, dtype, ...) -> (mask, rotary). Built once per step, not once per owed layer.
        self._catch_up_inputs: dict = {}

    @property
    def owes_positions(self) -> bool:
        return self.cache.pending_hidden is not None

    def plan(self, run, layer, rows) -> LayerPlan:
        """Every row runs `layer` while some row is still going (no row: the layer waits, a later token that goes
        deeper runs it for these positions); where the layer owes positions of earlier steps, its forward runs
        them first, in the same call."""
        if rows is None:
            return self._skip_plan()
        owed = self._owed(run, run.spec.layer_index(layer))
        if owed == 0:
            return self._all_rows_plan(run.all_rows)
        return LayerPlan(run.all_rows, forward=functools.partial(self._catch_up_forward, run, layer, owed),
                         query_offset=owed)

    def after_exits(self, run, hidden, exited, kwargs) -> None:
        for row in exited.tolist():
            self.frozen_hidden[row] = hidden[row].clone()  # this row's output stays its exit layer's
        if run.layer < run.num_layers and not run.any_active():
            self.frontier = hidden

    def _catch_up_forward(self, run, layer, owed: int, forward, hidden: torch.Tensor, args, kwargs) -> torch.Tensor:
        """Runs one decoder layer on the `owed` positions it still owes followed by the current query; returns the
        query's outputs (the owed positions' move into the pending buffer, one layer deeper)."""
        cache: ExactExitCache = self.cache
        layer_idx = run.spec.layer_index(layer)
        start = cache.pending_hidden.shape[1] - owed
        owed_hidden = cache.pending_hidden[:, start:].to(hidden.device, hidden.dtype)
        owed_pos = cache.pending_positions[:, start:].to(hidden.device)
        ext_hidden = torch.cat([owed_hidden, hidden], dim=1)
        ext_pos = torch.cat([owed_pos, run.position_ids.to(hidden.device).expand(hidden.shape[0], -1)], dim=1)
        ext_kwargs = dict(kwargs)
        ext_kwargs["position_ids"] = ext_pos
        mask, rotary = self._inputs_for(run, layer, layer_idx, owed, ext_hidden, ext_pos,
                                        kwargs.get("position_embeddings") is not None)
        ext_kwargs["attention_mask"] = mask
        if rotary is not None:
            ext_kwargs["position_embeddings"] = rotary
        out = forward(ext_hidden, *args, **ext_kwargs)
        # The owed positions have now run this layer: their frontier moves one layer deeper.
        cache.pending_hidden[:, start:] = out[:, :owed].to(cache.pending_hidden.device, cache.pending_hidden.dtype)
        return out[:, owed:]

    def _inputs_for(self, run, layer, layer_idx: int, owed: int, ext_hidden, ext_pos, rotary: bool):
        """The attention mask of this layer's type for the extended query, and its rotary table (None when the
        layer takes none); layers of one type with the same owed positions and cache length share them."""
        cache = self.cache
        # (the layer type determines the window: `ArchitectureSpec.sliding_window`)
        key = (owed, cache.layer_length(layer_idx), run.spec.layer_type(run.model, layer_idx), rotary,
               ext_hidden.shape[0], ext_hidden.device, ext_hidden.dtype)
        if key not in self._catch_up_inputs:
            sliding = run.spec.sliding_window(run.model, layer_idx) is not None
            mask = compat.causal_mask(run.model.config, ext_hidden, run.attention_mask, cache, ext_pos,
                                      layer_idx=layer_idx, sliding=sliding)
            table = run.spec.position_embeddings(run.model, ext_hidden, ext_pos, layer) if rotary else None
            self._catch_up_inputs[key] = (mask, table)
        return self._catch_up_inputs[key]

    def _owed(self, run, layer_idx: int) -> int:
        if layer_idx == 0 or self.cache.pending_hidden is None:
            return 0
        return run.past_length - self.cache.layer_length(layer_idx)

    def finish_step(self, run) -> None:
        """After a step: remember the new positions' frontier states if some layers still owe them.

        Positions every layer has seen leave the buffer.
        """
        cache, hidden = self.cache, self.frontier
        total = run.past_length + run.query_length
        if hidden is None or cache.layer_length(run.num_layers - 1) == total:
            cache.pending_hidden = cache.pending_positions = None
            return
        pos = run.position_ids.expand(hidden.shape[0], -1)
        if cache.pending_hidden is None:
            cache.pending_hidden, cache.pending_positions = hidden.detach().clone(), pos.clone()
            return
        device = cache.pending_hidden.device
        cache.pending_hidden = torch.cat(
            [cache.pending_hidden, hidden.detach().to(device, cache.pending_hidden.dtype)], 1)
        cache.pending_positions = torch.cat([cache.pending_positions, pos.to(device)], 1)

    def check_consistent(self, run) -> None:
        """Layer 0 holds every position; deeper layers may owe a suffix, which the pending buffer covers."""
        lengths = cache_layer_lengths(self.cache)
        if not [n for n in lengths if n is not None]:
            return
        total = run.past_length + run.query_length
        # layers no token has reached yet may not exist: they hold nothing
        lengths = lengths + [0] * (run.num_layers - len(lengths))
        known = [n for n in lengths if n is not None]
        pending = 0 if self.cache.pending_hidden is None else self.cache.pending_hidden.shape[1]
        ok = (len(lengths) == run.num_layers and lengths[0] == total
              and all(a >= b for a, b in zip(known, known[1:], strict=False))
              and known[-1] + pending == total)
        if not ok:
            raise inconsistent_cache_error(lengths, total, run)


ExactExitCache.exit_strategy_class = ExactStrategy
