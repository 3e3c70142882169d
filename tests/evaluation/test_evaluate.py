"""Evaluation metrics against independent references computed by hand from the stock model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import make_pair, tiny_tokenizer

from adainfer_hf.data.prompts import Example, Task, build_prompts
from adainfer_hf.estimators.rules import GapThresholdRule
from adainfer_hf.evaluation.evaluate import (
    LiveCRFPolicy,
    evaluate,
    evaluate_prompts,
    flops_ratio,
    oracle_exit_layers,
    prepare_baselines,
)
from adainfer_hf.evaluation.report import RESULT_KEYS, finalize_results, merge_shards
from adainfer_hf.policy.classifier import ExitClassifier
from adainfer_hf.training.collect import collect_features

L = 4



def _lens(stock, h):
    """Independent logit lens of a Llama hidden state: final RMSNorm, then the LM head."""
    return stock.lm_head(stock.model.norm(h))


def _stock_pass(stock, tok, text):
    """Per-layer logit-lens logits [L, V] of the prompt's last token (layer L = the model's own logits)."""
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = stock(ids, output_hidden_states=True)
    lens = [_lens(stock, out.hidden_states[k][0, -1]) for k in range(1, L)]
    return torch.stack([*lens, out.logits[0, -1]])


def _gap(logits):
    p = logits.detach().softmax(-1).topk(2).values
    return float(p[0] - p[1])


@pytest.fixture(scope="module")
def setup():
    """A tiny Llama and a 0-shot task whose gold answer is the stock model's own prediction for half the examples."""
    stock, ada = make_pair("llama_gqa")
    tok = tiny_tokenizer()
    rng = np.random.default_rng(0)
    examples = []
    for a, b in rng.integers(3, 99, (26, 2)):
        query = f"w{a} w{b}"
        top = int(_stock_pass(stock, tok, f"Q: {query}\nA:")[-1].argmax())
        wrong = 3 + (top + 7) % 96
        answer = top if top >= 3 and len(examples) % 2 == 0 else wrong
        examples.append(Example(query, f"w{answer}"))
    task = Task("tiny", examples)
    pool = build_prompts(task, 0, seed=0)
    return stock, ada, tok, pool[:8], pool[8:]


def test_flops_ratio_by_hand():
    h, s, V, Lm = 32, 10, 99, 4
    expected = (2 * 2 * (6 * h + s) + V) / (2 * Lm * (6 * h + s) + V)
    assert flops_ratio([2], Lm, h, [s], V)[0] == pytest.approx(expected)
    assert flops_ratio([Lm], Lm, h, [s], V)[0] == pytest.approx(1.0)
    with_checks = (2 * 2 * (6 * h + s) + 3 * V) / (2 * Lm * (6 * h + s) + V)
    assert flops_ratio([2], Lm, h, [s], V, heads=[3])[0] == pytest.approx(with_checks)


def test_oracle_layers_from_stock_logit_lens(setup):
    stock, ada, tok, prompts, _ = setup
    table = collect_features(ada, tok, prompts, features=("gap", "top_prob"), batch_size=1, progress=False)
    expected = []
    for p in prompts:
        top = _stock_pass(stock, tok, p.text).argmax(-1).tolist()
        k = L
        while k > 1 and top[k - 2] == top[-1]:
            k -= 1
        expected.append(k)
    assert oracle_exit_layers(table).tolist() == expected


def test_metrics_against_stock(setup):
    stock, ada, tok, prompts, calibration = setup
    lens = [_stock_pass(stock, tok, p.text) for p in prompts]
    gold = np.array([int(p.answer[1:]) for p in prompts])  # word-level tokenizer: "w17" is id 17
    gaps = np.array([[_gap(x[k]) for k in range(L - 1)] for x in lens])
    threshold = float(np.quantile(gaps, 0.6))
    clf = ExitClassifier(GapThresholdRule(threshold=threshold).fit(np.zeros((1, 2)))).bind(ada)
    res = evaluate(ada, tok, prompts, calibration, methods=("dense", "adainfer", "shortgpt", "oracle"),
                   exit_classifier=clf, shortgpt_layers=1, batch_size=1, max_new_tokens=1, sweep_targets=(0.5,),
                   progress=False)
    by = {r["method"]: r for r in res["results"]}
    assert all(set(RESULT_KEYS) <= set(r) for r in res["results"])
    assert {r["task"] for r in res["results"]} == {"tiny"} and len(res["results"]) == 4

    dense_top = np.array([int(x[-1].argmax()) for x in lens])
    d = by["dense"]
    assert d["n"] == len(prompts) and d["accuracy"] == pytest.approx((dense_top == gold).mean())
    assert 0 < d["accuracy"] < 1  # the task was built so that the check is not trivial
    assert (d["mean_layers"], d["var_layers"], d["pruning_ratio"], d["flops_ratio"]) == (L, 0, 0, 1)
    assert d["exact_match"] == pytest.approx(d["accuracy"])  # one new token, one-token answers
    assert d["seconds"] > 0 and d["dense_seconds"] == pytest.approx(d["seconds"])

    # adainfer: first layer whose gap exceeds the threshold, read off the stock logit lens by hand
    exit_layer = np.array([next((k + 1 for k in range(L - 1) if g[k] > threshold), L) for g in gaps])
    exit_top = np.array([int(x[k - 1].argmax()) for x, k in zip(lens, exit_layer, strict=True)])
    a = by["adainfer"]
    assert 1 <= exit_layer.min() and exit_layer.mean() < L
    assert a["mean_layers"] == pytest.approx(exit_layer.mean())
    assert a["var_layers"] == pytest.approx(exit_layer.var())
    assert a["pruning_ratio"] == pytest.approx(1 - exit_layer.mean() / L)
    assert a["accuracy"] == pytest.approx((exit_top == gold).mean())
    assert a["agreement_with_dense"] == pytest.approx((exit_top == dense_top).mean())
    s = np.array([len(tok(p.text)["input_ids"]) for p in prompts])
    cfg = ada.config
    assert a["flops_ratio"] == pytest.approx(
        np.mean((2 * exit_layer * (6 * cfg.hidden_size + s) + cfg.vocab_size)
                / (2 * L * (6 * cfg.hidden_size + s) + cfg.vocab_size)))
    assert sum(a["exit_histogram"].values()) == len(prompts)

    # oracle: exact agreement with dense at the oracle layers; ShortGPT: L - n layers
    o = by["oracle"]
    assert o["agreement_with_dense"] == 1.0 and o["accuracy"] == pytest.approx(d["accuracy"])
    assert by["shortgpt"]["mean_layers"] == L - 1 and res["methods"]["shortgpt"]["removed_layers"]
    assert res["calibration_sweep"] and res["calibration_sweep"][0]["n"] == len(prompts)
    curve = res["layer_curves"][0]
    assert curve["lens_accuracy"][-1] == pytest.approx(d["accuracy"])
    assert curve["lens_agreement"][-1] == 1.0 and len(curve["mean_gap"]) == L - 1


def test_live_crf_matches_its_simulation(setup):
    stock, ada, tok, prompts, calibration = setup
    from adainfer_hf.training.calibrate import exit_scores, simulate_exits
    from adainfer_hf.training.train import train_exit_classifier

    cal_table = collect_features(ada, tok, calibration, features=("gap", "top_prob"), batch_size=4, progress=False)
    crf = train_exit_classifier(cal_table, method="crf")
    table = collect_features(ada, tok, prompts, features=("gap", "top_prob"), batch_size=1, progress=False)
    # A threshold at the median causal score makes some prompts exit at various layers (calibration on a random
    # model would rather never exit); min_layer 2 checks that earlier layers still feed the CRF's history.
    scores = exit_scores(crf, table)
    crf = ExitClassifier(crf.estimator, threshold=float(np.median(scores[table.layer >= 2])), min_layer=2)
    policy = LiveCRFPolicy(crf)
    expected, _ = simulate_exits(crf, table)
    assert 2 <= expected.min() and expected.min() < L
    live = []
    with torch.no_grad():
        for p in prompts:
            out = ada(**tok(p.text, return_tensors="pt"), use_cache=False, exit_policy=policy)
            live.append(int(out.exit_layers[0]))
    assert live == expected.tolist()


def test_shards_merge_to_the_single_run(setup):
    stock, ada, tok, prompts, calibration = setup
    clf = ExitClassifier(GapThresholdRule(threshold=0.02).fit(np.zeros((1, 2)))).bind(ada)
    methods = ("dense", "adainfer", "oracle")
    base = prepare_baselines(ada, tok, calibration, methods=methods, exit_classifier=clf, sweep_targets=(0.6,),
                             progress=False)
    kw = dict(methods=methods, batch_size=1, max_new_tokens=0, progress=False)
    whole = finalize_results(evaluate_prompts(ada, tok, prompts[:6], base, **kw))
    parts = merge_shards([evaluate_prompts(ada, tok, prompts[:2], base, **kw),
                          evaluate_prompts(ada, tok, prompts[2:6], base, **kw)])
    merged = finalize_results(parts)
    for a, b in zip(whole["results"], merged["results"], strict=True):
        for key in ("n", "accuracy", "mean_layers", "var_layers", "flops_ratio", "agreement_with_dense"):
            assert a[key] == pytest.approx(b[key]), key
        assert a["exact_match"] is None
    assert whole["calibration_sweep"][0]["accuracy"] == pytest.approx(merged["calibration_sweep"][0]["accuracy"])


def test_generalization_study_loto_and_inter_model(setup):
    from adainfer_hf.evaluation.study import generalization_study, transfer_classifier

    stock, ada, tok, _, _ = setup
    rng = np.random.default_rng(3)
    tasks = [Task(name, [Example(f"w{a} w{b}", f"w{(a + b) % 90 + 5}") for a, b in rng.integers(3, 99, (24, 2))])
             for name in ("t1", "t2")]
    _, other = make_pair("llama_gqa", seed=1)
    res = generalization_study(ada, tok, tasks, "loto", shots=(0,), limit=10, method="gap_rule",
                               target_agreement=0.5, other_model=other, other_tokenizer=tok, batch_size=5,
                               progress=False)
    assert {(r["split"], r["task"]) for r in res["results"]} == {("loto:t1", "t1"), ("loto:t2", "t2")}
    assert len(res["results"]) == 4  # two splits x (model A, model B)
    for r in res["results"]:
        assert r["n"] == 10 and r["train_tasks"] == (["t2"] if r["task"] == "t1" else ["t1"])
        assert 1 <= r["mean_layers"] <= L
    clf = ExitClassifier(GapThresholdRule().fit(np.zeros((1, 2))), min_layer=3, num_layers=4, check_layers=(3,),
                         decode_check_layers=(3,), check_dtype="bfloat16", threshold=0.25).bind(ada)
    moved = transfer_classifier(clf, 8)
    assert (moved.min_layer, moved.num_layers) == (6, 8)
    assert moved.check_layers == (6,) and moved.decode_check_layers == (6,)
    # everything else carries over; what identified the source model does not
    assert (moved.check_dtype, moved.threshold, moved.label) == ("bfloat16", 0.25, clf.label)
    assert moved.lm_head_fingerprint is None and moved.base_model_name_or_path is None
    with pytest.raises(ValueError, match="mode='bogus' is not supported"):
        generalization_study(ada, tok, tasks, "bogus")
