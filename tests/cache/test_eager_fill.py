"""The eager fill of skipped layers follows the real modules (in-place edits, a PEFT LoRA), against the deferred
fill and the merged model."""

from __future__ import annotations

import pytest
import torch
from tiny_models import batch, make_pair

from adainfer_hf import ExitPolicy, ScriptedExit


class NeverExit(ExitPolicy):
    """Checks after every layer and never fires (the loop runs, the output must be the stock model's)."""

    features = ("gap", "top_prob")

    def decide(self, features, layer, rows, state=None):
        return torch.zeros(features.shape[0], dtype=torch.bool, device=features.device)


def _gen_kwargs(**kw):
    return dict(max_new_tokens=5, do_sample=False, pad_token_id=0, **kw)




# ---------------------------------------------------------------- 3. the eager fill follows the real modules
def _eager_vs_propagate(ada, ids, mask, k=2):
    """Logits of a step after a prompt whose rows all exited at `k`: eager fill (DynamicCache) vs deferred fill."""
    from transformers import DynamicCache

    from adainfer_hf import PropagateExitCache

    outs = []
    for cache in (DynamicCache(config=ada.config), PropagateExitCache(config=ada.config)):
        with torch.no_grad():
            ada(ids, attention_mask=mask, past_key_values=cache, exit_policy=ScriptedExit(k))
            nxt = torch.full((ids.shape[0], 1), 5)
            m2 = torch.cat([mask, torch.ones_like(nxt)], 1)
            outs.append(ada(nxt, attention_mask=m2, past_key_values=cache, exit_policy=None).logits)
    return outs


def test_eager_fill_sees_in_place_norm_edits():
    _, ada = make_pair("llama_gqa")
    ids, mask = batch("left")
    _eager_vs_propagate(ada, ids, mask)  # builds (and caches) the fused fill weight
    with torch.no_grad():
        for layer in ada.model.layers:
            layer.input_layernorm.weight.mul_(3.0)
    eager, deferred = _eager_vs_propagate(ada, ids, mask)
    torch.testing.assert_close(eager, deferred)


def test_eager_fill_with_peft_lora_matches_merged_model():
    """LoRA on k_proj/v_proj (nonzero B): the fill must see the adapter, as the merged model's weights do."""
    import copy

    peft = pytest.importorskip("peft")
    _, ada = make_pair("llama_gqa")
    ids, mask = batch("left")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "v_proj"], init_lora_weights=False)
    wrapped = peft.get_peft_model(ada, cfg).eval()
    merged = copy.deepcopy(wrapped).merge_and_unload().eval()
    ref_eager, ref_deferred = _eager_vs_propagate(merged, ids, mask)
    torch.testing.assert_close(ref_eager, ref_deferred, rtol=1e-4, atol=1e-4)
    eager, deferred = _eager_vs_propagate(wrapped.base_model.model, ids, mask)
    torch.testing.assert_close(eager, ref_eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(deferred, ref_eager, rtol=1e-4, atol=1e-4)
