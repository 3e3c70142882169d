"""Gemma3 text (`gemma3_text`): `(1 + w)` RMSNorms, `k_norm`, local/global rotary tables, final logit softcap."""

from __future__ import annotations

import torch
from torch import nn

from .base import ArchitectureSpec

__all__ = ["Gemma3Spec"]


class Gemma3Spec(ArchitectureSpec):
    """`Gemma3ForCausalLM`.

    What differs from Llama, and where it is handled:
      * norms compute `x * (1 + w)`: we only ever call the stock norm modules;
      * embeddings are scaled by `sqrt(hidden)`, pre/post feed-forward norms: stock code, untouched;
      * keys get `self_attn.k_norm` before rotary (`key_norm`), so the stacked one-matmul fill is not used;
      * sliding (`"sliding_attention"`) and global layers use different rotary tables: each layer is handed its
        own by the stock loop; the fill of deeper layers carries every table (`fill_position_embeddings`) and
        picks the layer's (`layer_position_embeddings`);
      * `final_logit_softcapping`: `tanh` softcap after the LM head (`finalize_logits`), in the logit lens too.
    """

    model_types = ("gemma3_text",)

    def key_norm(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn.k_norm

    def _types(self, model: nn.Module) -> list[str]:
        return sorted(set(model.config.layer_types))

    def position_embeddings(self, model, hidden, position_ids, layer=None):
        idx = 0 if layer is None else self.layer_index(layer)
        return self.base_decoder(model).rotary_emb(hidden, position_ids, self.layer_type(model, idx))

    def fill_position_embeddings(self, model, hidden, layer_kwargs):
        """Every layer type's (cos, sin), flattened to one tuple `(cos_a, sin_a, cos_b, sin_b, ...)` in sorted
        type order (a flat tuple of tensors, so row selections and beam reorders apply to it as to Llama's)."""
        position_ids = layer_kwargs.get("position_ids")
        if position_ids is None:
            return layer_kwargs.get("position_embeddings")
        rotary = self.base_decoder(model).rotary_emb
        return tuple(t for kind in self._types(model) for t in rotary(hidden, position_ids, kind))

    def layer_position_embeddings(self, model, layer, position_embeddings):
        types = self._types(model)
        if position_embeddings is None or len(position_embeddings) == 2:
            return position_embeddings  # the layer's own table (or the only one)
        i = types.index(self.layer_type(model, self.layer_index(layer)))
        return position_embeddings[2 * i], position_embeddings[2 * i + 1]

    def finalize_logits(self, model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap is None:
            return logits
        return torch.tanh(logits / cap) * cap
