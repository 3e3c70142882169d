"""Qwen2 (q/k/v biases, optional sliding-window layers) and Qwen3 (per-head `q_norm` / `k_norm`)."""

from __future__ import annotations

from torch import nn

from .base import ArchitectureSpec

__all__ = ["Qwen2Spec", "Qwen3Spec"]


class Qwen2Spec(ArchitectureSpec):
    """`Qwen2ForCausalLM`: Llama layout with biased q/k/v projections (the K/V fill and the stacked fill include
    the biases: `kv_projections` are the biased modules). With `use_sliding_window` the layers
    `config.layer_types` marks `"sliding_attention"` attend within `sliding_window` (masks and caches of that
    type come from transformers; `sliding_window` tells the exact cache option which mask to build)."""

    model_types = ("qwen2",)


class Qwen3Spec(Qwen2Spec):
    """`Qwen3ForCausalLM`: as Qwen2, plus RMSNorm on each key head before rotary (`self_attn.k_norm`)."""

    model_types = ("qwen3",)

    def key_norm(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn.k_norm
