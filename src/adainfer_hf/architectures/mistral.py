"""Mistral: the Llama layout, every layer attending within `config.sliding_window` (when set)."""

from __future__ import annotations

from torch import nn

from .base import ArchitectureSpec

__all__ = ["MistralSpec"]


class MistralSpec(ArchitectureSpec):
    """`MistralForCausalLM`: one window for all layers (`MistralModel` builds one sliding-window mask when
    `config.sliding_window` is set, a causal one otherwise)."""

    model_types = ("mistral",)

    def layer_type(self, model: nn.Module, layer_idx: int) -> str:
        return "full_attention" if getattr(model.config, "sliding_window", None) is None else "sliding_attention"
