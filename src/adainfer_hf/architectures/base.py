"""`ArchitectureSpec`: what the exit loop and the cache options need to know about one model family.

Each supported family has one subclass in its own module (`llama.py`, `opt.py`, `qwen.py`, `mistral.py`,
`gemma3.py`); `registry.spec_for(model_or_config)` picks it from `config.model_type`. The rest of the package never
branches on a family: it calls these methods (through the dispatchers of `architectures.core`).

The defaults describe a Llama-style pre-norm decoder (`model.model.layers`, `input_layernorm`, `self_attn.k_proj`
/ `v_proj`, rotary from `model.model.rotary_emb`, final `model.model.norm`); families override what differs.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import compat
from .devices import execution_device

__all__ = ["ArchitectureSpec", "FusedNorm"]


class FusedNorm:
    """How the stacked K/V fill normalises its input before the folded projection.

    Args:
        kind (`str`): `"rms"` (RMSNorm), `"layernorm"` (LayerNorm, bias folded into the projection bias) or
            `"none"` (the projection reads the raw hidden state).
        eps (`float`): the norm's epsilon.
        weight_offset (`float`): added to the norm weight before folding it (Gemma's `(1 + w)` RMSNorm: 1.0).
    """

    __slots__ = ("kind", "eps", "weight_offset")

    def __init__(self, kind: str, eps: float = 0.0, weight_offset: float = 0.0):
        self.kind, self.eps, self.weight_offset = kind, eps, weight_offset


class ArchitectureSpec:
    """Per-family knowledge, as methods (Llama-style defaults). Stateless: one shared instance per family."""

    model_types: tuple[str, ...] = ()
    rotary: bool = True  # keys carry rotary position embeddings (computed by the base decoder's `rotary_emb`)

    # ------------------------------------------------------------------ modules
    def base_decoder(self, model: nn.Module) -> nn.Module:
        """The module that owns the decoder loop (e.g. `LlamaModel`)."""
        return model.model

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers, in execution order."""
        return self.base_decoder(model).layers

    def num_layers(self, model: nn.Module) -> int:
        """Number of decoder layers (`L`)."""
        return int(model.config.num_hidden_layers)

    def layer_index(self, layer: nn.Module) -> int:
        """The 0-based index under which `layer` reads and writes the KV cache."""
        return int(layer.self_attn.layer_idx)

    def kv_projections(self, layer: nn.Module) -> tuple[nn.Module, nn.Module]:
        """The (key, value) projections of `layer` (residency/offload checks and the K/V fill)."""
        return layer.self_attn.k_proj, layer.self_attn.v_proj

    def kv_device(self, layer: nn.Module) -> torch.device:
        """Where `layer`'s K/V projection weights live (the device its K/V fill runs on)."""
        return self.kv_projections(layer)[0].weight.device

    def kv_weights_resident(self, layer: nn.Module) -> bool:
        """Whether `layer`'s K/V weights are loaded (accelerate keeps offloaded ones on `meta` outside its call)."""
        return all(p.weight.device.type != "meta" for p in self.kv_projections(layer))

    def attention_input_norm(self, layer: nn.Module) -> nn.Module | None:
        """The norm applied to a layer's input before its K/V projections (None: the raw hidden state)."""
        return layer.input_layernorm

    def key_norm(self, layer: nn.Module) -> nn.Module | None:
        """A per-head norm applied to keys after the projection, before rotary (Qwen3, Gemma3 `k_norm`)."""
        return None

    def sublayers(self, layer: nn.Module) -> tuple[nn.Module, nn.Module]:
        """The (attention, MLP) modules whose outputs the `cos_attn` / `cos_mlp` features compare."""
        return layer.self_attn, layer.mlp

    def sublayer_output(self, output: torch.Tensor, n_rows: int) -> torch.Tensor:
        """A sublayer's output as [rows, T, H] (some families run their MLP on flattened [rows*T, H])."""
        return output

    # ------------------------------------------------------------------ the exit head (logit lens)
    def final_modules(self, model: nn.Module) -> list[nn.Module]:
        """What runs after the last decoder layer, before the LM head, in order (absent modules left out)."""
        return [self.base_decoder(model).norm]

    def exit_norm(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Applies `final_modules` to `hidden`."""
        for module in self.final_modules(model):
            hidden = module(hidden)
        return hidden

    def finalize_logits(self, model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
        """What the stock causal LM applies to the LM head's output (Gemma3: final logit softcapping)."""
        return logits

    def exit_head_device(self, model: nn.Module) -> torch.device:
        """Device of the exit check: where the first final module (else the LM head) computes."""
        modules = self.final_modules(model)
        return execution_device(modules[0] if modules else model.get_output_embeddings())

    # ------------------------------------------------------------------ positions and attention layout
    def position_embeddings(self, model: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor,
                            layer: nn.Module | None = None):
        """The position input decoder layer `layer` (default: the first) receives: rotary (cos, sin)."""
        return self.base_decoder(model).rotary_emb(hidden, position_ids=position_ids)

    def fill_position_embeddings(self, model: nn.Module, hidden: torch.Tensor, layer_kwargs: dict):
        """The position input the K/V fill of *deeper* layers needs, from the current layer's kwargs.

        One rotary table for every layer here: the current layer's. (Gemma3 overrides: two tables.)
        """
        return layer_kwargs.get("position_embeddings")

    def layer_type(self, model: nn.Module, layer_idx: int) -> str:
        """`"full_attention"` or `"sliding_attention"` (from `config.layer_types` when the family has them)."""
        types = getattr(model.config, "layer_types", None)
        return types[layer_idx] if types else "full_attention"

    def sliding_window(self, model: nn.Module, layer_idx: int) -> int | None:
        """The attention window of layer `layer_idx` (None: full causal attention)."""
        if self.layer_type(model, layer_idx) == "sliding_attention":
            return getattr(model.config, "sliding_window", None)
        return None

    # ------------------------------------------------------------------ K/V of skipped layers
    def layer_kv_states(self, model: nn.Module, layer: nn.Module, hidden: torch.Tensor, position_embeddings=None):
        """Key/value states `layer` would cache for input `hidden` [B, T, H]: input norm, K/V projections (with
        their biases), key norm, rotary. Returns [B, kv_heads, T, head_dim] each, as the attention passes them to
        `Cache.update`."""
        norm = self.attention_input_norm(layer)
        x = hidden if norm is None else norm(hidden)
        k_proj, v_proj = self.kv_projections(layer)
        shape = (*x.shape[:-1], -1, layer.self_attn.head_dim)
        key = k_proj(x).view(shape).transpose(1, 2)
        value = v_proj(x).view(shape).transpose(1, 2)
        k_norm = self.key_norm(layer)
        if k_norm is not None:
            key = k_norm(key)
        if self.rotary:
            key = compat.rotate_keys(key, *self.layer_position_embeddings(model, layer, position_embeddings))
        return key, value

    def layer_position_embeddings(self, model: nn.Module, layer: nn.Module, position_embeddings):
        """The (cos, sin) of `layer` among what `fill_position_embeddings` produced (here: the same table)."""
        return position_embeddings

    def fused_norm(self, model: nn.Module) -> FusedNorm | None:
        """How the stacked fill normalises (None: no stacked fill, layer-by-layer instead)."""
        norm = self.attention_input_norm(self.decoder_layers(model)[0])
        return FusedNorm("rms", compat.rms_norm_eps(norm))

    def can_stack(self, model: nn.Module) -> bool:
        """Whether every layer's K/V fill folds into one stacked matmul + one rotary op."""
        return self.fused_norm(model) is not None and all(
            self.key_norm(layer) is None for layer in self.decoder_layers(model))
