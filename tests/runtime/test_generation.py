"""Early exit inside `generate` and pipelines: identities with the stock model, cache consistency, statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import (
    FeatureHashExit,
    assert_scores_are_the_no_cache_lens,
    batch,
    make_pair,
    tiny_tokenizer,
    truncated_stock,
)
from tiny_models import generate_greedy as _gen
from transformers import DynamicCache, pipeline

from adainfer_hf import ExitClassifier, GapThresholdRule, ScriptedExit
from adainfer_hf.architectures import core as arch
from adainfer_hf.cache.exact import ExactExitCache
from adainfer_hf.compat import output_cache

L = 4
MODES = ["propagate", "exact"]


@pytest.mark.parametrize("variant", ["llama_gqa", "opt_350m_layout"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("search", ["greedy", "beam", "sample"])
def test_never_exit_is_token_identical_to_stock(variant, mode, search):
    stock, ada = make_pair(variant)
    ids, mask = batch("left")
    kw = {"greedy": {}, "beam": {"num_beams": 3}, "sample": {"do_sample": True, "top_k": 20}}[search]
    torch.manual_seed(0)
    ref = _gen(stock, ids, mask, **kw)
    torch.manual_seed(0)
    out = _gen(ada, ids, mask, exit_policy=ScriptedExit(L, check_every_layer=True), exit_cache=mode, **kw)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("variant", ["llama_gqa", "llama_tied", "opt_pre_ln", "opt_350m_layout"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_exit_everywhere_at_k_equals_truncated_stock(variant, mode, k):
    stock, ada = make_pair(variant)
    short = truncated_stock(stock, k)
    ids, mask = batch("left")
    ref = _gen(short, ids, mask, max_new_tokens=8)
    out = _gen(ada, ids, mask, max_new_tokens=8, exit_policy=ScriptedExit(k), exit_cache=mode,
               return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    assert torch.all(out.exit_layers == k) and out.exit_layers.shape == (3, 8)


@pytest.mark.parametrize("variant", ["llama_gqa", "opt_350m_layout"])
def test_propagated_cache_has_every_position_in_every_layer(variant):
    _, ada = make_pair(variant)
    ids, mask = batch("left")
    out = _gen(ada, ids, mask, max_new_tokens=7, exit_policy=FeatureHashExit(), return_dict_in_generate=True)
    assert len(set(out.exit_layers.flatten().tolist())) > 1  # exits really varied
    total = out.sequences.shape[1] - 1  # the last token was sampled, never fed back
    assert [layer.keys.shape[-2] for layer in output_cache(out).layers] == [total] * L


@pytest.mark.parametrize("variant", ["llama_gqa", "opt_pre_ln", "opt_350m_layout"])
@pytest.mark.parametrize("padding", ["left", "none"])
def test_exact_cache_matches_no_cache_recompute(variant, padding):
    """Exact option: each generated token equals the logit lens, at its recorded exit layer, of a dense
    no-cache forward over the whole prefix (so every K/V it attended to was the dense one)."""
    stock, ada = make_pair(variant)
    ids, mask = batch(padding)
    out = _gen(ada, ids, mask, max_new_tokens=7, exit_policy=FeatureHashExit(), exit_cache="exact",
               return_dict_in_generate=True, output_scores=True)
    exits = out.exit_layers
    assert len(set(exits.flatten().tolist())) > 1
    cache = output_cache(out)
    assert isinstance(cache, ExactExitCache)
    total = out.sequences.shape[1] - 1
    owed = 0 if cache.pending_hidden is None else cache.pending_hidden.shape[1]
    assert cache.layer_length(0) == total and all(total - owed <= cache.layer_length(i) for i in range(L))
    assert_scores_are_the_no_cache_lens(stock, out, ids, mask, tokens=True)


@pytest.mark.parametrize("mode", MODES)
def test_batch_rows_exit_independently_with_eos_and_one_token(mode):
    stock, ada = make_pair("llama_gqa")
    ids, mask = batch("left")
    out = _gen(ada, ids, mask, max_new_tokens=1, exit_policy=ScriptedExit([1, 4, 2]), exit_cache=mode,
               return_dict_in_generate=True)
    assert out.exit_layers.tolist() == [[1], [4], [2]]
    with torch.no_grad():
        ref = stock(ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    for row, k in enumerate([1, 4, 2]):
        lens = ref.logits[row, -1] if k == L else arch.ExitHead(stock).logits(ref.hidden_states[k][row, -1])
        assert int(out.sequences[row, -1]) == int(lens.argmax())
    # EOS mid-batch: make row 0's first token the EOS; generation goes on for the others
    eos = int(out.sequences[0, -1])
    more = _gen(ada, ids, mask, max_new_tokens=5, exit_policy=ScriptedExit([1, 4, 2]), exit_cache=mode,
                eos_token_id=eos, return_dict_in_generate=True)
    assert int(more.sequences[0, ids.shape[1]]) == eos
    assert torch.all(more.sequences[0, ids.shape[1] + 1:] == 0)  # padded after EOS


def test_exit_statistics_running_totals():
    _, ada = make_pair("llama_gqa")
    ids, mask = batch("left")
    ada.exit_stats.reset()
    _gen(ada, ids, mask, max_new_tokens=4, exit_policy=ScriptedExit([1, 2, 3]))
    stats = ada.exit_stats
    assert stats.tokens == 12 and stats.mean_layers == pytest.approx(2.0)
    assert stats.histogram[1:4].tolist() == [4, 4, 4]
    ada.exit_stats.reset()
    assert ada.exit_stats.tokens == 0


@pytest.mark.parametrize("mode", MODES)
def test_text_generation_pipeline(mode):
    stock, ada = make_pair("llama_gqa")
    tok = tiny_tokenizer()
    ada.exit_classifier = ScriptedExit(2)
    short = truncated_stock(stock, 2)
    prompts = ["w5 w6 w7", "w10 w11"]
    gen = pipeline("text-generation", model=ada, tokenizer=tok)
    ref = pipeline("text-generation", model=short, tokenizer=tok)
    kw = dict(max_new_tokens=5, do_sample=False)
    got = gen(prompts, exit_cache=mode, **kw)
    want = ref(prompts, **kw)
    assert [g[0]["generated_text"] for g in got] == [w[0]["generated_text"] for w in want]


def test_bad_cache_mode_is_named():
    _, ada = make_pair("llama_gqa")
    ids, mask = batch("none")
    with pytest.raises(ValueError, match="'fast'"):
        _gen(ada, ids, mask, exit_cache="fast")


@pytest.mark.parametrize("variant", ["llama_gqa", "opt_350m_layout"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("decode_check_layers", [None, []])
@pytest.mark.parametrize("per_call", [False, True])
def test_empty_schedules_generate_as_the_stock_class_with_its_cache(variant, mode, decode_check_layers, per_call):
    # What `adainfer train` leaves when no check pays for itself: no prefill schedule, and no decode schedule (or
    # none of its own). The rule would fire at any check it made, so a step that checked would change the text.
    stock, ada = make_pair(variant)
    ids, mask = batch("left")
    clf = ExitClassifier(GapThresholdRule(threshold=-1.0).fit(np.zeros((1, 2))), check_layers=[],
                         decode_check_layers=decode_check_layers)
    kw = dict(return_dict_in_generate=True, output_scores=True)
    per_call_kw = {}
    if per_call:
        per_call_kw["exit_policy"] = clf
    else:
        ada.exit_classifier = clf
    ref = _gen(stock, ids, mask, **kw)
    ada.exit_stats.reset()
    out = _gen(ada, ids, mask, exit_cache=mode, **kw, **per_call_kw)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.scores, ref.scores, strict=True))
    assert type(output_cache(out)) is type(output_cache(ref))  # the stock cache, not an exit cache
    assert out.exit_layers.shape == (3, 6) and torch.all(out.exit_layers == L)
    assert ada.exit_stats.tokens == 18 and ada.exit_stats.mean_layers == L


def test_empty_schedules_keep_the_refusals_of_a_policy():
    # Skipping the exit loop must not change which options a classifier refuses (only what it costs).
    _, ada = make_pair("llama_gqa")
    ids, mask = batch("none")
    ada.exit_classifier = ExitClassifier(GapThresholdRule(threshold=-1.0).fit(np.zeros((1, 2))), check_layers=[],
                                         decode_check_layers=[])
    with pytest.raises(ValueError, match="cache_implementation='static'"):
        _gen(ada, ids, mask, cache_implementation="static")
    with pytest.raises(ValueError, match="exit_cache='exact'"):
        _gen(ada, ids, mask, exit_cache="exact", past_key_values=DynamicCache())
