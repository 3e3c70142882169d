"""Feature collection against the logit lens of the stock model, and the FeatureTable file format."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from tiny_models import task_tokenizer, tiny_pair, tiny_prompts
from transformers import LlamaForCausalLM

from adainfer_hf.architectures import core as arch
from adainfer_hf.data.builtin_tasks import builtin_task, builtin_task_names
from adainfer_hf.data.prompts import Example, Task, build_prompts, gold_first_token
from adainfer_hf.policy.features import FEATURES
from adainfer_hf.training.collect import FeatureTable, collect_features

L = 4


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_rows_equal_stock_logit_lens(kind):
    stock, ada = tiny_pair(kind)
    tok = task_tokenizer()
    prompts = tiny_prompts()
    table = collect_features(ada, tok, prompts, features=tuple(FEATURES), batch_size=4, progress=False)
    assert table.X.shape == (len(prompts) * (L - 1), len(FEATURES))
    assert not np.isnan(table.X).any()
    gi, ti = table.feature_names.index("gap"), table.feature_names.index("top_prob")
    for pid, prompt in enumerate(prompts):
        # Independent reference: the stock model on the unpadded prompt, its hidden states through the lens.
        ids = tok(prompt.text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref = stock(ids, output_hidden_states=True, use_cache=False)
        assert table.final_token[pid] == int(ref.logits[0, -1].argmax())
        assert table.gold_token[pid] == gold_first_token(tok, prompt.text, prompt.answer)
        rows = np.flatnonzero(table.prompt_id == pid)
        assert table.layer[rows].tolist() == list(range(1, L))
        for row in rows:
            k = int(table.layer[row])
            with torch.no_grad():
                probs = arch.ExitHead(stock).logits(ref.hidden_states[k][0, -1]).float().softmax(-1)
            top2 = probs.topk(2)
            assert abs(table.X[row, ti] - float(top2.values[0])) < 1e-4
            assert abs(table.X[row, gi] - float(top2.values[0] - top2.values[1])) < 1e-4
            if float(top2.values[0] - top2.values[1]) > 1e-4:  # a near-tie may flip under padding round-off
                assert table.top_token[row] == int(top2.indices[0])
    assert (table.shots == [p.shots for p in prompts]).all()
    assert list(table.task) == [p.task for p in prompts]


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_recorded_hidden_states_are_the_stock_layer_outputs(kind, tmp_path):
    stock, ada = tiny_pair(kind)
    tok = task_tokenizer()
    prompts = tiny_prompts(2, (0, 2))
    table = collect_features(ada, tok, prompts, features=("gap",), batch_size=3, progress=False, hidden_states=True)
    assert table.hidden.shape == (len(table), stock.config.hidden_size) and table.hidden.dtype == np.float16
    for pid, prompt in enumerate(prompts):
        ids = tok(prompt.text, return_tensors="pt")["input_ids"]  # unpadded: an independent reference
        with torch.no_grad():
            ref = stock(ids, output_hidden_states=True, use_cache=False).hidden_states
        for row in np.flatnonzero(table.prompt_id == pid):
            want = ref[int(table.layer[row])][0, -1].numpy()
            np.testing.assert_allclose(table.hidden[row].astype(np.float32), want, rtol=2e-3, atol=2e-3)
    table.save(tmp_path / "t.npz")  # the hidden states survive the file and a prompt selection
    back = FeatureTable.load(tmp_path / "t.npz").select_prompts([2, 0])
    np.testing.assert_array_equal(back.hidden, np.concatenate([table.hidden[table.prompt_id == i] for i in (2, 0)]))
    assert collect_features(ada, tok, prompts[:1], features=("gap",), progress=False).hidden is None
    with pytest.raises(ValueError, match="with and without hidden states"):
        FeatureTable.concat([table, collect_features(ada, tok, prompts[:1], features=("gap",), progress=False)])


def test_collect_restores_tokenizer_and_checks_args():
    _, ada = tiny_pair()
    tok = task_tokenizer()
    tok.padding_side = "right"
    collect_features(ada, tok, tiny_prompts(1, (0,)), features=("gap",), progress=False)
    assert tok.padding_side == "right"
    with pytest.raises(ValueError, match="Unknown feature"):
        collect_features(ada, tok, tiny_prompts(1, (0,)), features=("nope",), progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        collect_features(ada, tok, tiny_prompts(1, (0,)), batch_size=0, progress=False)


def synthetic_table(tokens, final, gold, features=("gap", "top_prob")):
    """A table from per-prompt top-token sequences [P, L-1] (features: random)."""
    tokens = np.asarray(tokens)
    P, K = tokens.shape
    rng = np.random.default_rng(0)
    return FeatureTable(
        X=rng.random((P * K, len(features))),
        feature_names=features,
        layer=np.tile(np.arange(1, K + 1), P),
        prompt_id=np.repeat(np.arange(P), K),
        top_token=tokens.reshape(-1),
        task=[f"t{i % 2}" for i in range(P)],
        shots=np.zeros(P),
        example_index=np.arange(P),
        final_token=final,
        gold_token=gold,
        num_layers=np.full(P, K + 1),
    )


def test_labels_final_and_gold():
    t = synthetic_table([[5, 7, 7], [1, 2, 3]], final=[7, 3], gold=[7, 9])
    assert t.labels("final").tolist() == [0, 1, 1, 0, 0, 1]
    assert t.labels("gold").tolist() == [0, 1, 1, 0, 0, 0]
    with pytest.raises(ValueError, match="expected one of"):
        t.labels("dense")
    no_gold = synthetic_table([[1, 2, 3]], final=[3], gold=[-1])
    with pytest.raises(ValueError, match="gold tokens"):
        no_gold.labels("gold")


def test_save_load_select_concat_csv(tmp_path):
    t = synthetic_table([[5, 7, 7], [1, 2, 3], [4, 4, 4]], final=[7, 3, 4], gold=[7, 9, 4])
    t.meta["model"] = "tiny"
    t.save(tmp_path / "t.npz")
    back = FeatureTable.load(tmp_path / "t.npz")
    for name in ("X", "layer", "prompt_id", "top_token", "task", "final_token", "gold_token", "num_layers"):
        assert np.array_equal(getattr(back, name), getattr(t, name))
    assert back.feature_names == t.feature_names and back.meta == {"model": "tiny"}
    sub = t.select_prompts([2, 0])
    assert sub.num_prompts == 2 and sub.final_token.tolist() == [4, 7]
    assert sub.top_token.tolist() == [4, 4, 4, 5, 7, 7] and sub.prompt_id.tolist() == [0, 0, 0, 1, 1, 1]
    both = FeatureTable.concat([sub, t])
    assert (
        both.num_prompts == 5
        and both.labels("final").tolist() == sub.labels("final").tolist() + t.labels("final").tolist()
    )
    t.to_csv(tmp_path / "t.csv")
    lines = (tmp_path / "t.csv").read_text().splitlines()
    assert lines[0].startswith("prompt_id,task,shots,layer,gap,top_prob") and len(lines) == 10
    with pytest.raises(ValueError, match="not a FeatureTable"):
        FeatureTable.load(tmp_path / "t.csv")


def test_interrupted_save_leaves_previous_table(tmp_path, monkeypatch):
    t = synthetic_table([[5, 7, 7]], final=[7], gold=[7])
    t.save(tmp_path / "t.npz")
    before = (tmp_path / "t.npz").read_bytes()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez_compressed", boom)
    with pytest.raises(KeyboardInterrupt):
        synthetic_table([[1, 2, 3]], final=[3], gold=[3]).save(tmp_path / "t.npz")
    assert (tmp_path / "t.npz").read_bytes() == before
    assert os.listdir(tmp_path) == ["t.npz"]


def test_builtin_tasks_are_deterministic():
    for name in builtin_task_names():
        a, b = builtin_task(name, n=30, seed=3), builtin_task(name, n=30, seed=3)
        assert isinstance(a, Task) and a.examples == b.examples and len(a) == 30
        assert all(isinstance(e, Example) and e.input and e.output for e in a.examples)
    assert builtin_task("capitalize", 5).examples[0].output[0].isupper()
    assert builtin_task("next_number", 5, seed=1).examples != builtin_task("next_number", 5, seed=2).examples
    with pytest.raises(ValueError, match="expected one of"):
        builtin_task("nope")


@pytest.mark.slow
def test_real_model_rows_and_simulation_match_live_exits(smollm2_dir):
    from transformers import AutoTokenizer

    from adainfer_hf.estimators.rules import GapThresholdRule
    from adainfer_hf.models.loading import load_adainfer_model
    from adainfer_hf.policy.classifier import ExitClassifier
    from adainfer_hf.training.calibrate import simulate_exits

    model = load_adainfer_model(smollm2_dir, exit_classifier=None)
    stock = LlamaForCausalLM.from_pretrained(smollm2_dir).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    prompts = [
        build_prompts(builtin_task(n), 3, limit=1)[0] for n in ("capitalize", "next_number", "last_of_list")
    ]
    table = collect_features(model, tok, prompts, features=("gap", "top_prob"), progress=False)
    n_layers = model.config.num_hidden_layers
    assert len(table) == 3 * (n_layers - 1)
    ids = tok(prompts[0].text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = stock(ids, output_hidden_states=True, use_cache=False)
        lens = torch.stack([arch.ExitHead(stock).logits(ref.hidden_states[k][0, -1]) for k in range(1, n_layers)])
    probs = lens.float().softmax(-1).topk(2)
    rows = table.prompt_id == 0
    assert np.allclose(table.X[rows, 1], probs.values[:, 0].numpy(), atol=2e-3)
    assert np.allclose(table.X[rows, 0], (probs.values[:, 0] - probs.values[:, 1]).numpy(), atol=2e-3)
    clear = (probs.values[:, 0] - probs.values[:, 1]).numpy() > 1e-2
    assert (table.top_token[rows][clear] == probs.indices[clear, 0].numpy()).all()
    # The paper's gap > 0.8 rule, replayed on the table and run live, exits at the same layers.
    rule = ExitClassifier(GapThresholdRule(threshold=0.8).fit([[0.0, 0.0]])).bind(model)
    expected, _ = simulate_exits(rule, table)
    tok.padding_side = "left"
    enc = tok([p.text for p in prompts], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**enc, use_cache=False, exit_policy=rule)
    assert out.exit_layers.tolist() == expected.tolist()


def test_half_precision_check_head_is_collected_trained_and_kept():
    """check_dtype: rows are the logit lens through a bf16 copy of the head (reference: the stock model's hidden
    states through that copy), the table says so, and a classifier trained on it checks the same way."""
    from adainfer_hf.training.train import train_exit_classifier

    stock, ada = tiny_pair()
    tok = task_tokenizer()
    prompts = tiny_prompts(2, (2,))
    table = collect_features(ada, tok, prompts, features=("gap", "top_prob"), progress=False, check_dtype="bfloat16")
    assert table.meta["check_dtype"] == "bfloat16"
    head = stock.get_output_embeddings().weight.detach().to(torch.bfloat16)
    for pid, prompt in enumerate(prompts):
        ids = tok(prompt.text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref = stock(ids, output_hidden_states=True, use_cache=False)
        for row in np.flatnonzero(table.prompt_id == pid):
            k = int(table.layer[row])
            with torch.no_grad():
                normed = arch.ExitHead(stock).norm(ref.hidden_states[k][0, -1])
                probs = (normed.to(torch.bfloat16) @ head.T).float().softmax(-1)
            assert abs(table.X[row, 1] - float(probs.max())) < 2e-2  # bf16 rounding of the padded batch
    fp32 = collect_features(ada, tok, prompts, features=("gap", "top_prob"), progress=False)
    assert fp32.meta["check_dtype"] is None
    assert np.abs(fp32.X - table.X).max() > 0  # the half-precision head really was used
    clf = train_exit_classifier(table, method="logistic")
    assert clf.check_dtype == "bfloat16"
    assert clf.replace(threshold=0.5).check_dtype == "bfloat16"
    with pytest.raises(ValueError, match="'float8'"):
        collect_features(ada, tok, prompts, progress=False, check_dtype="float8")


def test_train_and_calibrate_keeps_the_check_dtype_through_calibration_and_cost(monkeypatch):
    from adainfer_hf.training import schedule as schedule
    from adainfer_hf.training.config import CalibrationConfig, ScheduleConfig, TrainingConfig
    from adainfer_hf.training.train import train_and_calibrate

    _, ada = tiny_pair()
    tok = task_tokenizer()
    seen = []
    costs = {"prefill": 0.5, "decode": 9.0}
    monkeypatch.setattr(schedule, "measure_check_cost",
                        lambda model, **kw: seen.append((kw["phase"], kw["check_dtype"])) or costs[kw["phase"]])
    config = TrainingConfig(method="logistic", calibration=CalibrationConfig(target_agreement=0.5),
                            schedule=ScheduleConfig(check_dtype="float16"))
    clf, train_table, calib_table = train_and_calibrate(ada, tok, tiny_prompts(4, (0, 2)), config, progress=False)
    assert seen == [("prefill", "float16"), ("decode", "float16")]  # a schedule for prompts, one for decode
    assert train_table.meta["check_dtype"] == calib_table.meta["check_dtype"] == "float16"
    assert clf.check_dtype == "float16" and clf.calibration["schedule"]["check_cost_layers"] == 0.5
    assert clf.calibration["decode_schedule"]["check_cost_layers"] == 9.0
    assert clf.decode_check_layers == tuple(clf.calibration["decode_schedule"]["check_layers"])
