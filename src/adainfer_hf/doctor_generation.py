"""Contract checks of the upstream internals that generation and the estimators rely on (`adainfer doctor` runs
them with those of `doctor.py`): what `generate` hands a `custom_generate` callable, the field of its output that
holds the cache, a sliding-window cache cropped back after recording its past, and scikit-learn's parameter
validation. Each compares what `adainfer_hf.compat` reads or does with what the stock code computes on a tiny
random model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from sklearn.linear_model import LogisticRegression
from sklearn.svm import SVC
from transformers.generation.logits_process import LogitsProcessorList
from transformers.generation.stopping_criteria import StoppingCriteriaList

from . import compat
from .tiny_models import WINDOW, stock_model
from .tiny_models import ids as _ids

__all__ = ["GENERATION_CHECKS"]


def _first(found: dict, **kwargs):
    """A `custom_generate` callable that records what `generate` passes it and returns the prompt unchanged."""

    def decode(model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
               streamer=None, **model_kwargs):
        found.update(model=model, input_ids=input_ids, logits_processor=logits_processor,
                     stopping_criteria=stopping_criteria, generation_config=generation_config,
                     streamer=streamer, model_kwargs=model_kwargs)
        return input_ids

    return decode


def check_custom_generate_callable() -> None:
    """`generate(custom_generate=<callable>)` calls it with the arguments of its own decoding methods (processors,
    stopping criteria, the prepared config with its special-token tensors, the streamer, the attention mask in the
    model kwargs) and returns what it returns: the lossless loop's entry point (`runtime.lossless`)."""
    model = stock_model("llama_gqa")
    ids = _ids(5, batch=2)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    found: dict = {}
    out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                         eos_token_id=1, custom_generate=_first(found))
    if not found:
        raise AssertionError("generate(custom_generate=<callable>) did not call the callable")
    if out is not found["input_ids"]:
        raise AssertionError("generate(custom_generate=<callable>) did not return the callable's output")
    if found["model"] is not model or not torch.equal(found["input_ids"], ids):
        raise AssertionError("the callable did not receive the model and the prompt")
    if not isinstance(found["logits_processor"], LogitsProcessorList):
        raise AssertionError(f"logits_processor is {type(found['logits_processor']).__name__}, "
                             "expected a LogitsProcessorList")
    if not isinstance(found["stopping_criteria"], StoppingCriteriaList) or not any(
            hasattr(c, "eos_token_id") for c in found["stopping_criteria"]):
        raise AssertionError("stopping_criteria is not a StoppingCriteriaList holding an EOS criterion")
    config = found["generation_config"]
    if config.max_length != ids.shape[1] + 3:
        raise AssertionError(f"the prepared config's max_length is {config.max_length}, expected the prompt "
                             f"length plus max_new_tokens ({ids.shape[1] + 3})")
    pad, eos = compat.special_token_tensors(config)
    if pad is None or int(pad) != 0 or eos is None or 1 not in eos.reshape(-1).tolist():
        raise AssertionError(f"compat.special_token_tensors read pad={pad!r}, eos={eos!r} from the prepared "
                             "config; expected tensors holding 0 and 1")
    if not torch.equal(found["model_kwargs"].get("attention_mask"), mask):
        raise AssertionError("the callable's model kwargs do not carry the attention mask")


def check_generate_cache_field() -> None:
    """`compat.GENERATE_CACHE_FIELD` names the field (not a deprecated alias) of stock `generate`'s dict output
    that holds its cache, and that cache holds every position but the last generated one; the lossless loop builds
    its output with that field."""
    model = stock_model("llama_gqa")
    ids = _ids(5, batch=1)
    out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    if not isinstance(out, compat.GenerateDecoderOnlyOutput):
        raise AssertionError(f"generate returned {type(out).__name__}, expected compat.GenerateDecoderOnlyOutput")
    if compat.GENERATE_CACHE_FIELD not in out.keys():  # a field, not a deprecated alias of one
        raise AssertionError(f"compat.GENERATE_CACHE_FIELD={compat.GENERATE_CACHE_FIELD!r} is not a field of "
                             f"generate's output (its fields: {list(out.keys())}), so it holds no DynamicCache")
    cache = getattr(out, compat.GENERATE_CACHE_FIELD, None)
    if not isinstance(cache, compat.DynamicCache):
        raise AssertionError(f"output.{compat.GENERATE_CACHE_FIELD} is {type(cache).__name__}, expected the "
                             "DynamicCache generate decoded with")
    if cache.get_seq_length() != out.sequences.shape[1] - 1:
        raise AssertionError(f"the returned cache holds {cache.get_seq_length()} positions; expected "
                             f"{out.sequences.shape[1] - 1}")


def check_sliding_crop_after_recording() -> None:
    """`compat.record_past` then `crop(-n)` (a negative count removes n positions) rolls a cache whose
    sliding-window layers ran past their window back to a shorter prefix: the next step's logits equal a no-cache
    forward of the shorter text, on Gemma 3 and on Qwen2 with sliding layers."""
    for variant in ("gemma3_text", "qwen2_sliding"):
        model = stock_model(variant, attn="eager")
        ids = _ids(WINDOW + 5, batch=1)
        cache = compat.DynamicCache(config=model.config)
        compat.record_past(cache)
        with torch.no_grad():
            model(input_ids=ids[:, :WINDOW + 1], **{compat.CACHE_ARG: cache}, use_cache=True)
            for t in range(WINDOW + 1, ids.shape[1]):  # one token at a time, as decoding feeds them
                model(input_ids=ids[:, t:t + 1], **{compat.CACHE_ARG: cache}, use_cache=True)
            removed = 3
            cache.crop(-removed)
            kept = ids.shape[1] - removed
            if cache.get_seq_length() != kept:
                raise AssertionError(f"{variant}: crop(-{removed}) left {cache.get_seq_length()} positions, "
                                     f"expected {kept}")
            nxt = ids[:, kept:kept + 1]
            got = model(input_ids=nxt, **{compat.CACHE_ARG: cache}, use_cache=True).logits[:, -1]
            ref = model(input_ids=torch.cat([ids[:, :kept], nxt], 1), use_cache=False).logits[:, -1]
        err = (got - ref).abs().max().item()
        if err > 1e-4:
            raise AssertionError(f"{variant}: after record_past and crop(-{removed}) the next logits differ from "
                                 f"a no-cache recompute by {err:.3g}")


def check_estimator_param_validation() -> None:
    """`compat.validate_estimator_params` runs scikit-learn's constraint check: a bad constructor parameter raises
    a ValueError naming it; valid estimators pass."""
    compat.validate_estimator_params(SVC(C=1.0))
    compat.validate_estimator_params(LogisticRegression())
    for estimator, name in ((SVC(C={"bad": 1}), "C"), (LogisticRegression(max_iter="many"), "max_iter")):
        try:
            compat.validate_estimator_params(estimator)
        except ValueError as error:
            if f"'{name}'" not in str(error):
                raise AssertionError(f"the error for a bad {name} does not name it: {error}") from None
        else:
            raise AssertionError(f"{type(estimator).__name__}({name}=...) with a wrong type passed validation")


GENERATION_CHECKS: dict[str, Callable[[], None]] = {
    "generate(custom_generate=<callable>) arguments and special-token tensors": check_custom_generate_callable,
    "generate output cache field": check_generate_cache_field,
    "sliding-window cache: record past, crop(-n)": check_sliding_crop_after_recording,
    "scikit-learn parameter validation": check_estimator_param_validation,
}
