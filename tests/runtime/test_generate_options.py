"""`generate` and the forward as drop-ins: use_cache=False, every option without a policy as stock, the
options a policy cannot run refused by name, flex attention refused, tuples with return_dict=False."""

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




# ---------------------------------------------------------------- 1. use_cache=False means no cache
@pytest.mark.parametrize("exit_cache", ["propagate", "exact"])
def test_generate_use_cache_false_installs_no_cache(exit_cache):
    stock, ada = make_pair("llama_gqa")
    ids, mask = batch("left")
    ref = stock.generate(ids, attention_mask=mask, **_gen_kwargs(use_cache=False))
    out = ada.generate(ids, attention_mask=mask, exit_cache=exit_cache, exit_policy=NeverExit(),
                       **_gen_kwargs(use_cache=False))
    assert torch.equal(out, ref)

# ---------------------------------------------------------------- 6. flex attention is refused, never a crash
def test_flex_attention_with_a_policy_is_refused_before_running():
    """Row subsets do not slice flex attention's block mask (before the fix the process died of SIGFPE, seen in a
    subprocess); now refused before any layer runs, so the check runs in-process."""
    _, ada = make_pair("llama_gqa", attn="flex_attention")
    ids, mask = batch("none")
    with pytest.raises(ValueError, match="flex_attention"), torch.no_grad():
        ada(ids, attention_mask=mask, exit_policy=ScriptedExit([1, 3, 4]))

# ---------------------------------------------------------------- 7. drop-in: every generate option without a policy
def _assistant():
    stock, _ = make_pair("llama_gqa", seed=3)
    return stock


@pytest.mark.parametrize("option", ["static_cache", "assistant", "prompt_lookup"])
def test_generate_options_without_a_policy_match_stock(option):
    stock, ada = make_pair("llama_gqa")
    ids, mask = batch("none", batch_size=1)
    extra = {"static_cache": dict(cache_implementation="static"),
             "assistant": dict(assistant_model=_assistant()),
             "prompt_lookup": dict(prompt_lookup_num_tokens=2)}[option]
    ref = stock.generate(ids, attention_mask=mask, **_gen_kwargs(**extra))
    out = ada.generate(ids, attention_mask=mask, **_gen_kwargs(**extra))
    assert torch.equal(out, ref)


@pytest.mark.parametrize("option", ["cache_implementation", "assistant_model", "prompt_lookup_num_tokens"])
def test_generate_options_with_a_policy_are_refused_by_name(option):
    _, ada = make_pair("llama_gqa")
    ids, mask = batch("none", batch_size=1)
    value = {"cache_implementation": "static", "assistant_model": _assistant(), "prompt_lookup_num_tokens": 2}
    with pytest.raises(ValueError, match=option):
        ada.generate(ids, attention_mask=mask, exit_policy=ScriptedExit(2), **_gen_kwargs(**{option: value[option]}))


def test_return_dict_false_returns_tuples():
    stock, ada = make_pair("llama_gqa")
    ids, mask = batch("left")
    with torch.no_grad():
        ref = stock(ids, attention_mask=mask, return_dict=False)
        out = ada(ids, attention_mask=mask, return_dict=False)
        assert isinstance(out, tuple) and len(out) == len(ref)
        torch.testing.assert_close(out[0], ref[0])
        as_dict = ada(ids, attention_mask=mask, exit_policy=ScriptedExit([1, 3, 4]))
        as_tuple = ada(ids, attention_mask=mask, exit_policy=ScriptedExit([1, 3, 4]), return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.logits)
    assert torch.equal(as_tuple[-1], as_dict.exit_layers)
