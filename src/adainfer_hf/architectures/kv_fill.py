"""`KVFill`: the K/V states of the layers a token skipped, all deeper layers in one stacked matmul.

Owned by the AdaInfer model (`model.kv_fill`, built in its setup). Its fused weight (every layer's input norm folded
into its K/V projections) is a kept copy that follows the rule of `architectures.copies`.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import compat
from .base import ArchitectureSpec
from .copies import WeightCopies, column_sample, identity_key, same_bits, weight_call
from .registry import spec_for

__all__ = ["KVFill", "kv_fill_of"]


def kv_fill_of(model: nn.Module) -> KVFill:
    """`model.kv_fill` of an AdaInfer model; a fresh (uncached) `KVFill` of any other supported model."""
    fill = getattr(model, "kv_fill", None)
    return fill if isinstance(fill, KVFill) else KVFill(model)


class KVFill:
    """The stacked K/V fill of one model.

    Args:
        model (`PreTrainedModel`): a causal LM of a supported family.
        spec (`ArchitectureSpec`, *optional*): its family's spec (default: looked up once, here).
    """

    def __init__(self, model: nn.Module, spec: ArchitectureSpec | None = None):
        self.model = model
        self.spec = spec if spec is not None else spec_for(model)
        self._copies = WeightCopies()

    def __getstate__(self):
        return {"model": self.model, "spec": self.spec}

    def __setstate__(self, state):
        self.__init__(state["model"], state["spec"])

    def refresh(self) -> None:
        """Drops the fused weight (the next fill rebuilds it)."""
        self._copies.drop()

    session = staticmethod(weight_call)

    def stacked(self, hidden: torch.Tensor, first: int, position_embeddings=None):
        """K/V states of layers `first`..L-1 (0-based) for the same input `hidden` [B, T, H], in one matmul.

        When every row has exited, all remaining layers' caches are filled from the same frozen hidden state. Their
        input norms and K/V projections fold into one stacked weight (norm weight into the projection, LayerNorm
        bias into the projection bias), so the fill costs one matmul and one rotary op instead of ~6 ops per layer;
        it matters most in decode, where those ops are launch/overhead-bound. Families whose fill does not fold (a
        key norm: Qwen3, Gemma3) get the per-layer K/V. Returns a list of (key, value) per layer, shaped as
        `ArchitectureSpec.layer_kv_states`, or None when the layers do not all sit, materialised, on `hidden`'s
        device.
        """
        model, spec = self.model, self.spec
        layers = spec.decoder_layers(model)[first:]
        if not spec.can_stack(model):
            if any(spec.kv_projections(layer)[0].weight.device != hidden.device for layer in layers):
                return None
            return [spec.layer_kv_states(model, layer, hidden, position_embeddings) for layer in layers]
        fused = self.fused(hidden.device)
        if fused is None:
            return None
        weight, bias, kv_dim, head_dim, norm, _ = fused
        rows = slice(first * 2 * kv_dim, None)
        x = hidden
        if norm.kind == "rms":
            h32 = hidden.float()
            x = (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + norm.eps)).to(hidden.dtype)
        elif norm.kind == "layernorm":
            x = nn.functional.layer_norm(hidden, (hidden.shape[-1],), None, None, norm.eps)
        kv = nn.functional.linear(x, weight[rows], None if bias is None else bias[rows])
        kv = kv.view(*hidden.shape[:2], len(layers), 2, -1, head_dim)  # [B, T, layers, k/v, heads, D]
        keys = kv[:, :, :, 0].flatten(2, 3).transpose(1, 2)  # [B, layers*heads, T, D]
        values = kv[:, :, :, 1].flatten(2, 3).transpose(1, 2)
        if spec.rotary:
            keys = compat.rotate_keys(keys, *spec.layer_position_embeddings(model, layers[0], position_embeddings))
        heads = kv_dim // head_dim
        return [(keys[:, i * heads:(i + 1) * heads], values[:, i * heads:(i + 1) * heads])
                for i in range(len(layers))]

    # ------------------------------------------------------------------ the fused weight
    def _sources(self):
        """Per layer: (k_proj, v_proj, input norm) and the FusedNorm."""
        spec, model = self.spec, self.model
        layers = spec.decoder_layers(model)
        return [(*spec.kv_projections(layer), spec.attention_input_norm(layer)) for layer in layers]

    def _scale_shift(self, module, norm):
        scale = None
        if norm.kind != "none" and getattr(module, "weight", None) is not None:
            scale = module.weight + norm.weight_offset if norm.weight_offset else module.weight
        shift = getattr(module, "bias", None) if norm.kind == "layernorm" else None
        return scale, shift

    def fused(self, device: torch.device):
        """(weight [L*2*kv, H], bias or None, kv_dim, head_dim, FusedNorm, small sources) kept until a source
        changes; None when a projection is wrapped (PEFT, quantized: the per-layer fill calls the real modules) or
        the layers are not all on `device`."""
        sources = self._sources()
        projs = [m for k, v, _ in sources for m in (k, v)]
        if any(type(m) is not nn.Linear for m in projs):
            return None
        if any(m.weight.device != device for m in projs):
            return None  # split across devices or offloaded: fill layer by layer
        norms = [n for _, _, n in sources]
        small = [p.bias for p in projs] + [getattr(n, name, None) for n in norms for name in ("weight", "bias")]
        key = identity_key([p.weight for p in projs] + small, projs + [n for n in norms if n is not None])
        return self._copies.get("fused", key, lambda: self._build(sources, small),
                                lambda value, column: self._matches(value, column, sources, small))

    def _build(self, sources, small):
        norm = self.spec.fused_norm(self.model)
        weights, biases = [], []
        with torch.no_grad():
            for k_proj, v_proj, module in sources:
                scale, shift = self._scale_shift(module, norm)
                for proj in (k_proj, v_proj):
                    w = proj.weight if scale is None else proj.weight * scale[None, :]
                    b = proj.bias
                    if shift is not None:
                        b = proj.weight @ shift + (0 if b is None else b)
                    weights.append(w)
                    biases.append(b)
            bias = None if all(b is None for b in biases) else torch.cat(
                [torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) if b is None else b
                 for w, b in zip(weights, biases, strict=True)])
            snapshot = [None if t is None else t.detach().clone() for t in small]
        head_dim = self.spec.decoder_layers(self.model)[0].self_attn.head_dim
        return torch.cat(weights), bias, sources[0][0].weight.shape[0], head_dim, norm, snapshot

    def _matches(self, value, column, sources, small) -> bool:
        """The sampled content check: one element per fused row (rotating column) recomputed from the
        projections, and the small sources (biases, norm weights) compared in full with their snapshot."""
        weight, norm, snapshot = value[0], value[4], value[5]
        for now, then in zip(small, snapshot, strict=True):
            if (now is None) != (then is None) or (now is not None and not same_bits(now.detach(), then)):
                return False
        column %= weight.shape[1]
        parts = []
        with torch.no_grad():
            for k_proj, v_proj, module in sources:
                scale, _ = self._scale_shift(module, norm)
                for proj in (k_proj, v_proj):
                    sample = proj.weight[:, column]
                    parts.append(sample if scale is None else sample * scale[column])
        return same_bits(column_sample(weight, None, column), torch.cat(parts))
