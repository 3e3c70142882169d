"""A `StaticCache` passed to `generate` with an exit policy, on every family: `generate` then builds the masks
ahead (a dict keyed by layer type on families with `layer_types`) and the full-attention layers count positions in a
tensor they advance in place. Nothing fires -> the stock class with the same cache kind; exits fire -> the eager
fill, i.e. what a plain `DynamicCache` gets (README, "The KV cache in generation")."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VARIANTS, FeatureHashExit, batch, make_pair
from transformers import DynamicCache, StaticCache

from adainfer_hf import ScriptedExit
from adainfer_hf.compat import CACHE_ARG

L = 4
FAMILIES = ["llama_gqa", "opt_pre_ln", "qwen2_bias", "qwen2_sliding", "qwen3", "mistral_sliding", "gemma3_text"]
assert set(FAMILIES) <= set(VARIANTS)


def _generate(model, ids, mask, cache, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=7, do_sample=False, pad_token_id=0,
                              return_dict_in_generate=True, output_scores=True, **{CACHE_ARG: cache}, **kw)


def _static(model):
    return StaticCache(config=model.config, max_cache_len=32)


@pytest.mark.parametrize("variant", FAMILIES)
def test_static_cache_with_a_policy_that_never_fires_is_stock(variant):
    stock, ada = make_pair(variant)
    ids, mask = batch("left")
    ref = _generate(stock, ids, mask, _static(stock))
    out = _generate(ada, ids, mask, _static(ada), exit_policy=ScriptedExit(L, check_every_layer=True))
    assert torch.equal(out.sequences, ref.sequences)
    assert (out.exit_layers == L).all()
    for a, b in zip(out.scores, ref.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", FAMILIES)
def test_static_cache_with_exits_generates_what_the_eager_fill_generates(variant):
    """Per-row, per-step exits (the sequence runs past the sliding windows): the static cache's output equals a
    plain `DynamicCache`'s, which fills the skipped layers from the frozen states at exit time."""
    _, ada = make_pair(variant)
    ids, mask = batch("left")
    static = _generate(ada, ids, mask, _static(ada), exit_policy=FeatureHashExit())
    eager = _generate(ada, ids, mask, DynamicCache(config=ada.config), exit_policy=FeatureHashExit())
    assert len(set(static.exit_layers.flatten().tolist())) >= 3
    assert torch.equal(static.exit_layers, eager.exit_layers)
    assert torch.equal(static.sequences, eager.sequences)
    for a, b in zip(static.scores, eager.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
