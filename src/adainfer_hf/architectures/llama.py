"""Llama (and the Llama-layout SmolLM2): the defaults of `ArchitectureSpec`."""

from __future__ import annotations

from .base import ArchitectureSpec

__all__ = ["LlamaSpec"]


class LlamaSpec(ArchitectureSpec):
    """`LlamaForCausalLM`: pre-norm RMSNorm layers, rotary keys, final `model.norm`, no sliding window."""

    model_types = ("llama",)
