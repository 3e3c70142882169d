"""Contract checks: every upstream internal adainfer_hf relies on, checked against the stock code it mirrors.

Each check builds a tiny random model (transformers' test sizes) and compares what our compatibility shim
(`adainfer_hf.compat`) and architecture helpers compute with what the *stock* transformers code computes or
writes: the cache a stock decoder layer receives, the K/V the stock attention writes into a fresh `DynamicCache`,
the logits of the stock model cut to k layers, accelerate's offload hook, scikit-learn's fitted SVC state. The
test suite runs them on every transformers release CI covers; `adainfer doctor` runs them on the user's installed
versions in seconds (what to run after upgrading transformers).
"""

from __future__ import annotations

import copy
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import accelerate
import numpy as np
import sklearn
import torch
from accelerate import cpu_offload
from sklearn.svm import SVC

from . import compat
from .architectures.head import ExitHead
from .architectures.kv_fill import KVFill
from .architectures.registry import spec_for
from .cache.propagate import OwedLayer, PropagateExitCache
from .doctor_generation import GENERATION_CHECKS
from .models.llama import AdaInferLlamaForCausalLM
from .policy.base import ScriptedExit
from .tiny_models import ids as _ids
from .tiny_models import stock_model

__all__ = ["CHECKS", "CheckResult", "main", "run_checks"]

class _Capture:
    """Records the positional and keyword arguments each decoder layer of `model` receives (forward pre-hooks)."""

    def __init__(self, model):
        self.calls: list[tuple[int, tuple, dict]] = []
        self._handles = [
            layer.register_forward_pre_hook(self._hook(i), with_kwargs=True)
            for i, layer in enumerate(spec_for(model).decoder_layers(model))
        ]

    def _hook(self, i):
        def hook(module, args, kwargs):
            self.calls.append((i, args, dict(kwargs)))

        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()



# The stock models the checks compare against (the package's one tiny-model factory), eager attention, 3 layers.
def _llama(layers: int = 3):
    return stock_model("llama_gqa", attn="eager", num_hidden_layers=layers)


def _opt(layers: int = 3, **overrides):
    return stock_model("opt_350m_layout", attn="eager", num_hidden_layers=layers, **overrides)


def _qwen2(layers: int = 3):
    # (its last layer attends within the window)
    return stock_model("qwen2_sliding", attn="eager", num_hidden_layers=layers)


def _qwen3(layers: int = 3):
    return stock_model("qwen3", attn="eager", num_hidden_layers=layers)


def _gemma3(layers: int = 3):
    return stock_model("gemma3_text", attn="eager", num_hidden_layers=layers)

def _close(a: torch.Tensor, b: torch.Tensor, what: str, atol: float = 1e-5) -> None:
    if a.shape != b.shape:
        raise AssertionError(f"{what}: shape {tuple(a.shape)} != stock {tuple(b.shape)}")
    err = (a.float() - b.float()).abs().max().item()
    if err > atol:
        raise AssertionError(f"{what}: max abs difference {err:.3g} from the stock value (tolerance {atol})")


# ---------------------------------------------------------------------------------------------------- checks
def check_layer_cache_argument() -> None:
    """Decoder layers receive the cache under `compat.CACHE_ARG`, and `compat.layer_cache` finds it there."""
    model = _llama()
    cache = compat.DynamicCache(config=model.config)
    with _Capture(model) as cap, torch.no_grad():
        model(_ids(), use_cache=True, **{compat.CACHE_ARG: cache})
    for i, _args, kwargs in cap.calls:
        if compat.layer_cache(kwargs) is not cache:
            raise AssertionError(f"layer {i}: compat.layer_cache found {type(compat.layer_cache(kwargs)).__name__}, "
                                 f"not the model's cache; layer kwargs are {sorted(kwargs)}")
        if compat.CACHE_ARG not in kwargs:
            raise AssertionError(f"layer {i}: no `{compat.CACHE_ARG}` among the layer's kwargs {sorted(kwargs)}")


def check_model_cache_argument() -> None:
    """The causal-LM forward takes the cache as `compat.CACHE_ARG` without a deprecation warning, and
    `compat.output_cache` returns it from the output."""
    model = _llama()
    cache = compat.DynamicCache(config=model.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        with torch.no_grad():
            out = model(_ids(), use_cache=True, **{compat.CACHE_ARG: cache})
    if compat.output_cache(out) is not cache:
        raise AssertionError(f"compat.output_cache read field {compat.OUTPUT_CACHE_FIELD!r}, which does not hold "
                             f"the cache the forward was given (output keys: {list(out.keys())})")


def check_causal_mask() -> None:
    """`compat.causal_mask` builds the mask the stock model hands its layers (a query after a cached prefix)."""
    model = _llama()
    ids = _ids(9)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    cache = compat.DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :6], attention_mask=mask[:, :6], use_cache=True, **{compat.CACHE_ARG: cache})
        before = copy.deepcopy(cache)  # the mask is built against the cache as it is before this step
        with _Capture(model) as cap:
            model(ids[:, 6:], attention_mask=mask, use_cache=True, **{compat.CACHE_ARG: cache})
    _, _, kwargs = cap.calls[0]
    cache = before
    position_ids = torch.arange(6, 9).unsqueeze(0)
    hidden = model.model.embed_tokens(ids[:, 6:])
    ours = compat.causal_mask(model.config, hidden, mask, cache, position_ids)
    _close(ours, kwargs["attention_mask"], "causal mask", atol=0)


def check_sliding_window_mask() -> None:
    """`compat.causal_mask(..., sliding=True)` builds the mask the stock Qwen2 model hands its sliding-window
    layers (and the causal one its full layers), for a query after a cached prefix longer than the window."""
    model = _qwen2()
    ids = _ids(11)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    cache = compat.DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :8], attention_mask=mask[:, :8], use_cache=True, **{compat.CACHE_ARG: cache})
        before = copy.deepcopy(cache)
        with _Capture(model) as cap:
            model(ids[:, 8:], attention_mask=mask, use_cache=True, **{compat.CACHE_ARG: cache})
    hidden = model.model.embed_tokens(ids[:, 8:])
    position_ids = torch.arange(8, 11).unsqueeze(0)
    for idx, _, kwargs in cap.calls:
        sliding = spec_for(model).sliding_window(model, idx) is not None
        ours = compat.causal_mask(model.config, hidden, mask, before, position_ids, layer_idx=idx, sliding=sliding)
        _close(ours, kwargs["attention_mask"], f"layer {idx} ({'sliding' if sliding else 'full'}) mask", atol=0)
    if not any(spec_for(model).sliding_window(model, i) for i in range(3)):
        raise AssertionError("the tiny Qwen2 has no sliding-window layer: the check checked nothing")


def check_rotary_position_embeddings() -> None:
    """`ArchitectureSpec.position_embeddings` equals the (cos, sin) the stock model passes to its decoder layers."""
    model = _llama()
    ids = _ids()
    with _Capture(model) as cap, torch.no_grad():
        model(ids)
    _, _, kwargs = cap.calls[0]
    hidden = model.model.embed_tokens(ids)
    ours = spec_for(model).position_embeddings(model, hidden, torch.arange(ids.shape[1]).unsqueeze(0))
    for name, a, b in zip(("cos", "sin"), ours, kwargs["position_embeddings"], strict=True):
        _close(a, b, f"rotary {name}")


def _stock_written_kv(model, layer_idx: int, hidden: torch.Tensor, layer_kwargs: dict):
    """What the stock decoder layer `layer_idx` writes into a fresh `DynamicCache` for input `hidden`."""
    fresh = compat.DynamicCache()
    kwargs = compat.with_layer_cache(layer_kwargs, fresh)
    kwargs["use_cache"] = True
    with torch.no_grad():
        spec_for(model).decoder_layers(model)[layer_idx](hidden, **kwargs)
    written = fresh.layers[layer_idx]
    return written.keys, written.values


def _check_propagated_kv(model) -> None:
    ids = _ids()
    with _Capture(model) as cap, torch.no_grad():
        out = model(ids, output_hidden_states=True)
    layers = spec_for(model).decoder_layers(model)
    for idx, layer in enumerate(layers):
        _, args, kwargs = cap.calls[idx]
        hidden = out.hidden_states[idx]
        kwargs = {k: v for k, v in kwargs.items() if k not in compat.CACHE_ARG_NAMES}
        ref_k, ref_v = _stock_written_kv(model, idx, hidden, kwargs)
        with torch.no_grad():
            k, v = spec_for(model).layer_kv_states(model, layer, hidden, kwargs.get("position_embeddings"))
            stacked = KVFill(model).stacked(hidden, idx, kwargs.get("position_embeddings"))
        _close(k, ref_k, f"{model.config.model_type} layer {idx} propagated keys")
        _close(v, ref_v, f"{model.config.model_type} layer {idx} propagated values")
        _close(stacked[0][0], ref_k, f"{model.config.model_type} layer {idx} stacked keys", atol=1e-4)
        _close(stacked[0][1], ref_v, f"{model.config.model_type} layer {idx} stacked values", atol=1e-4)
        # the fill of every deeper layer from this layer's kwargs (each layer's own rotary table: Gemma3)
        fill = spec_for(model).fill_position_embeddings(model, hidden, kwargs)
        with torch.no_grad():
            stacked = KVFill(model).stacked(hidden, idx, fill)
        for deeper in range(idx + 1, len(layers)):
            _, _, deeper_kwargs = cap.calls[deeper]
            deeper_kwargs = {k: v for k, v in deeper_kwargs.items() if k not in compat.CACHE_ARG_NAMES}
            ref_k, ref_v = _stock_written_kv(model, deeper, hidden, deeper_kwargs)
            _close(stacked[deeper - idx][0], ref_k, f"{model.config.model_type} layer {deeper} fill keys", atol=1e-4)
            _close(stacked[deeper - idx][1], ref_v, f"{model.config.model_type} layer {deeper} fill values",
                   atol=1e-4)


def check_propagated_kv_llama() -> None:
    """Our K/V of layer l (norm, projections, rotary; one layer and all layers stacked) equal what the stock Llama
    attention writes into a fresh `DynamicCache` for the same input hidden state."""
    _check_propagated_kv(_llama())


def check_propagated_kv_opt() -> None:
    """The same for OPT (post-LN layout with `project_out`, and pre-LN)."""
    _check_propagated_kv(_opt())
    _check_propagated_kv(_opt(do_layer_norm_before=True, word_embed_proj_dim=32))


def check_propagated_kv_families() -> None:
    """The same for Qwen2 (q/k/v biases, sliding layers), Qwen3 (`k_norm` before rotary) and Gemma3 (`k_norm`,
    `(1 + w)` norms, local/global rotary tables)."""
    for build in (_qwen2, _qwen3, _gemma3):
        _check_propagated_kv(build())


def check_logit_lens() -> None:
    """The logit lens at layer k (`ExitHead.logits` of the stock hidden state) equals the logits of the stock
    model cut to k layers, for Llama, OPT, Qwen3 and Gemma3 (final logit softcapping)."""
    for build in (_llama, _opt, _qwen3, _gemma3):
        model = build(layers=3)
        ids = _ids()
        with torch.no_grad():
            hidden_states = model(ids, output_hidden_states=True).hidden_states
        for k in (1, 2):
            cut = build(layers=3)
            cut.load_state_dict(model.state_dict())
            del spec_for(cut).decoder_layers(cut)[k:]
            cut.config.num_hidden_layers = k
            with torch.no_grad():
                ref = cut(ids).logits
                ours = ExitHead(model).logits(hidden_states[k])
            _close(ours, ref, f"{model.config.model_type} logit lens at layer {k}")


def check_dynamic_layer_swap() -> None:
    """`DynamicLayer` keeps `keys`/`values`/`is_initialized` as instance attributes, so the deferred layer's class
    swap (`OwedLayer`) sees every read; a cache grows new layers through `layer_class_to_replicate`."""
    layer = compat.new_cache_layer(compat.DynamicCache())
    if type(layer) is not compat.DynamicLayer:
        raise AssertionError(f"DynamicCache().layer_class_to_replicate() made {type(layer).__name__}, "
                             "not DynamicLayer")
    k = torch.randn(2, 2, 3, 8)
    layer.update(k, k + 1)
    missing = [n for n in ("keys", "values", "is_initialized") if n not in layer.__dict__]
    if missing:
        raise AssertionError(f"DynamicLayer no longer stores {missing} as instance attributes")
    # A propagate cache with owed positions: any read path sees the same values as an eager fill.
    model = _llama()
    hidden = torch.randn(2, 4, 32)
    pos = spec_for(model).position_embeddings(model, hidden, torch.arange(4).unsqueeze(0))
    cache = PropagateExitCache(config=model.config)
    if not cache.defer(model, hidden, 1, pos) or type(cache.layers[2]) is not OwedLayer:
        raise AssertionError("PropagateExitCache.defer did not defer layers of a plain DynamicCache")
    if cache.get_seq_length(2) != 4 or type(cache.layers[2]) is not compat.DynamicLayer:
        raise AssertionError("reading a deferred layer's length did not compute it and restore DynamicLayer")
    ref_k, _ = spec_for(model).layer_kv_states(model, spec_for(model).decoder_layers(model)[2], hidden, pos)
    _close(cache.layers[2].keys, ref_k, "deferred keys")


def check_accelerate_offload_hook() -> None:
    """accelerate's offload hook exposes the execution device and the offloaded weights where we read them."""
    model = _llama()
    head = model.lm_head
    weight = head.weight.detach().clone()
    cpu_offload(head, execution_device=torch.device("cpu"))
    if head.weight.device.type != "meta":
        raise AssertionError(f"cpu_offload left the weight on {head.weight.device}, expected meta")
    if not compat.is_dispatched(head):
        raise AssertionError("compat.is_dispatched does not see accelerate's hook")
    if compat.offload_execution_device(head) != torch.device("cpu"):
        raise AssertionError(f"execution device read as {compat.offload_execution_device(head)}")
    weights_map = compat.offload_weights_map(head)
    if weights_map is None:
        raise AssertionError("no weights map on the offloaded module")
    _close(weights_map["weight"], weight, "offloaded weight", atol=0)


def check_svc_fitted_state() -> None:
    """An `SVC` rebuilt from exactly `compat.SVC_FITTED_ARRAYS` / `SVC_FITTED_SCALARS` decides as the fitted one."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    y = (x[:, 0] + 0.3 * x[:, 1] > 0).astype(int)
    fitted = SVC(kernel="rbf", C=2.0).fit(x, y)
    rebuilt = SVC(**fitted.get_params())
    for name in (*compat.SVC_FITTED_ARRAYS, *compat.SVC_FITTED_SCALARS):
        if not hasattr(fitted, name):
            if name in compat.SVC_OPTIONAL_SCALARS:
                continue
            raise AssertionError(f"a fitted SVC has no attribute {name!r}")
        setattr(rebuilt, name, getattr(fitted, name))
    if not np.allclose(rebuilt.decision_function(x), fitted.decision_function(x)):
        raise AssertionError("the rebuilt SVC's decision_function differs from the fitted one")


def check_exit_keeps_cache_aligned() -> None:
    """End to end: an AdaInfer Llama that exits after layer 1 returns the stock model-cut-to-1's logits and a
    cache whose every layer holds every position (the run-time guard's invariant)."""
    stock = _llama(layers=3)
    ada = AdaInferLlamaForCausalLM(stock.config).eval()
    ada.load_state_dict(stock.state_dict())
    ids = _ids()
    with torch.no_grad():
        out = ada(ids, use_cache=True, exit_policy=ScriptedExit(1), logits_to_keep=1)
        hidden = stock(ids, output_hidden_states=True).hidden_states[1]
    _close(out.logits[:, -1], ExitHead(stock).logits(hidden[:, -1]), "exit logits")
    lengths = [compat.output_cache(out).get_seq_length(i) for i in range(3)]
    if lengths != [ids.shape[1]] * 3:
        raise AssertionError(f"cache lengths per layer after an exit are {lengths}, expected {[ids.shape[1]] * 3}")


CHECKS: dict[str, Callable[[], None]] = {
    "decoder-layer cache argument": check_layer_cache_argument,
    "model forward cache argument and output field": check_model_cache_argument,
    "create_causal_mask arguments": check_causal_mask,
    "sliding-window mask == stock per-layer-type mask": check_sliding_window_mask,
    "rotary position embeddings": check_rotary_position_embeddings,
    "propagated K/V == stock attention's cache write (llama)": check_propagated_kv_llama,
    "propagated K/V == stock attention's cache write (opt)": check_propagated_kv_opt,
    "propagated K/V == stock attention's cache write (qwen2, qwen3, gemma3)": check_propagated_kv_families,
    "logit lens == stock model cut to k layers": check_logit_lens,
    "DynamicLayer internals and class swap": check_dynamic_layer_swap,
    "accelerate offload hook (_hf_hook)": check_accelerate_offload_hook,
    "scikit-learn SVC fitted state": check_svc_fitted_state,
    "exit keeps every layer's cache aligned": check_exit_keeps_cache_aligned,
    **GENERATION_CHECKS,
}


@dataclass
class CheckResult:
    """Outcome of one contract check."""

    name: str
    ok: bool
    seconds: float
    detail: str = ""


def run_checks(names=None) -> list[CheckResult]:
    """Runs the contract checks (all, or those named) and returns one `CheckResult` each; never raises."""
    results = []
    for name, check in CHECKS.items():
        if names is not None and name not in names:
            continue
        start = time.perf_counter()
        try:
            check()
            results.append(CheckResult(name, True, time.perf_counter() - start))
        except Exception as error:  # a check reports, it does not crash the report
            detail = f"{type(error).__name__}: {error}"
            if not isinstance(error, AssertionError):
                detail += "\n" + traceback.format_exc(limit=3)
            results.append(CheckResult(name, False, time.perf_counter() - start, detail))
    return results


def main(out=None) -> int:
    """Prints a verdict per check and a summary (to `out`, default stdout); returns 0 when all passed, else 1."""
    out = sys.stdout if out is None else out
    print(f"adainfer doctor: transformers {compat.TRANSFORMERS_VERSION}, torch {torch.__version__}, "
          f"accelerate {accelerate.__version__}, scikit-learn {sklearn.__version__}", file=out)
    print(f"  cache argument: {compat.CACHE_ARG!r}; output field: {compat.OUTPUT_CACHE_FIELD!r}", file=out)
    print(f"  {compat.tested_release_note()}", file=out)
    results = run_checks()
    for r in results:
        print(f"  [{'ok' if r.ok else 'FAIL'}] {r.name} ({r.seconds:.2f} s)", file=out)
        if not r.ok:
            for line in r.detail.splitlines():
                print(f"         {line}", file=out)
    failed = [r for r in results if not r.ok]
    if failed:
        print(f"{len(failed)} of {len(results)} checks FAILED: adainfer_hf may compute wrong results with this "
              "installation. Install a tested transformers release (see above) and report the failure.", file=out)
        return 1
    print(f"all {len(results)} checks passed.", file=out)
    return 0
