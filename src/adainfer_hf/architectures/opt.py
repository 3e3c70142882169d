"""OPT: learned positions (no rotary), pre- or post-LN layers, optional final LayerNorm and `project_out`."""

from __future__ import annotations

import torch
from torch import nn

from .base import ArchitectureSpec, FusedNorm

__all__ = ["OPTSpec"]


class OPTSpec(ArchitectureSpec):
    """`OPTForCausalLM` (`do_layer_norm_before=False` for OPT-350m; `word_embed_proj_dim != hidden_size` adds
    `project_out`)."""

    model_types = ("opt",)
    rotary = False

    def base_decoder(self, model: nn.Module) -> nn.Module:
        return model.model.decoder

    def attention_input_norm(self, layer: nn.Module) -> nn.Module | None:
        return layer.self_attn_layer_norm if layer.do_layer_norm_before else None

    def sublayers(self, layer: nn.Module) -> tuple[nn.Module, nn.Module]:
        return layer.self_attn, layer.fc2

    def sublayer_output(self, output: torch.Tensor, n_rows: int) -> torch.Tensor:
        # OPT's fc2 runs on the flattened [rows*T, H]
        return output.view(n_rows, -1, output.shape[-1]) if output.dim() == 2 else output

    def final_modules(self, model: nn.Module) -> list[nn.Module]:
        base = self.base_decoder(model)
        return [m for m in (base.final_layer_norm, base.project_out) if m is not None]

    def position_embeddings(self, model, hidden, position_ids, layer=None):
        return None  # learned positions were added to the embeddings before the first layer

    def fused_norm(self, model: nn.Module) -> FusedNorm:
        norm = self.attention_input_norm(self.decoder_layers(model)[0])
        return FusedNorm("none") if norm is None else FusedNorm("layernorm", norm.eps)
