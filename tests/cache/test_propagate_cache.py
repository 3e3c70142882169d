"""The propagate cache option computes skipped layers' K/V only when something reads them: same values as the
eager fill, never computed when nothing needs them."""

from __future__ import annotations

import pytest
import torch
from tiny_models import batch, make_pair
from transformers import DynamicCache

from adainfer_hf import ExitPolicy, PropagateExitCache, ScriptedExit
from adainfer_hf.architectures import core as arch
from adainfer_hf.architectures.kv_fill import KVFill
from adainfer_hf.compat import output_cache

L = 4


class StepSchedule(ExitPolicy):
    """Every row of forward call i exits after layer `schedule[i % len]` (L = full depth): whole-batch exits of
    varied depth, with later tokens running layers earlier tokens skipped."""

    def __init__(self, schedule):
        self.features = ("gap", "top_prob")
        self.min_layer = 1
        self.check_layers = None
        self.schedule = list(schedule)
        self.calls = 0

    def begin_run(self, batch_size):
        self.calls += 1
        return {"target": self.schedule[(self.calls - 1) % len(self.schedule)]}

    def decide(self, features, layer, rows, state=None):
        return torch.full((rows.shape[0],), layer >= state["target"], dtype=torch.bool, device=features.device)


def _generate(model, ids, mask, policy, cache=None, **kw):
    kw.setdefault("max_new_tokens", 6)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=0, exit_policy=policy,
                              past_key_values=cache, return_dict_in_generate=True, output_scores=True, **kw)


@pytest.mark.parametrize("variant", ["llama_gqa", "opt_pre_ln", "opt_350m_layout"])
def test_prefill_exit_defers_and_reads_equal_the_stock_hidden_states_projection(variant):
    """After a forward where every row exits at k, deeper layers owe K/V; reading them gives K/V computed from the
    stock model's layer-k hidden states (the independent reference)."""
    stock, ada = make_pair(variant)
    ids, mask = batch("left")
    k = 2
    with torch.no_grad():
        out = ada(ids, attention_mask=mask, exit_policy=ScriptedExit(k), use_cache=True)
        ref = stock(ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    cache = output_cache(out)
    assert isinstance(cache, PropagateExitCache) and cache.has_deferred
    spec = arch.spec_of(stock)
    pos = spec.position_embeddings(stock, ref.hidden_states[k], torch.arange(ids.shape[1])[None])
    for idx in range(k, L):
        want_k, want_v = spec.layer_kv_states(stock, spec.decoder_layers(stock)[idx], ref.hidden_states[k], pos)
        layer = cache.layers[idx]
        torch.testing.assert_close(layer.keys, want_k, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.values, want_v, atol=1e-5, rtol=1e-5)
    assert not cache.has_deferred
    assert [cache.get_seq_length(i) for i in range(L)] == [ids.shape[1]] * L


@pytest.mark.parametrize("variant", ["llama_gqa", "opt_pre_ln"])
@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_deferred_fill_generates_what_the_eager_fill_generates(variant, search):
    """Same policy, same prompts: a plain DynamicCache (filled at exit time) and the deferred cache give the same
    tokens, scores and final cache, with prefill and steps exiting shallow and deep in turn."""
    _, ada = make_pair(variant)
    ids, mask = batch("left")
    kw = {"num_beams": 3} if search == "beam" else {}
    schedule = [1, 2, L, 1, 3, 1, 1, L, 2]
    eager = _generate(ada, ids, mask, StepSchedule(schedule), DynamicCache(config=ada.config), **kw)
    lazy = _generate(ada, ids, mask, StepSchedule(schedule), **kw)
    assert isinstance(output_cache(lazy), PropagateExitCache)
    assert torch.equal(lazy.sequences, eager.sequences)
    assert torch.equal(lazy.exit_layers, eager.exit_layers)
    assert len(set(lazy.exit_layers.flatten().tolist())) >= 3
    for a, b in zip(lazy.scores, eager.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for la, lb in zip(output_cache(lazy).layers, output_cache(eager).layers, strict=True):
        torch.testing.assert_close(la.keys, lb.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(la.values, lb.values, atol=1e-5, rtol=1e-5)


def test_nothing_is_computed_when_no_later_token_needs_the_skipped_layers(monkeypatch):
    """Every token exits at 2: generate's own cache handling never forces the deferred K/V."""
    _, ada = make_pair("llama_gqa")
    ids, mask = batch("left")
    calls = []
    spec = type(arch.spec_of(ada))
    real = spec.layer_kv_states
    monkeypatch.setattr(spec, "layer_kv_states", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(KVFill, "stacked", lambda *a, **k: pytest.fail("eager fill used"))
    out = _generate(ada, ids, mask, ScriptedExit(2), max_new_tokens=5)
    cache = output_cache(out)
    assert calls == [] and cache.has_deferred
    assert cache.layers[0].keys.shape[-2] == out.sequences.shape[1] - 1
    cache.materialize()  # and on demand they are all there
    assert not cache.has_deferred and len(calls) == L - 2
    assert [layer.keys.shape[-2] for layer in cache.layers] == [out.sequences.shape[1] - 1] * L


def test_beam_reorder_keeps_owed_states_unmaterialised():
    _, ada = make_pair("llama_gqa")
    ids, mask = batch("left")
    out = _generate(ada, ids, mask, ScriptedExit(1), num_beams=3, max_new_tokens=4)
    assert output_cache(out).has_deferred
    eager = _generate(ada, ids, mask, ScriptedExit(1), DynamicCache(config=ada.config), num_beams=3,
                      max_new_tokens=4)
    assert torch.equal(out.sequences, eager.sequences)
    for la, lb in zip(output_cache(out).layers, output_cache(eager).layers, strict=True):
        torch.testing.assert_close(la.keys, lb.keys, atol=1e-5, rtol=1e-5)


def test_other_read_paths_see_a_complete_cache():
    _, ada = make_pair("llama_gqa")
    ids, mask = batch("none")
    with torch.no_grad():
        out = ada(ids, attention_mask=mask, exit_policy=ScriptedExit(1), use_cache=True)
    cache = output_cache(out)
    assert cache.get_seq_length(L - 1) == ids.shape[1]  # a deep layer's length reads its owed positions
    cache.crop(-2)
    assert [layer.keys.shape[-2] for layer in cache.layers] == [ids.shape[1] - 2] * L
    with torch.no_grad():
        out = ada(ids, attention_mask=mask, exit_policy=ScriptedExit(1), use_cache=True)
    triples = list(output_cache(out))
    assert [t[0].shape[-2] for t in triples] == [ids.shape[1]] * L
    with torch.no_grad():
        out = ada(ids, attention_mask=mask, exit_policy=ScriptedExit(1), use_cache=True)
    output_cache(out).reset()
    assert not output_cache(out).has_deferred and output_cache(out).get_seq_length(L - 1) == 0


def test_a_deleted_model_is_named_when_owed_values_are_read():
    _, ada = make_pair("llama_gqa")
    ids, mask = batch("none")
    with torch.no_grad():
        cache = output_cache(ada(ids, attention_mask=mask, exit_policy=ScriptedExit(1), use_cache=True))
    del ada
    import gc

    gc.collect()
    with pytest.raises(RuntimeError, match="model .* was deleted"):
        cache.layers[L - 1].keys  # noqa: B018


def test_deepcopy_copies_owed_states_not_the_model():
    import copy

    _, ada = make_pair("llama_gqa")
    ids, mask = batch("none")
    with torch.no_grad():
        cache = output_cache(ada(ids, attention_mask=mask, exit_policy=ScriptedExit(1), use_cache=True))
    twin = copy.deepcopy(cache)
    assert twin.layers[L - 1].__dict__["_owed_source"][0]() is ada  # a weak reference: the model is not copied
    torch.testing.assert_close(twin.layers[L - 1].keys, cache.layers[L - 1].keys)


def test_generate_without_cache_still_exits_like_the_truncated_model():
    from tiny_models import truncated_stock

    stock, ada = make_pair("llama_gqa")
    ids, mask = batch("left")
    with torch.no_grad():
        ref = truncated_stock(stock, 2).generate(ids, attention_mask=mask, do_sample=False, pad_token_id=0,
                                                 max_new_tokens=4, use_cache=False)
        out = ada.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=0, max_new_tokens=4,
                           use_cache=False, exit_policy=ScriptedExit(2), return_dict_in_generate=True)
    assert output_cache(out) is None
    assert torch.equal(out.sequences, ref)
