"""Checks over a shortlist of the vocabulary (`check_vocabulary`): an exit's logits are the stock model cut at the
exit layer, restricted to the shortlist; generation with such exits is the cut stock model's generation with every
other token suppressed; the tables, training and the artifact carry the same shortlist."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import (
    VOCAB,
    batch,
    feature_table,
    generate_greedy,
    make_pair,
    task_tokenizer,
    tiny_pair,
    tiny_prompts,
    truncated_stock,
)

from adainfer_hf import AlwaysExit, ExitClassifier, ScriptedExit
from adainfer_hf.training.calibrate import simulate_exits
from adainfer_hf.training.check_cost import measure_check_cost
from adainfer_hf.training.collect import collect_features
from adainfer_hf.training.config import CalibrationConfig, ScheduleConfig, TrainingConfig
from adainfer_hf.training.train import train_on_tables
from adainfer_hf.training.vocabulary import choose_check_vocabulary, restrict_table

L = 4
SHORTLIST = tuple(range(3, VOCAB, 3))  # 32 of the 99 tokens


def _outside(ids=SHORTLIST):
    keep = torch.zeros(VOCAB, dtype=torch.bool)
    keep[list(ids)] = True
    return ~keep


@pytest.mark.parametrize("variant", ["llama_gqa", "gemma3_text", "opt_350m_layout"])
def test_exit_logits_are_the_cut_stock_models_over_the_shortlist(variant):
    stock, ada = make_pair(variant)
    cut = truncated_stock(stock, 2)
    ids, mask = batch("right")  # row 1's last real token is not the last position
    policy = ScriptedExit([2, 2, L], check_vocabulary=SHORTLIST)
    with torch.no_grad():
        ref_cut = cut(ids, attention_mask=mask, use_cache=False).logits
        ref_full = stock(ids, attention_mask=mask, use_cache=False).logits
        kept = ada(ids, attention_mask=mask, use_cache=False, exit_policy=policy, logits_to_keep=0).logits
    last = mask.sum(-1) - 1
    outside = _outside()
    for row in (0, 1):
        at = last[row]
        torch.testing.assert_close(kept[row, at, ~outside], ref_cut[row, at, ~outside], atol=1e-5, rtol=1e-4)
        assert torch.isneginf(kept[row, at, outside]).all()
        torch.testing.assert_close(kept[row, :at], ref_cut[row, :at], atol=1e-5, rtol=1e-4)  # other positions
    torch.testing.assert_close(kept[2], ref_full[2], atol=1e-5, rtol=1e-4)  # full depth: the stock head
    with torch.no_grad():  # more positions asked for than the input has: all of them, as the stock model gives
        more = ada(ids, attention_mask=mask, use_cache=False, exit_policy=policy, logits_to_keep=ids.shape[1] + 4)
    torch.testing.assert_close(more.logits, kept)


@pytest.mark.parametrize("exit_cache", ["exact", "propagate"])
def test_generation_exiting_over_a_shortlist_is_the_cut_model_with_other_tokens_suppressed(exit_cache):
    stock, ada = make_pair("llama_gqa")
    ids, mask = batch("left")
    suppress = _outside().nonzero().squeeze(-1).tolist()
    reference = generate_greedy(truncated_stock(stock, 2), ids, mask, suppress_tokens=suppress)
    out = generate_greedy(ada, ids, mask, exit_policy=ScriptedExit(2, check_vocabulary=SHORTLIST),
                          exit_cache=exit_cache)
    assert out.tolist() == reference.tolist()  # (layers 1-2 never read deeper layers' cache)
    assert set(out[:, ids.shape[1]:].flatten().tolist()) <= set(SHORTLIST)


def test_the_shortlist_is_validated_and_stored(tmp_path):
    rule = AlwaysExit().fit(np.zeros((1, 2)))
    clf = ExitClassifier(rule, check_vocabulary=[9, 3, 5])
    assert clf.check_vocabulary == (3, 5, 9)
    clf.save_pretrained(tmp_path / "c")
    assert ExitClassifier.from_pretrained(tmp_path / "c").check_vocabulary == (3, 5, 9)
    for bad, match in (([3, 3, 5], "repeats"), ([3, -1], "not ints"), ([3], "at least 2"), ([True, 4], "not ints"),
                       ("abc", "not ints.*'a'")):
        with pytest.raises(ValueError, match=match):
            ExitClassifier(rule, check_vocabulary=bad)
    _, ada = make_pair("llama_gqa")
    ids, mask = batch("none")
    with pytest.raises(ValueError, match=f"token id {VOCAB}.*{VOCAB} outputs"):
        ada(ids, attention_mask=mask, exit_policy=ScriptedExit(2, check_vocabulary=[3, VOCAB]))
    unsorted = ScriptedExit(2)
    unsorted.check_vocabulary = (VOCAB + 5, 3)  # a policy's own attribute, not validated (nor sorted) on the way in
    with pytest.raises(ValueError, match=f"token id {VOCAB + 5}.*{VOCAB} outputs"):
        ada(ids, attention_mask=mask, exit_policy=unsorted)
    bound = clf.bind(ada)
    with pytest.raises(ValueError, match="not ints \\[0, 99\\)"):
        bound.replace(check_vocabulary=[3, 120])


def test_choose_check_vocabulary_takes_the_most_frequent_dense_tokens_then_the_lowest_ids():
    table = feature_table(tokens=np.full((6, 2), 7), gap=np.full((6, 2), 0.1), top_prob=np.full((6, 2), 0.3),
                          final=np.array([9, 8, 4, 8, 9, 8]))
    assert choose_check_vocabulary(table, 2) == (8, 9)  # 8 three times, 9 twice, 4 once
    assert choose_check_vocabulary(table, 3) == (4, 8, 9)
    assert choose_check_vocabulary(table, 5) == (0, 1, 4, 8, 9)  # every dense token, then the lowest ids
    assert choose_check_vocabulary(table, 12, width=11) == tuple(range(11))  # no more than the head has
    with pytest.raises(ValueError, match="int >= 2"):
        choose_check_vocabulary(table, 1)


def test_restricted_table_is_the_stock_lens_over_the_shortlist():
    stock, model = tiny_pair()
    table = collect_features(model, task_tokenizer(), tiny_prompts(2), features=("gap", "top_prob"), progress=False,
                             hidden_states=True)
    restricted = restrict_table(model, table, SHORTLIST)
    # reference: the stock final norm and the stock head's rows, on the same float16 hidden states
    with torch.no_grad():
        normed = stock.model.norm(torch.from_numpy(table.hidden).float())
        logits = normed @ stock.lm_head.weight[list(SHORTLIST)].T
    probs = torch.softmax(logits.double(), -1)
    top2 = probs.topk(2, -1)
    np.testing.assert_allclose(restricted.columns(["top_prob"])[:, 0], top2.values[:, 0].numpy(), atol=1e-5)
    np.testing.assert_allclose(restricted.columns(["gap"])[:, 0], (top2.values[:, 0] - top2.values[:, 1]).numpy(),
                               atol=1e-5)
    assert restricted.top_token.tolist() == [SHORTLIST[i] for i in top2.indices[:, 0].tolist()]
    assert restricted.final_token.tolist() == table.final_token.tolist()  # the dense token stays the reference
    assert restricted.meta["check_vocabulary"] == list(SHORTLIST)
    with pytest.raises(ValueError, match="no hidden states|has none"):
        restrict_table(model, collect_features(model, task_tokenizer(), tiny_prompts(1), progress=False), SHORTLIST)


def test_a_rule_trained_over_a_shortlist_runs_as_simulated_and_exits_inside_it():
    _, model = tiny_pair()
    tok = task_tokenizer()
    prompts = tiny_prompts(4)
    table = collect_features(model, tok, prompts, features=("gap", "top_prob"), progress=False, hidden_states=True)
    half = table.num_prompts // 2
    train, calib = table.select_prompts(range(half)), table.select_prompts(range(half, table.num_prompts))
    config = TrainingConfig(method="gate_only", schedule=ScheduleConfig(check_cost=None, check_vocabulary=8),
                            calibration=CalibrationConfig(target_agreement=0.5, delta=0.5))
    clf = train_on_tables(model, train, calib, config)
    assert clf.check_vocabulary == choose_check_vocabulary(train, 8)
    # a looser gate, so that more rows exit (calibration also puts a threshold exactly on a row's score, where the
    # float16 table and the float32 run may fall on either side)
    clf = clf.replace(gate=clf.gate.shifted(-1.0))
    expected, _ = simulate_exits(clf, restrict_table(model, table, clf.check_vocabulary))
    tok.padding_side = "left"
    enc = tok([p.text for p in prompts], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**enc, use_cache=False, exit_policy=clf)
    assert out.exit_layers.tolist() == expected.tolist()
    exited = out.exit_layers < model.config.num_hidden_layers
    assert exited.any()
    assert set(out.logits[exited, -1].argmax(-1).tolist()) <= set(clf.check_vocabulary)


def test_measuring_a_shortlisted_check_validates_the_shortlist():
    stock, _ = make_pair("llama_gqa")
    with pytest.raises(ValueError, match="repeats"):
        measure_check_cost(stock, phase="decode", check_vocabulary=[3, 3])
    with pytest.raises(ValueError, match="not ints \\[0, 99\\)"):
        measure_check_cost(stock, phase="decode", check_vocabulary=[3, VOCAB])


def test_policies_with_the_same_shortlist_share_the_gathered_head_rows():
    """Two classifiers with the same ids alternating on one model (twins at two targets) gather the head's rows
    once; a different shortlist gathers its own, and the exits stay the cut stock model's over each."""
    stock, ada = make_pair("llama_gqa")
    ids, mask = batch("none")
    twins = [ScriptedExit(2, check_vocabulary=list(SHORTLIST)) for _ in range(2)]
    other = ScriptedExit(2, check_vocabulary=list(range(0, VOCAB, 2)))
    gathered = []
    with torch.no_grad():
        ref = truncated_stock(stock, 2)(ids, attention_mask=mask, use_cache=False).logits[:, -1]
        for policy in (twins[0], twins[1], twins[0], other):
            out = ada(ids, attention_mask=mask, use_cache=False, exit_policy=policy)
            keep = list(policy.check_vocabulary)
            assert (out.logits[:, -1, keep] - ref[:, keep]).abs().max() <= 1e-5
            head = ada.exit_head
            gathered.append(head.rows(head.vocabulary(policy.check_vocabulary), torch.float32)[0])
    assert gathered[0] is gathered[1] is gathered[2]
    assert gathered[3] is not gathered[0] and gathered[3].shape[0] == len(other.check_vocabulary)


@pytest.mark.parametrize("variant", ["llama_gqa", "opt_350m_layout"])
def test_every_form_of_logits_to_keep_gives_the_shortlist_at_an_exited_rows_last_position(variant):
    # Issue 28.3: a 1-D tensor of positions took the full-vocabulary lens there, integers the shortlist.
    stock, ada = make_pair(variant)
    cut = truncated_stock(stock, 2)
    ids, mask = batch("none")
    T = ids.shape[1]
    policy = ScriptedExit([2, 2, L], check_vocabulary=SHORTLIST)
    outside = _outside()
    with torch.no_grad():
        ref_cut = cut(ids, attention_mask=mask, use_cache=False).logits
        ref_full = stock(ids, attention_mask=mask, use_cache=False).logits
    forms = [0, 1, 2, torch.tensor([T - 1]), torch.tensor([0, T - 1]), torch.tensor([-1])]
    for keep in forms:
        with torch.no_grad():
            out = ada(ids, attention_mask=mask, use_cache=False, exit_policy=policy, logits_to_keep=keep).logits
        assert out.shape[1] == (T if isinstance(keep, int) and keep == 0 else
                                keep if isinstance(keep, int) else keep.numel()), keep
        for row in (0, 1):
            last = out[row, -1]
            torch.testing.assert_close(last[~outside], ref_cut[row, -1, ~outside], atol=1e-5, rtol=1e-4)
            assert torch.isneginf(last[outside]).all(), keep
        torch.testing.assert_close(out[2, -1], ref_full[2, -1], atol=1e-5, rtol=1e-4)


def test_a_bf16_check_gives_the_same_exit_logits_for_every_logits_to_keep():
    # Issue 28.4: logits_to_keep=0 gave the model-dtype head, 1 the bf16 check's logits (maxdiff 0.017). One
    # definition: the check's logits, computed in bf16, whatever the form; reference: the cut stock model's
    # last-position logits with its head in bf16.
    stock, ada = make_pair("llama_gqa")
    cut = truncated_stock(stock, 2)
    ids, mask = batch("none")
    T = ids.shape[1]
    policy = ScriptedExit(2, check_dtype="bfloat16")
    with torch.no_grad():
        h = cut(ids, attention_mask=mask, use_cache=False, output_hidden_states=True).hidden_states[-1][:, -1]
        normed = cut.model.norm(h)
        ref = (normed.bfloat16() @ cut.lm_head.weight.bfloat16().T).float()
        outs = [ada(ids, attention_mask=mask, use_cache=False, exit_policy=policy, logits_to_keep=keep).logits[:, -1]
                for keep in (0, 1, 3, torch.tensor([T - 1]))]
    for got in outs:
        torch.testing.assert_close(got, outs[1], atol=0, rtol=0)
    torch.testing.assert_close(outs[1], ref, atol=2e-2, rtol=2e-2)
    assert (outs[0] - (normed @ cut.lm_head.weight.T)).abs().max() > 1e-4  # bf16 really differs from fp32 here


@pytest.mark.parametrize("variant", ["llama_gqa", "opt_350m_layout"])
def test_the_loss_is_the_cut_models_for_labels_outside_the_shortlist(variant):
    # Issue 28.5: pad labels given as the pad id (not -100), outside the shortlist, made the loss inf.
    stock, ada = make_pair(variant)
    cut = truncated_stock(stock, 2)
    ids, mask = batch("right")
    pad = 1  # outside SHORTLIST (multiples of 3 from 3)
    assert pad not in SHORTLIST
    labels = ids.masked_fill(mask == 0, pad)
    with torch.no_grad():
        ref = cut(ids, attention_mask=mask, labels=labels, use_cache=False).loss
        out = ada(ids, attention_mask=mask, labels=labels, use_cache=False,
                  exit_policy=ScriptedExit(2, check_vocabulary=SHORTLIST))
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, ref, atol=1e-5, rtol=1e-5)
    assert torch.isneginf(out.logits[0, -1, _outside()]).all()  # the returned logits keep the shortlist
