"""Everything adainfer_hf knows about specific architectures lives here.

The rest of the package is architecture-free: it asks this module for the decoder layers, the "exit head"
(final norm + optional projection + LM head, i.e. the logit lens) and how to compute a layer's key/value
states from a hidden state (used to fill the KV cache of layers a token skipped).
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from .. import compat

__all__ = [
    "SUPPORTED_MODEL_TYPES",
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

SUPPORTED_MODEL_TYPES = ("llama", "opt")


def check_supported(model: nn.Module) -> str:
    """Returns the model type of `model`, or raises `NotImplementedError` for architectures we do not know."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(
            f"adainfer_hf supports model types {SUPPORTED_MODEL_TYPES}; got model_type={model_type!r}."
        )
    return model_type


def base_decoder(model: nn.Module) -> nn.Module:
    """The module that owns the decoder loop (`LlamaModel` or `OPTDecoder`)."""
    model_type = check_supported(model)
    if model_type == "llama":
        return model.model
    return model.model.decoder


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM, in execution order."""
    return base_decoder(model).layers


def num_layers(model: nn.Module) -> int:
    """Number of decoder layers (`L`)."""
    return int(model.config.num_hidden_layers)


def exit_norm(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Applies what the model applies after its last decoder layer, before the LM head.

    Llama: the final RMSNorm. OPT: `final_layer_norm` when present (absent with `do_layer_norm_before=False`,
    OPT-350m), then `project_out` when `word_embed_proj_dim != hidden_size`.
    """
    base = base_decoder(model)
    if check_supported(model) == "llama":
        return base.norm(hidden)
    if base.final_layer_norm is not None:
        hidden = base.final_layer_norm(hidden)
    if base.project_out is not None:
        hidden = base.project_out(hidden)
    return hidden


def exit_logits(model: nn.Module, hidden: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The logit lens: LM-head logits of intermediate hidden states `hidden` [..., hidden_size].

    `hidden` is moved to the device of the final norm; the result lives on the LM head's device. With `dtype`
    (e.g. `torch.bfloat16` on an fp32 model) the head runs on a cached copy of its weight in that dtype.
    """
    head = model.get_output_embeddings()
    hidden = hidden.to(exit_head_device(model))
    normed = exit_norm(model, hidden).to(execution_device(head))
    weight = _materialized_weight(head)
    if dtype is None or dtype == weight.dtype:
        return head(normed)
    return nn.functional.linear(normed.to(dtype), _head_weight_as(model, weight, dtype), _bias_as(head, dtype))


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


def execution_device(module: nn.Module) -> torch.device:
    """Where `module` computes: its weights' device, or accelerate's execution device when offloaded."""
    device = compat.offload_execution_device(module)
    return device if device is not None else next(module.parameters()).device


def execution_dtype(module: nn.Module) -> torch.dtype:
    """The dtype `module` computes in (its weight's, also when offloaded)."""
    return _materialized_weight(module).dtype


def exit_head_device(model: nn.Module) -> torch.device:
    """Device on which the exit check runs: where the final norm lives (the LM head is next to it)."""
    base = base_decoder(model)
    if check_supported(model) == "llama":
        return execution_device(base.norm)
    for module in (base.final_layer_norm, base.project_out):
        if module is not None:
            return execution_device(module)
    return execution_device(model.get_output_embeddings())


def _materialized_weight(module: nn.Module) -> torch.Tensor:
    """`module.weight`, read from accelerate's offload map when it sits on the meta device."""
    weight = module.weight
    if weight.device.type == "meta":
        weights_map = compat.offload_weights_map(module)
        if weights_map is not None:
            return weights_map["weight"]
    return weight


def layer_sublayers(model: nn.Module, layer: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The (attention, MLP) sub-modules of a decoder layer whose outputs the `cos_attn`/`cos_mlp` features use."""
    if check_supported(model) == "llama":
        return layer.self_attn, layer.mlp
    return layer.self_attn, layer.fc2


def layer_kv_states(
    model: nn.Module,
    layer: nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key/value states that `layer` would cache for input hidden states `hidden` [B, T, H].

    This is the attention block's K/V projection only (no attention, no MLP). It fills the cache of layers a
    token skipped from its exit hidden state (CALM's state propagation). Returns tensors shaped as the
    layer's attention module passes them to `Cache.update`: [B, num_kv_heads, T, head_dim].
    """
    attn = layer.self_attn
    if check_supported(model) == "llama":
        x = layer.input_layernorm(hidden)
        shape = (*x.shape[:-1], -1, attn.head_dim)
        key = attn.k_proj(x).view(shape).transpose(1, 2)
        value = attn.v_proj(x).view(shape).transpose(1, 2)
        return compat.rotate_keys(key, *position_embeddings), value
    x = layer.self_attn_layer_norm(hidden) if layer.do_layer_norm_before else hidden
    shape = (*x.shape[:-1], -1, attn.head_dim)
    key = attn.k_proj(x).view(shape).transpose(1, 2)
    value = attn.v_proj(x).view(shape).transpose(1, 2)
    return key, value


def stacked_kv_states(model: nn.Module, hidden: torch.Tensor, first: int, position_embeddings=None):
    """K/V states of layers `first`..L-1 (0-based) for the same input `hidden` [B, T, H], in one matmul.

    When every row has exited, all remaining layers' caches are filled from the same frozen hidden state. Their
    input norms and K/V projections fold into one stacked weight (norm weight into the projection, LayerNorm bias
    into the projection bias), so the fill costs one matmul and one rotary op instead of ~6 ops per layer; it
    matters most in decode, where those ops are launch/overhead-bound. The stacked weight is built once (a copy
    of the K/V projection weights, kept outside the state dict). Returns a list of (key, value) per layer, shaped
    as `layer_kv_states`, or None when the layers do not all sit, materialised, on `hidden`'s device.
    """
    layers = decoder_layers(model)[first:]
    fused = _fused_kv(model, hidden.device)
    if fused is None:
        return None
    weight, bias, kv_dim, head_dim, kind = fused
    rows = slice(first * 2 * kv_dim, None)
    x = hidden
    if kind == "rms":
        eps = compat.rms_norm_eps(layers[0].input_layernorm)
        h32 = hidden.float()
        x = (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)).to(hidden.dtype)
    elif kind == "layernorm":
        ln = layers[0].self_attn_layer_norm
        x = nn.functional.layer_norm(hidden, ln.normalized_shape, None, None, ln.eps)
    kv = nn.functional.linear(x, weight[rows], None if bias is None else bias[rows])
    kv = kv.view(*hidden.shape[:2], len(layers), 2, -1, head_dim)  # [B, T, layers, k/v, heads, D]
    keys = kv[:, :, :, 0].flatten(2, 3).transpose(1, 2)  # [B, layers*heads, T, D]
    values = kv[:, :, :, 1].flatten(2, 3).transpose(1, 2)
    if kind == "rms":
        keys = compat.rotate_keys(keys, *position_embeddings)
    heads = kv_dim // head_dim
    return [(keys[:, i * heads:(i + 1) * heads], values[:, i * heads:(i + 1) * heads]) for i in range(len(layers))]


def _fused_kv(model: nn.Module, device: torch.device):
    """(weight [L*2*kv, H], bias or None, kv_dim, head_dim, norm kind), cached until a weight changes."""
    layers = decoder_layers(model)
    projs = [(layer.self_attn.k_proj, layer.self_attn.v_proj) for layer in layers]
    tensors = [m.weight for pair in projs for m in pair]
    if any(t.device != device for t in tensors):
        return None  # split across devices or offloaded: fill layer by layer
    key = tuple((t.data_ptr(), t._version) for t in tensors)
    cached = model.__dict__.get("_adainfer_fused_kv")
    if cached is not None and cached[0] == key:
        return cached[1]
    llama = check_supported(model) == "llama"
    if llama:
        kind = "rms"
    else:
        kind = "layernorm" if layers[0].do_layer_norm_before else "none"
    weights, biases = [], []
    with torch.no_grad():
        for layer, (k_proj, v_proj) in zip(layers, projs, strict=True):
            norm = layer.input_layernorm if llama else layer.self_attn_layer_norm
            scale = norm.weight if kind != "none" and norm.weight is not None else None
            shift = getattr(norm, "bias", None) if kind == "layernorm" else None
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
    value = (torch.cat(weights), bias, projs[0][0].weight.shape[0], head_dim, kind)
    model.__dict__["_adainfer_fused_kv"] = (key, value)
    return value


def position_embeddings(model: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor):
    """The per-layer position inputs for `hidden` at `position_ids`: Llama's rotary (cos, sin); None for OPT,
    whose learned positions were added to the embeddings before the first layer."""
    if check_supported(model) == "llama":
        return base_decoder(model).rotary_emb(hidden, position_ids=position_ids)
    return None


def lm_head_fingerprint(model: nn.Module, n_samples: int = 256) -> dict:
    """A dtype-robust fingerprint of the LM head: its shape and a fixed sample of its weights.

    The sample (every k-th element of the flattened weight, as float32 rounded to 4 decimals) lets
    `fingerprints_match` compare an fp32 and a bf16 load of the same checkpoint with a tolerance, while a
    different head (another model, another fine-tune) fails. `sha256` hashes the sample for display.
    """
    weight = _materialized_weight(model.get_output_embeddings())
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
