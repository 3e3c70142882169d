"""ShortGPT, the static layer-pruning baseline the AdaInfer paper compares with (Men et al., 2024).

ShortGPT ranks decoder layers by their *Block Influence* on calibration text,

    BI_i = 1 - E_{x, t}[ cos(X_i[t], X_{i+1}[t]) ],

where `X_i` is the input hidden state of layer `i` and `X_{i+1}` its output, averaged over every real (non-padding)
token `t` of the calibration prompts. A layer whose output points where its input did changes little, so the `n`
layers with the lowest BI are removed for every input.

[`prune_layers`] builds the pruned model for real: a new model object that shares every weight with the original but
whose decoder holds only the kept layers, so the removed ones are never run. The original model and its config are
left untouched (the pruned model gets a copy of the config with `num_hidden_layers` lowered, and copies of the kept
layers' attention modules renumbered `0..k-1`, so a KV cache has one entry per kept layer).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .. import compat
from ..architectures.registry import spec_for
from ..utils.tokenizers import left_padding

__all__ = ["block_influence", "prune_layers", "shortgpt_layers_to_remove", "shortgpt_model"]


def _layer_input(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _layer_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def block_influence(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 8) -> np.ndarray:
    """Block Influence of every decoder layer on calibration text (ShortGPT's ranking).

    Hooks on the decoder layers read each layer's input and output hidden states (before any final norm), so the
    result does not depend on how a model reports `output_hidden_states`.

    Args:
        model (`PreTrainedModel`): a Llama/OPT causal LM (stock or AdaInfer class; run at full depth).
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer; texts are left-padded and padding is ignored.
        texts (`Sequence[str]`): calibration text, e.g. the prompts' demonstrations or a calibration split.
        batch_size (`int`, *optional*, defaults to 8): texts per forward pass.

    Returns:
        `np.ndarray` float64 of shape `(L,)`: `BI[i]` for layer `i + 1` (1-based layer numbering elsewhere).
    """
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("block_influence needs at least one non-empty calibration text; got none.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}.")
    layers = spec_for(model).decoder_layers(model)
    L = len(layers)
    cos_sum = torch.zeros(L, dtype=torch.float64)
    count = 0
    inputs: dict[int, torch.Tensor] = {}
    mask_ref: list[torch.Tensor] = []

    def pre_hook(i):
        def hook(module, args, kwargs):
            inputs[i] = _layer_input(args, kwargs).detach()
        return hook

    def post_hook(i):
        def hook(module, args, kwargs, output):
            out = _layer_output(output).detach()
            cos = torch.nn.functional.cosine_similarity(inputs.pop(i).double(), out.double(), dim=-1)  # [B, T]
            cos_sum[i] += float((cos * mask_ref[0].to(cos.device, cos.dtype)).sum())
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(post_hook(i), with_kwargs=True))
    device = next(model.parameters()).device
    try:
        with left_padding(tokenizer):
            for start in range(0, len(texts), batch_size):
                enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True)
                mask_ref[:] = [enc["attention_mask"]]
                count += int(enc["attention_mask"].sum())
                kwargs = {"exit_policy": None} if hasattr(model, "set_exit_classifier") else {}
                model(**{k: v.to(device) for k, v in enc.items()}, use_cache=False, logits_to_keep=1, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return 1.0 - (cos_sum / count).numpy()


def shortgpt_layers_to_remove(block_influences: Sequence[float], n: int) -> list[int]:
    """The 1-based layers ShortGPT removes: the `n` with the lowest Block Influence (ties: the earlier layer).

    Args:
        block_influences (`Sequence[float]`): `BI` per layer, as [`block_influence`] returns.
        n (`int`): how many layers to remove, `0 <= n < L`.

    Returns:
        `list[int]`: sorted 1-based layer numbers.
    """
    bi = np.asarray(block_influences, dtype=np.float64)
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or not 0 <= n < bi.size:
        raise ValueError(f"n must be an int in [0, {bi.size - 1}] (layers to remove of {bi.size}); got {n!r}.")
    return sorted(int(i) + 1 for i in np.argsort(bi, kind="stable")[:n])


def _shallow(module: nn.Module) -> nn.Module:
    """A new module object sharing parameters, buffers and submodules with `module`, but with its own containers
    (so replacing a child or registering a hook on the copy leaves `module` untouched)."""
    new = copy.copy(module)
    new._modules = dict(module._modules)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    for name in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                 "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_hooks",
                 "_backward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks"):
        if hasattr(module, name):
            setattr(new, name, type(getattr(module, name))())
    return new


def prune_layers(model: nn.Module, remove: Sequence[int]) -> nn.Module:
    """A model that runs only the decoder layers not in `remove`, sharing every weight with `model`.

    Nothing of `model` is modified: the returned object has its own module containers, a copy of the config with
    `num_hidden_layers` (and `layer_types`, when present) reduced, and copies of the kept layers' attention modules
    whose `layer_idx` is renumbered `0..k-1`, so a KV cache built from the new config fits. Works for the stock and
    the AdaInfer Llama/OPT classes; an AdaInfer model keeps its early-exit machinery (on the pruned stack).

    Args:
        model (`PreTrainedModel`): a Llama/OPT causal LM.
        remove (`Sequence[int]`): 1-based layers to drop.

    Returns:
        `PreTrainedModel`: the pruned model (same class as `model`).
    """
    layers = spec_for(model).decoder_layers(model)
    L = len(layers)
    remove = sorted({int(k) for k in remove})
    if any(k < 1 or k > L for k in remove) or len(remove) >= L:
        raise ValueError(f"remove={remove} must name fewer than {L} distinct layers in [1, {L}].")
    if getattr(model.config, "is_heterogeneous", False):
        raise NotImplementedError("prune_layers does not support heterogeneous (per-layer) configs.")
    if any(compat.is_dispatched(m) for m in layers.modules()):
        # accelerate binds its forward wrappers to the original module objects, so copies would run the originals.
        raise NotImplementedError("prune_layers does not support models dispatched with accelerate hooks "
                                  "(device_map / offload); load the model on one device.")
    keep = [i for i in range(L) if i + 1 not in remove]
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in keep]

    new_layers = []
    for new_idx, i in enumerate(keep):
        layer = _shallow(layers[i])
        attn = _shallow(layer.self_attn)
        attn.layer_idx = new_idx
        if hasattr(attn, "config"):
            attn.config = config
        layer._modules["self_attn"] = attn
        new_layers.append(layer)

    pruned = _shallow(model)
    pruned.__dict__.pop("_exit_stats", None)  # AdaInfer running totals: the pruned model keeps its own
    pruned.config = config
    # Walk down to the decoder, copying each module on the way so the original tree is never touched.
    base = spec_for(model).base_decoder(model)
    parent, path = pruned, []
    node = model
    while node is not base:
        name = next(n for n, child in node._modules.items() if child is base or base in child.modules())
        path.append(name)
        node = node._modules[name]
    for name in path:
        child = _shallow(parent._modules[name])
        if hasattr(child, "config"):
            child.config = config
        parent._modules[name] = child
        parent = child
    parent._modules["layers"] = nn.ModuleList(new_layers)
    return pruned


def shortgpt_model(model: nn.Module, tokenizer, calibration_texts: Sequence[str], n_remove: int,
                   batch_size: int = 8) -> tuple[nn.Module, list[int], np.ndarray]:
    """ShortGPT end to end: Block Influence on `calibration_texts`, then the model without the `n_remove` lowest.

    Returns:
        `(pruned_model, removed_layers, block_influences)`.
    """
    bi = block_influence(model, tokenizer, calibration_texts, batch_size=batch_size)
    removed = shortgpt_layers_to_remove(bi, n_remove)
    return prune_layers(model, removed), removed, bi
