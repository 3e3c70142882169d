"""The drafting objective (`training.drafting`): the simulated lossless loop against the real one, the search, the
"nothing pays" result, the artifact's drafting record and the draft cap it gives `generate`."""

import json

import numpy as np
import pytest
import torch
from tiny_models import task_tokenizer, tiny_pair, tiny_prompts

import adainfer_hf.models.modeling as modeling
from adainfer_hf import DraftingConfig, ExitClassifier, GenerationCalibrationConfig, TrainingConfig
from adainfer_hf.estimators.rules import AlwaysExit
from adainfer_hf.training import (
    CostModel,
    DraftRule,
    choose_drafting_rule,
    collect_generation_features,
    simulate_drafting,
    train_and_calibrate,
    train_exit_classifier,
    train_on_tables,
)

T = 10  # tokens per generation


def _cost(L=4, layer=1.0, head=1.0, lens=0.5, stock=None, shared=0.1):
    """A cost model: a layer or the head on n positions costs `x * (1 + shared * (n - 1))`."""
    n = range(9)
    return CostModel(num_layers=L, layer_seconds=tuple(layer * (1 + shared * i) for i in n),
                     head_seconds=tuple(head * (1 + shared * i) for i in n), lens_seconds={"full": lens},
                     gate_seconds=0.0, loop_fixed_seconds=0.0,
                     stock_step_seconds=L * layer + head if stock is None else stock)


@pytest.fixture(scope="module")
def setup():
    _, model = tiny_pair()
    model.generation_config.eos_token_id = None  # T tokens per prompt, as the table records them
    tok = task_tokenizer()
    prompts = tiny_prompts(4, (0,))
    table = collect_generation_features(model, tok, prompts, new_tokens=T, features=("gap", "top_prob"),
                                        progress=False)
    clf = train_exit_classifier(table, method="logistic", features=("gap", "top_prob"))
    return model, tok, prompts, table, clf


def _measured(model, tok, prompts, policy, cap):
    """Per prompt, the real lossless generate's (draft tokens, accepted tokens), and whether it equals stock."""
    counts = []
    for p in prompts:
        inputs = tok(p.text, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=T, do_sample=False, exit_policy=policy, lossless=True,
                             max_draft_tokens=cap, return_dict_in_generate=True, pad_token_id=0)
        stock = model.generate(**inputs, max_new_tokens=T, do_sample=False, exit_policy=None, pad_token_id=0)
        assert torch.equal(out.sequences, stock)
        counts.append((int(out.draft_tokens[0]), int(out.accepted_tokens[0])))
    return counts


def _threshold(clf, table, layer, q):
    scores = np.unique(clf.score(table.columns(clf.features))[table.layer == layer])
    i = int(q * (scores.size - 1))
    return float((scores[i] + scores[i + 1]) / 2)  # halfway between two table scores: no row on the cut


@pytest.mark.parametrize("layers,cap", [((2,), 1), ((1, 3), 1), ((2,), 3)])
def test_simulated_draft_and_accept_counts_are_the_real_loops(setup, layers, cap):
    model, tok, prompts, table, clf = setup
    if cap == 1:  # a threshold on the classifier: exact with cap 1 (no step runs on a rejected draft's prefix)
        rule_clf = clf.replace(threshold=_threshold(clf, table, layers[0], 0.5), check_layers=list(layers),
                               decode_check_layers=list(layers))
    else:  # a rule that fires wherever it checks: exact for every cap
        rule_clf = ExitClassifier(AlwaysExit().fit(np.zeros((1, 2))), check_layers=list(layers),
                                  decode_check_layers=list(layers))
    rule = DraftRule(tuple(layers), float(rule_clf.threshold) if rule_clf.threshold is not None else -np.inf, cap)
    sim = simulate_drafting(table, rule_clf, rule, _cost())
    measured = _measured(model, tok, prompts, rule_clf, cap)
    assert [(int(d), int(a)) for d, a in zip(sim.drafted, sim.accepted, strict=True)] == measured
    assert sum(d for d, _ in measured) > 0 and any(d > a for d, a in measured)  # drafts, some rejected


def test_predicted_seconds_are_the_cost_models_steps(setup):
    """One fixed-layer rule with cap 2 on one sequence, priced by hand from the simulated step sequence."""
    _, _, _, table, _ = setup
    always = ExitClassifier(AlwaysExit().fit(np.zeros((1, 2))))
    one = table.select_prompts(np.flatnonzero(table.sequence == 0))
    cost = _cost()
    sim = simulate_drafting(one, always, DraftRule((2,), -np.inf, 2), cost)
    # every step drafts while it may: draft, draft, verify (P = 2) per round; a round emits accepted + 1 tokens
    dense = one.final_token
    top2 = one.top_token[one.layer == 2]
    n, seconds, rounds = 1, 0.0, 0
    while n < T:
        k = min(2, T - n - 1)
        seconds += (cost.draft_step_seconds(2, 1) if k >= 1 else 0.0) + (
            cost.draft_step_seconds(2, 1, (2,)) if k == 2 else 0.0)
        seconds += cost.verify_step_seconds((2,) * k)
        good = 0
        while good < k and top2[n + good] == dense[n + good]:
            good += 1
        n, rounds = n + good + 1, rounds + 1
    assert sim.seconds == pytest.approx(seconds)
    assert sim.stock_seconds == pytest.approx((T - 1) * cost.stock_step())
    assert int(sim.verifications[0]) == rounds and sim.draft_length == pytest.approx((T - 1) / rounds)


def test_nothing_pays_gives_an_empty_schedule_and_the_stock_generate(setup):
    model, tok, prompts, table, clf = setup
    half = table.num_sequences // 2
    train = table.select_prompts(np.flatnonzero(table.sequence < half))
    holdout = table.select_prompts(np.flatnonzero(table.sequence >= half))
    dear = _cost(lens=50.0, shared=1.0)  # a check costs 50 layers, n positions cost n times one: drafting loses
    fit = lambda t: train_exit_classifier(t, method="logistic")  # noqa: E731
    chosen, record = choose_drafting_rule(model, train, holdout, dear, fit, max_draft_tokens=(1, 4))
    assert not record["pays"] and "nothing pays" in record["why"] and record["holdout"]["predicted_speed"] < 1.02
    assert chosen.drafting and chosen.check_layers == () and chosen.decode_check_layers == ()
    inputs = tok(prompts[0].text, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=T, do_sample=False, exit_policy=chosen,
                         return_dict_in_generate=True, pad_token_id=0)
    stock = model.generate(**inputs, max_new_tokens=T, do_sample=False, exit_policy=None, pad_token_id=0)
    assert torch.equal(out.sequences, stock)
    # the output has the fields of a lossless call (what drafted: nothing), as a drafting run's would
    assert out.draft_tokens.tolist() == [0] and out.accepted_tokens.tolist() == [0]
    assert (out.exit_layers == model.config.num_hidden_layers).all()
    # a cost model where positions share everything pays: the same search then keeps a schedule
    cheap = _cost(lens=0.01, head=10.0, shared=0.0)
    chosen, record = choose_drafting_rule(model, train, holdout, cheap, fit, max_draft_tokens=(1, 4))
    assert record["pays"] and chosen.decode_check_layers == tuple(record["rule"]["check_layers"])
    best = max(r["predicted_speed"] for r in record["candidates"])
    assert record["train"]["predicted_speed"] == pytest.approx(best)


def test_train_and_calibrate_drafting_records_the_rule_and_generate_uses_its_cap(setup, tmp_path, monkeypatch):
    model, tok, prompts, _, _ = setup
    config = TrainingConfig(method="logistic", generation=GenerationCalibrationConfig(generation_tokens=T),
                            drafting=DraftingConfig(max_draft_tokens=(2, 3), holdout_fraction=0.3))
    cheap = _cost(lens=0.01, head=10.0, shared=0.0)
    clf, train, holdout = train_and_calibrate(model, tok, prompts, config, progress=False, cost_model=cheap)
    assert set(train.sequence) and set(holdout.sequence)
    record = clf.calibration["drafting"]
    assert clf.drafting and record["pays"] and record["max_draft_tokens"] in (2, 3)
    assert CostModel.from_dict(clf.calibration["cost_model"]) == cheap
    assert TrainingConfig.from_dict(clf.calibration["training_config"]) == config
    clf.save_pretrained(tmp_path / "a")
    loaded = ExitClassifier.from_pretrained(tmp_path / "a")
    assert loaded.drafting and loaded.decode_check_layers == clf.decode_check_layers
    assert loaded.calibration["drafting"] == json.loads(json.dumps(record))
    # generate is lossless by default and drafts at most the artifact's cap in a row
    cap = record["max_draft_tokens"]
    inputs = tok(prompts[0].text, return_tensors="pt")
    seen = []
    real = model.exit_head.spec.num_layers(model)

    def spy(*args, **kwargs):  # the cap lossless_generate receives
        seen.append(args[4])
        return orig(*args, **kwargs)

    orig = modeling.lossless_generate
    monkeypatch.setattr(modeling, "lossless_generate", spy)
    out = model.generate(**inputs, max_new_tokens=T, do_sample=False, exit_policy=loaded,
                         return_dict_in_generate=True, pad_token_id=0)
    model.generate(**inputs, max_new_tokens=T, do_sample=False, exit_policy=loaded, max_draft_tokens=1,
                   pad_token_id=0)
    assert seen == [cap, 1] and "draft_tokens" in out
    run, longest = 0, 0
    for layer in out.exit_layers[0].tolist():
        run = run + 1 if layer < real else 0
        longest = max(longest, run)
    assert longest <= cap


def test_drafting_config_round_trips_and_names_bad_values():
    config = TrainingConfig(generation=GenerationCalibrationConfig(generation_tokens=8),
                            drafting=DraftingConfig(vocabulary_sizes=(None, 64), check_layers=(3, 2)))
    assert config.drafting.check_layers == (2, 3)
    assert TrainingConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert TrainingConfig.from_dict(TrainingConfig().to_dict()).drafting is None
    for bad, match in [(dict(max_draft_tokens=(0,)), "max_draft_tokens"), (dict(max_draft_tokens=()), "max_draft"),
                       (dict(vocabulary_sizes=(1,)), "vocabulary_sizes"), (dict(margin=1.5), "margin"),
                       (dict(holdout_fraction=0.0), "holdout_fraction"), (dict(cost_repeats=0), "cost_repeats"),
                       (dict(max_draft_tokens=(2, 2)), "distinct")]:
        with pytest.raises(ValueError, match=match):
            DraftingConfig(**bad)
    with pytest.raises(ValueError, match="bogus"):
        DraftingConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="generation_tokens"):
        TrainingConfig(drafting=DraftingConfig())


def test_train_on_tables_refuses_a_drafting_config(setup):
    model, _, _, table, _ = setup
    config = TrainingConfig(generation=GenerationCalibrationConfig(generation_tokens=T), drafting=DraftingConfig())
    with pytest.raises(ValueError, match="train_and_calibrate"):
        train_on_tables(model, table, table, config)
