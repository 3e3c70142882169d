"""The architecture helpers the rest of the package calls: thin dispatchers to the model's `ArchitectureSpec`.

The rest of the package is architecture-free: it asks this module for the decoder layers, the "exit head"
(final norm + optional projection + LM head [+ softcap], i.e. the logit lens) and how to compute a layer's
key/value states from a hidden state (used to fill the KV cache of layers a token skipped). What a family does is
in its spec (`llama.py`, `opt.py`, `qwen.py`, `mistral.py`, `gemma3.py`); `registry.spec_for` picks it.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from .. import compat
from .base import ArchitectureSpec
from .devices import execution_device, execution_dtype, materialized_weight
from .registry import SPECS, SUPPORTED_MODEL_TYPES, spec_for

__all__ = [
    "SPECS",
    "SUPPORTED_MODEL_TYPES",
    "ArchitectureSpec",
    "spec_for",
    "fill_position_embeddings",
    "head_logits",
    "head_width",
    "kv_device",
    "kv_projections",
    "kv_weights_resident",
    "layer_index",
    "layer_type",
    "sliding_window",
    "sublayer_output",
    "check_supported",
    "base_decoder",
    "decoder_layers",
    "num_layers",
    "exit_head_device",
    "execution_device",
    "execution_dtype",
    "exit_logits",
    "exit_norm",
    "layer_sublayers",
    "lm_head_fingerprint",
    "fingerprints_match",
    "layer_kv_states",
    "stacked_kv_states",
    "position_embeddings",
]

def check_supported(model: nn.Module) -> str:
    """Returns the model type of `model`, or raises `NotImplementedError` for architectures we do not know."""
    spec_for(model)
    return model.config.model_type


def base_decoder(model: nn.Module) -> nn.Module:
    """The module that owns the decoder loop (`LlamaModel`, `OPTDecoder`, `Gemma3TextModel`, ...)."""
    return spec_for(model).base_decoder(model)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM, in execution order."""
    return spec_for(model).decoder_layers(model)


def num_layers(model: nn.Module) -> int:
    """Number of decoder layers (`L`)."""
    return spec_for(model).num_layers(model)


def layer_index(model: nn.Module, layer: nn.Module) -> int:
    """The 0-based cache index of decoder layer `layer`."""
    return spec_for(model).layer_index(layer)


def kv_projections(model: nn.Module, layer: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The (key, value) projection modules of `layer`."""
    return spec_for(model).kv_projections(layer)


def kv_weights_resident(model: nn.Module, layer: nn.Module) -> bool:
    """Whether `layer`'s K/V projection weights are materialised (not offloaded to the meta device)."""
    return all(p.weight.device.type != "meta" for p in kv_projections(model, layer))


def kv_device(model: nn.Module, layer: nn.Module) -> torch.device:
    """Where `layer`'s K/V projections compute."""
    return kv_projections(model, layer)[0].weight.device


def layer_type(model: nn.Module, layer_idx: int) -> str:
    """`"full_attention"` or `"sliding_attention"` for layer `layer_idx` (0-based)."""
    return spec_for(model).layer_type(model, layer_idx)


def sliding_window(model: nn.Module, layer_idx: int) -> int | None:
    """Attention window of layer `layer_idx` (None: full causal attention)."""
    return spec_for(model).sliding_window(model, layer_idx)


def exit_norm(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Applies what the model applies after its last decoder layer, before the LM head.

    Llama-style: the final norm. OPT: `final_layer_norm` when present (absent with `do_layer_norm_before=False`,
    OPT-350m), then `project_out` when `word_embed_proj_dim != hidden_size`.
    """
    return spec_for(model).exit_norm(model, hidden)


def head_logits(model: nn.Module, normed: torch.Tensor) -> torch.Tensor:
    """The stock head on final-normed hidden states: LM head, then what the family applies after it (softcap)."""
    return spec_for(model).finalize_logits(model, model.get_output_embeddings()(normed))


def exit_logits(model: nn.Module, hidden: torch.Tensor, dtype: torch.dtype | None = None,
                vocabulary: torch.Tensor | None = None) -> torch.Tensor:
    """The logit lens: LM-head logits of intermediate hidden states `hidden` [..., hidden_size].

    `hidden` is moved to the device of the final norm; the result lives on the LM head's device. With `dtype`
    (e.g. `torch.bfloat16` on an fp32 model) the head runs on a cached copy of its weight in that dtype. With
    `vocabulary` (a LongTensor of K token ids on the head's device) only those tokens' logits are computed
    ([..., K], in that order), from a cached copy of their rows of the head weight.
    """
    spec = spec_for(model)
    head = model.get_output_embeddings()
    hidden = hidden.to(exit_head_device(model))
    normed = spec.exit_norm(model, hidden).to(execution_device(head))
    weight = materialized_weight(head)
    if vocabulary is not None:
        rows, bias = _head_rows(model, head, weight, dtype or weight.dtype, vocabulary)
        return spec.finalize_logits(model, nn.functional.linear(normed.to(rows.dtype), rows, bias))
    if dtype is None or dtype == weight.dtype:
        return spec.finalize_logits(model, head(normed))
    logits = nn.functional.linear(normed.to(dtype), _head_weight_as(model, weight, dtype), _bias_as(head, dtype))
    return spec.finalize_logits(model, logits)


def _head_rows(model: nn.Module, head: nn.Module, weight: torch.Tensor, dtype: torch.dtype,
               vocabulary: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The head weight's (and bias') rows of `vocabulary` in `dtype`, gathered once and kept (outside the state
    dict) until the weight, the dtype or the vocabulary tensor changes."""
    key = (dtype, weight.device, weight.data_ptr(), weight._version)
    cached = model.__dict__.get("_adainfer_head_rows")
    if cached is None or cached[0] != key or cached[1] is not vocabulary:
        index = vocabulary.to(weight.device)
        rows = weight.detach().index_select(0, index).to(dtype).contiguous()
        bias = getattr(head, "bias", None)
        bias = None if bias is None else bias.detach().index_select(0, index).to(dtype)
        cached = (key, vocabulary, rows, bias)  # (the vocabulary is held, so its identity stays unique)
        model.__dict__["_adainfer_head_rows"] = cached
    return cached[2], cached[3]


def head_width(model: nn.Module) -> int:
    """Number of logits the LM head produces (its output rows; may exceed `tokenizer.vocab_size`)."""
    return int(materialized_weight(model.get_output_embeddings()).shape[0])


def _head_weight_as(model: nn.Module, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The LM head weight in `dtype`, converted once and kept (outside the state dict) until the weight changes."""
    key = (dtype, weight.device, weight.data_ptr(), weight._version)
    cached = model.__dict__.get("_adainfer_head_copy")
    if cached is None or cached[0] != key:
        cached = (key, weight.detach().to(dtype))
        model.__dict__["_adainfer_head_copy"] = cached
    return cached[1]


def _bias_as(head: nn.Module, dtype: torch.dtype):
    bias = getattr(head, "bias", None)
    return None if bias is None else bias.to(dtype)


def exit_head_device(model: nn.Module) -> torch.device:
    """Device on which the exit check runs: where the final norm lives (the LM head is next to it)."""
    return spec_for(model).exit_head_device(model)


def layer_sublayers(model: nn.Module, layer: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The (attention, MLP) sub-modules of a decoder layer whose outputs the `cos_attn`/`cos_mlp` features use."""
    return spec_for(model).sublayers(layer)


def sublayer_output(model: nn.Module, output: torch.Tensor, n_rows: int) -> torch.Tensor:
    """A sublayer's output (from `layer_sublayers`) as [rows, T, H]."""
    return spec_for(model).sublayer_output(output, n_rows)


def layer_kv_states(
    model: nn.Module,
    layer: nn.Module,
    hidden: torch.Tensor,
    position_embeddings=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key/value states that `layer` would cache for input hidden states `hidden` [B, T, H].

    This is the attention block's K/V path only (input norm, projections with biases, key norm, rotary; no
    attention, no MLP). It fills the cache of layers a token skipped from its exit hidden state (CALM's state
    propagation). `position_embeddings` is the layer's own (cos, sin) or what `fill_position_embeddings` returned.
    Returns tensors shaped as the layer's attention module passes them to `Cache.update`:
    [B, num_kv_heads, T, head_dim].
    """
    return spec_for(model).layer_kv_states(model, layer, hidden, position_embeddings)


def fill_position_embeddings(model: nn.Module, hidden: torch.Tensor, layer_kwargs: dict):
    """What the K/V fill of the layers deeper than the current one needs as `position_embeddings`, from the
    current layer's kwargs (its own table, or every table when layer types use different ones: Gemma3)."""
    return spec_for(model).fill_position_embeddings(model, hidden, layer_kwargs)


def stacked_kv_states(model: nn.Module, hidden: torch.Tensor, first: int, position_embeddings=None):
    """K/V states of layers `first`..L-1 (0-based) for the same input `hidden` [B, T, H], in one matmul.

    When every row has exited, all remaining layers' caches are filled from the same frozen hidden state. Their
    input norms and K/V projections fold into one stacked weight (norm weight into the projection, LayerNorm bias
    into the projection bias), so the fill costs one matmul and one rotary op instead of ~6 ops per layer; it
    matters most in decode, where those ops are launch/overhead-bound. The stacked weight is built once (a copy
    of the K/V projection weights, kept outside the state dict). Families whose fill does not fold (a key norm:
    Qwen3, Gemma3) get the per-layer K/V. Returns a list of (key, value) per layer, shaped as `layer_kv_states`,
    or None when the layers do not all sit, materialised, on `hidden`'s device.
    """
    spec = spec_for(model)
    layers = spec.decoder_layers(model)[first:]
    if not spec.can_stack(model):
        if any(kv_device(model, layer) != hidden.device for layer in layers):
            return None
        return [spec.layer_kv_states(model, layer, hidden, position_embeddings) for layer in layers]
    fused = _fused_kv(model, spec, hidden.device)
    if fused is None:
        return None
    weight, bias, kv_dim, head_dim, norm = fused
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
    return [(keys[:, i * heads:(i + 1) * heads], values[:, i * heads:(i + 1) * heads]) for i in range(len(layers))]


def _fused_kv(model: nn.Module, spec, device: torch.device):
    """(weight [L*2*kv, H], bias or None, kv_dim, head_dim, FusedNorm), cached until a weight changes."""
    layers = spec.decoder_layers(model)
    projs = [spec.kv_projections(layer) for layer in layers]
    if any(type(m) is not nn.Linear for pair in projs for m in pair):
        return None  # wrapped projections (PEFT LoRA, quantized, hooked): the per-layer fill calls the real modules
    tensors = [m.weight for pair in projs for m in pair]
    if any(t.device != device for t in tensors):
        return None  # split across devices or offloaded: fill layer by layer
    # The key covers every tensor the fused weight is made from (projections' weights and biases, input norms'
    # weights and biases), so an in-place edit of any of them rebuilds it.
    made_from = tensors + [m.bias for pair in projs for m in pair] + [
        getattr(spec.attention_input_norm(layer), name, None) for layer in layers for name in ("weight", "bias")]
    key = tuple((id(t), t.data_ptr(), t._version) for t in made_from if isinstance(t, torch.Tensor))
    cached = model.__dict__.get("_adainfer_fused_kv")
    if cached is not None and cached[0] == key:
        return cached[1]
    norm = spec.fused_norm(model)
    weights, biases = [], []
    with torch.no_grad():
        for layer, (k_proj, v_proj) in zip(layers, projs, strict=True):
            module = spec.attention_input_norm(layer)
            scale = None
            if norm.kind != "none" and getattr(module, "weight", None) is not None:
                scale = module.weight + norm.weight_offset if norm.weight_offset else module.weight
            shift = getattr(module, "bias", None) if norm.kind == "layernorm" else None
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
    head_dim = layers[0].self_attn.head_dim
    value = (torch.cat(weights), bias, projs[0][0].weight.shape[0], head_dim, norm)
    model.__dict__["_adainfer_fused_kv"] = (key, value)
    return value


def position_embeddings(model: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor,
                        layer: nn.Module | None = None):
    """The position input decoder layer `layer` (default: the first) receives for `hidden` at `position_ids`:
    rotary (cos, sin) of that layer's type; None for OPT, whose learned positions were added to the embeddings
    before the first layer."""
    return spec_for(model).position_embeddings(model, hidden, position_ids, layer)


def lm_head_fingerprint(model: nn.Module, n_samples: int = 256) -> dict:
    """A dtype-robust fingerprint of the LM head: its shape and a fixed sample of its weights.

    The sample (every k-th element of the flattened weight, as float32 rounded to 4 decimals) lets
    `fingerprints_match` compare an fp32 and a bf16 load of the same checkpoint with a tolerance, while a
    different head (another model, another fine-tune) fails. `sha256` hashes the sample for display.
    """
    weight = materialized_weight(model.get_output_embeddings())
    flat = weight.detach().reshape(-1)
    step = max(1, flat.numel() // n_samples)
    idx = torch.arange(0, step * n_samples, step, device=flat.device)[:n_samples].clamp_max(flat.numel() - 1)
    sample = [round(float(v), 4) for v in flat[idx].float().cpu()]
    digest = hashlib.sha256(repr((list(weight.shape), sample)).encode()).hexdigest()[:16]
    return {"shape": list(weight.shape), "sample": sample, "sha256": digest}


def fingerprints_match(a: dict, b: dict, rtol: float = 2e-2, atol: float = 2e-3) -> bool:
    """True when two `lm_head_fingerprint`s describe the same head, up to half-precision rounding."""
    if list(a.get("shape", [])) != list(b.get("shape", [])):
        return False
    sa = torch.tensor(a.get("sample", []), dtype=torch.float64)
    sb = torch.tensor(b.get("sample", []), dtype=torch.float64)
    return sa.shape == sb.shape and bool(torch.allclose(sa, sb, rtol=rtol, atol=atol))
