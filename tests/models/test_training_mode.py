"""Training computes every layer: stock gradients with a classifier and checkpointing; an explicit policy refused."""

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




# ---------------------------------------------------------------- 9. training computes every layer
def _grads(model, ids, mask, **kw):
    model.zero_grad()
    model(ids, attention_mask=mask, labels=ids, **kw).loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("policy", [NeverExit(), ScriptedExit(1)], ids=["never", "scripted1"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_training_with_a_classifier_and_checkpointing_has_stock_gradients(reentrant, policy):
    stock, ada = make_pair("llama_gqa")
    ids, mask = batch("left")
    ref = _grads(stock.train(), ids, mask)
    ada.exit_classifier = policy
    ada.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    got = _grads(ada.train(), ids, mask)
    assert got.keys() == ref.keys()
    for name, grad in ref.items():
        assert got[name] is not None, name
        torch.testing.assert_close(got[name], grad, rtol=1e-6, atol=1e-6, msg=name)


def test_explicit_exit_policy_with_checkpointing_in_training_is_refused():
    _, ada = make_pair("llama_gqa")
    ids, mask = batch("left")
    ada.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ada.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        ada(ids, attention_mask=mask, labels=ids, exit_policy=ScriptedExit(2))
    with torch.no_grad(), pytest.raises(ValueError, match="gradient checkpointing"):
        ada(ids, attention_mask=mask, exit_policy=ScriptedExit(2))  # 5.23's checkpointing drops the cache here too
    with torch.no_grad():  # eval mode: checkpointing is inactive, the explicit policy runs
        assert ada.eval()(ids, attention_mask=mask, exit_policy=ScriptedExit(2)).exit_layers.tolist() == [2, 2, 2]
