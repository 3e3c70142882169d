"""The default KV-cache option ("propagate"), with the fill of skipped layers deferred until something needs it.

With state propagation a token that exits after layer k gets, in every deeper layer, the K/V that layer computes
from the token's layer-k hidden state. Computing them at exit time costs the K/V projections of all skipped
layers for every position (for a model without grouped-query attention ~1/6 of a layer per skipped layer), which
is wasted when no later token ever runs those layers: a forward whose cache is dropped (evaluation), or a
generation whose tokens all exit early.

`PropagateExitCache` therefore only remembers the exit hidden states when the whole batch has exited, and computes
layer l's propagated K/V when layer l's cache is first read: when a later token runs layer l (inside that layer's
own call: one matmul over every owed position), or when anyone reads the cache (`cache.layers[l].keys`,
`get_seq_length(l)`, cropping, `to_legacy_cache`, ...). The K/V are the same as the eager fill's; only when they are
computed changes.

Mechanics: a layer that positions are owed to has its class switched to `OwedLayer`, whose `keys`, `values` and
`is_initialized` attributes compute the owed K/V on first access and switch the class back, so every read path of
transformers' `DynamicLayer` sees a complete cache. Batch reorders (beam search) apply to the owed states without
computing them.
"""

from __future__ import annotations

import weakref

import torch

from ..architectures import core as arch
from ..compat import DynamicCache, DynamicLayer, new_cache_layer
from .base import EagerFillStrategy

__all__ = ["OwedLayer", "PropagateExitCache", "PropagateStrategy"]


class _Owed:
    """Exit hidden states [B, T, H] of positions whose K/V deeper layers still owe, with their rotary (cos, sin)."""

    __slots__ = ("hidden", "position_embeddings")

    def __init__(self, hidden: torch.Tensor, position_embeddings):
        self.hidden = hidden
        self.position_embeddings = position_embeddings

    def map_rows(self, fn) -> _Owed:
        """A copy with `fn` applied along the batch dimension (rotary tables broadcast over rows stay)."""
        pe = self.position_embeddings
        if pe is not None:
            pe = tuple(fn(t) if t.shape[0] == self.hidden.shape[0] and t.shape[0] > 1 else t for t in pe)
        return _Owed(fn(self.hidden), pe)


def _concat(chunks: list[_Owed], device: torch.device):
    hidden = torch.cat([c.hidden.to(device) for c in chunks], dim=1)
    if chunks[0].position_embeddings is None:
        return hidden, None
    batch = hidden.shape[0]
    parts = [tuple(t.to(device).expand(batch, -1, -1) for t in c.position_embeddings) for c in chunks]
    return hidden, tuple(torch.cat(ts, dim=1) for ts in zip(*parts, strict=True))


class OwedLayer(DynamicLayer):
    """A `DynamicLayer` that still owes K/V to some positions; reading it computes them first."""

    def _settle(self) -> None:
        d = self.__dict__
        chunks = d.pop("_owed")
        model_ref, layer_idx = d.pop("_owed_source")
        self.__class__ = DynamicLayer
        model = model_ref()
        if model is None:
            raise RuntimeError("The model this cache belongs to was deleted before its deferred K/V were computed.")
        spec = arch.spec_of(model)
        layer = spec.decoder_layers(model)[layer_idx]
        device = spec.kv_device(layer)
        hidden, pos_emb = _concat(chunks, device)
        with torch.no_grad():
            key, value = spec.layer_kv_states(model, layer, hidden, pos_emb)
        self.update(key, value)

    def owed_length(self) -> int:
        """Positions this layer holds once settled (computed + owed), read without computing anything."""
        d = self.__dict__
        done = d["keys"].shape[-2] if d.get("is_initialized") and d["keys"].numel() else 0
        return done + sum(chunk.hidden.shape[1] for chunk in d["_owed"])

    def _map_rows(self, fn, mapped: dict) -> None:
        """Applies a batch reorder to the computed part and to the owed states (each shared state mapped once)."""
        d = self.__dict__
        if d.get("is_initialized") and d["keys"].numel():
            d["keys"], d["values"] = fn(d["keys"]), fn(d["values"])
        new = []
        for chunk in d["_owed"]:
            if id(chunk) not in mapped:
                mapped[id(chunk)] = (chunk, chunk.map_rows(fn))  # keep `chunk` alive: ids stay unique
            new.append(mapped[id(chunk)][1])
        d["_owed"] = new

    def reset(self) -> None:
        self.__dict__.pop("_owed", None)
        self.__dict__.pop("_owed_source", None)
        self.__class__ = DynamicLayer
        DynamicLayer.reset(self)


def _settling(name: str) -> property:
    def get(self):
        self._settle()
        return self.__dict__[name]

    def set_(self, value):
        self.__dict__[name] = value

    return property(get, set_)


for _name in ("keys", "values", "is_initialized"):
    setattr(OwedLayer, _name, _settling(_name))


class PropagateStrategy(EagerFillStrategy):
    """`PropagateExitCache`'s loop behaviour: as the eager fill, but once every row has exited the deeper layers'
    fill waits until something reads them (`PropagateExitCache.defer`)."""

    name = "propagate"

    def after_exits(self, run, hidden, exited, kwargs) -> None:
        if not self._settles(run, kwargs):
            return
        rotary = run.spec.fill_position_embeddings(run.model, hidden, kwargs)
        if self.cache.defer(run.model, hidden, run.layer, rotary):
            self.deeper_filled = True
            return
        super().after_exits(run, hidden, exited, kwargs)


class PropagateExitCache(DynamicCache):
    """A `DynamicCache` whose early-exit fill (state propagation) is computed when first needed.

    AdaInfer models create it for `model(...)` with `use_cache=True` and for `generate` (the default
    `exit_cache="propagate"`); pass it as the model's cache argument to choose it yourself. With a plain `DynamicCache` the
    fill is computed at exit time instead; the cached values are the same.
    """

    exit_strategy_class = PropagateStrategy  # see cache/base.py

    def defer(self, model, hidden: torch.Tensor, first_layer: int, position_embeddings=None) -> bool:
        """Records that layers `first_layer`..L-1 (0-based) owe K/V computed from `hidden` [B, T, H].

        Returns False (nothing recorded: fill now) when a layer is not a plain `DynamicLayer` or its K/V weights
        are not resident (offloaded to disk or CPU by accelerate: they only load inside that layer's call).
        """
        spec = arch.spec_of(model)
        layers = spec.decoder_layers(model)
        last = spec.num_layers(model)
        for layer in layers[first_layer:last]:
            if not spec.kv_weights_resident(layer):
                return False
        while len(self.layers) < last:
            fresh = new_cache_layer(self)
            if fresh is None:
                break
            self.layers.append(fresh)
        targets = self.layers[first_layer:last]
        if len(targets) != last - first_layer or any(type(t) not in (DynamicLayer, OwedLayer) for t in targets):
            return False
        chunk = _Owed(hidden.detach().clone(), position_embeddings)
        model_ref = weakref.ref(model)
        for idx, layer in enumerate(targets, start=first_layer):
            if type(layer) is DynamicLayer:
                layer.__class__ = OwedLayer
                layer.__dict__["_owed"] = []
                layer.__dict__["_owed_source"] = (model_ref, idx)
            layer.__dict__["_owed"].append(chunk)
        return True

    @property
    def has_deferred(self) -> bool:
        """Whether some layers' propagated K/V have not been computed yet."""
        return any(type(layer) is OwedLayer for layer in self.layers)

    def materialize(self) -> None:
        """Computes every deferred K/V now (reads do this on their own; this is for timing or hand-off)."""
        for layer in self.layers:
            if type(layer) is OwedLayer:
                layer._settle()

    def _map_rows(self, fn) -> bool:
        """Applies a batch reorder to every layer without computing owed K/V; False when nothing is owed."""
        if not self.has_deferred:
            return False
        mapped: dict = {}
        for layer in self.layers:
            if type(layer) is OwedLayer:
                layer._map_rows(fn, mapped)
            elif layer.get_seq_length() > 0:
                layer.keys, layer.values = fn(layer.keys), fn(layer.values)
        return True

    def reorder_cache(self, beam_idx: torch.LongTensor):
        if not self._map_rows(lambda t: t.index_select(0, beam_idx.to(t.device))):
            super().reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int):
        if not self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0)):
            super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor):
        if not self._map_rows(lambda t: t[indices]):
            super().batch_select_indices(indices)
