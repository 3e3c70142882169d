"""Every transformers (and accelerate / scikit-learn) internal adainfer_hf relies on, in one place.

Upstream moves under us: transformers 5.24 renamed the KV-cache argument `past_key_values` -> `cache` in decoder
layers, model forwards, `create_causal_mask` and model outputs, and `Cache.update` gained `kwargs=`. The rest of
the package never spells an upstream argument name or touches a private attribute; it asks this module. Each name
here has a contract check against the stock code it mirrors (`adainfer_hf.doctor`, run by the test suite and by
`adainfer doctor`), so a release that changes one fails loudly.

What is detected is the *signature* of the installed code, not a version number, so a backport or a pre-release
behaves as its code says.
"""

from __future__ import annotations

import inspect

import torch
import transformers
from packaging.version import Version
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, apply_rotary_pos_emb

__all__ = [
    "CACHE_ARG",
    "CACHE_ARG_NAMES",
    "DynamicCache",
    "DynamicLayer",
    "GENERATE_CACHE_FIELD",
    "GenerateDecoderOnlyOutput",
    "OUTPUT_CACHE_FIELD",
    "TESTED_TRANSFORMERS",
    "TRANSFORMERS_VERSION",
    "causal_mask",
    "is_dispatched",
    "layer_cache",
    "new_cache_layer",
    "offload_execution_device",
    "offload_weights_map",
    "output_cache",
    "pop_cache_arg",
    "record_past",
    "rms_norm_eps",
    "rotate_keys",
    "special_token_tensors",
    "SVC_FITTED_ARRAYS",
    "SVC_FITTED_SCALARS",
    "SVC_OPTIONAL_SCALARS",
    "tested_release_note",
    "validate_estimator_params",
    "with_layer_cache",
]

TRANSFORMERS_VERSION: str = transformers.__version__
# The releases CI runs the whole suite on (pyproject.toml declares exactly this range).
TESTED_TRANSFORMERS: tuple[str, str] = ("5.23.0", "5.25.0")

CACHE_ARG_NAMES = ("cache", "past_key_values")


def _parameters(fn) -> set[str]:
    # `deprecate_kwarg` wraps with functools.wraps; `inspect.signature` follows `__wrapped__` to the real function.
    return set(inspect.signature(fn).parameters)


def _detect_cache_arg() -> str:
    names = _parameters(LlamaDecoderLayer.forward)
    for name in CACHE_ARG_NAMES:
        if name in names:
            return name
    raise ImportError(
        f"transformers {TRANSFORMERS_VERSION}: LlamaDecoderLayer.forward takes neither `cache` nor "
        f"`past_key_values` (parameters: {sorted(names)}). adainfer_hf was tested on transformers "
        f"{' and '.join(TESTED_TRANSFORMERS)}; install one of those."
    )


CACHE_ARG: str = _detect_cache_arg()
"""The keyword under which the installed transformers passes the KV cache to decoder layers and model forwards."""

OUTPUT_CACHE_FIELD: str = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
"""The field of model outputs that holds the cache (`outputs.cache` from 5.24, `outputs.past_key_values` before)."""

_MASK_CACHE_ARG = "cache" if "cache" in _parameters(create_causal_mask) else "past_key_values"


def tested_release_note() -> str:
    """One sentence naming the installed transformers and the releases adainfer_hf is tested on."""
    lo, hi = TESTED_TRANSFORMERS
    tested = Version(lo) <= Version(TRANSFORMERS_VERSION) <= Version(hi)
    where = "within" if tested else "OUTSIDE"
    return (f"transformers {TRANSFORMERS_VERSION} is {where} the range adainfer_hf is tested on "
            f"({lo} .. {hi}); run `adainfer doctor` to check this installation")


# ---------------------------------------------------------------------------------------------- cache arguments
def layer_cache(kwargs: dict):
    """The KV cache among a decoder layer's (or model forward's) keyword arguments, under either name."""
    cache = kwargs.get(CACHE_ARG)
    if cache is None:
        for name in CACHE_ARG_NAMES:
            if kwargs.get(name) is not None:
                return kwargs[name]
    return cache


def with_layer_cache(kwargs: dict, cache) -> dict:
    """A copy of `kwargs` whose cache (under the installed release's name) is `cache`; the other name is dropped."""
    out = {k: v for k, v in kwargs.items() if k not in CACHE_ARG_NAMES}
    out[CACHE_ARG] = cache
    return out


def pop_cache_arg(kwargs: dict, **named):
    """Removes the cache from user keyword arguments given under either name and returns it (or None).

    `named` holds explicit parameters (e.g. `past_key_values=..., cache=...` of our own forward). Giving the cache
    under both names is refused, as the stock code does.
    """
    given = {name: value for name, value in named.items() if value is not None}
    for name in CACHE_ARG_NAMES:
        if kwargs.get(name) is not None:
            given[name] = kwargs[name]
        kwargs.pop(name, None)
    if len(given) > 1:
        raise ValueError(f"Pass the KV cache once, as `cache` or as `past_key_values`; got both ({sorted(given)}).")
    return next(iter(given.values()), None)


def output_cache(outputs):
    """The cache of a model output (`outputs.cache` or `outputs.past_key_values`), without deprecation warnings."""
    return outputs.get(OUTPUT_CACHE_FIELD) if hasattr(outputs, "get") else getattr(outputs, OUTPUT_CACHE_FIELD)


def new_cache_layer(cache: DynamicCache):
    """A fresh layer of the kind a `DynamicCache` appends when a deeper layer is first updated (None if fixed)."""
    factory = getattr(cache, "layer_class_to_replicate", None)
    return None if factory is None else factory()


def causal_mask(config, inputs_embeds, attention_mask, cache, position_ids, layer_idx=None, sliding=False):
    """transformers' `create_causal_mask` (`create_sliding_window_causal_mask` with `sliding`: the mask the stock
    models build for their `"sliding_attention"` layers, window `config.sliding_window`) with the cache under the
    installed release's argument name."""
    kwargs = {_MASK_CACHE_ARG: cache}
    if layer_idx is not None:
        kwargs["layer_idx"] = layer_idx
    build = create_sliding_window_causal_mask if sliding else create_causal_mask
    return build(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                 position_ids=position_ids, **kwargs)


# ---------------------------------------------------------------------------------------------- generation
GENERATE_CACHE_FIELD: str = ("cache" if "cache" in GenerateDecoderOnlyOutput.__dataclass_fields__
                             else "past_key_values")
"""The field of `GenerateDecoderOnlyOutput` that holds the cache (`cache` from 5.24, `past_key_values` before)."""


def special_token_tensors(generation_config):
    """`(pad, eos)` token tensors that `generate` prepares on its config before calling the decoding method
    (`_pad_token_tensor`, `_eos_token_tensor`: private; None where unset). Read by the lossless decoding loop, which
    `generate(custom_generate=<callable>)` calls with the prepared config, processors and stopping criteria."""
    return (getattr(generation_config, "_pad_token_tensor", None),
            getattr(generation_config, "_eos_token_tensor", None))


def record_past(cache) -> None:
    """Makes `cache`'s sliding-window layers keep their past until the next `crop`, so a crop can remove positions
    they would otherwise have dropped (transformers' `activate_past_recording`, which assisted decoding uses)."""
    cache.activate_past_recording()


# ---------------------------------------------------------------------------------------------- math we recompute
def rotate_keys(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of key states [B, heads, T, D], as the stock Llama attention applies it."""
    # apply_rotary_pos_emb rotates q and k together; passing k twice costs one small extra op.
    rotated, _ = apply_rotary_pos_emb(keys, keys, cos, sin)
    return rotated


def rms_norm_eps(norm: nn.Module) -> float:
    """The epsilon of a stock RMSNorm module (`variance_epsilon` on Llama-style norms, `eps` on others)."""
    for name in ("variance_epsilon", "eps"):
        value = getattr(norm, name, None)
        if isinstance(value, float):
            return value
    raise NotImplementedError(f"{type(norm).__name__} exposes no RMSNorm epsilon (variance_epsilon / eps).")


# ---------------------------------------------------------------------------------------------- accelerate
def _hook_attr(module: nn.Module, name: str):
    """`name` of accelerate's hook on `module`, looking inside a `SequentialHook` (what `cpu_offload` attaches)."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or (hook,):
        value = getattr(h, name, None)
        if value is not None:
            return value
    return None


def offload_execution_device(module: nn.Module) -> torch.device | None:
    """The device accelerate's hook runs `module` on when it is dispatched/offloaded (None without a hook)."""
    device = _hook_attr(module, "execution_device")
    if device is None:
        return None
    return torch.device(f"cuda:{device}" if isinstance(device, int) else device)


def is_dispatched(module: nn.Module) -> bool:
    """Whether accelerate attached its forward hook to `module` (device_map dispatch or offload)."""
    return hasattr(module, "_hf_hook")


def offload_weights_map(module: nn.Module):
    """accelerate's map of offloaded weights for `module` (None when its weights are resident)."""
    return _hook_attr(module, "weights_map")


# ---------------------------------------------------------------------------------------------- scikit-learn
# The fitted state `sklearn.svm.SVC.decision_function` / `predict` read, private names included (libsvm's
# `_dual_coef_`, `_intercept_`, `_n_support`, ...): the safetensors codec stores and restores exactly these.
SVC_FITTED_ARRAYS = (
    "support_", "support_vectors_", "_n_support", "dual_coef_", "intercept_", "_dual_coef_", "_intercept_",
    "_probA", "_probB", "classes_", "class_weight_", "_num_iter", "n_iter_",
)  # fmt: skip
SVC_FITTED_SCALARS = ("n_features_in_", "fit_status_", "shape_fit_", "_gamma", "_sparse", "_effective_probability")
SVC_OPTIONAL_SCALARS = ("_effective_probability",)  # scikit-learn >= 1.5 only


def validate_estimator_params(estimator) -> None:
    """scikit-learn's own check of an estimator's constructor parameters against its `_parameter_constraints`
    (`BaseEstimator._validate_params`, scikit-learn >= 1.2); raises `InvalidParameterError` (a `ValueError` and a
    `TypeError`) naming the parameter, the value and what was expected. Estimators without constraints pass."""
    if getattr(estimator, "_parameter_constraints", None) is not None:
        estimator._validate_params()
