"""Hardening of the exit loop and the drop-in surface: each test compares against the stock class or states the
documented refusal."""

from __future__ import annotations

import pytest
import torch
from tiny_models import batch, make_pair

from adainfer_hf import ExitPolicy, ScriptedExit


class NeverExit(ExitPolicy):
    """Checks after every layer and never fires (the loop runs, the output must be the stock model's)."""

    features = ("gap", "top_prob")

    def decide(self, features, layer, rows):
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
