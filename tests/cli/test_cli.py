"""The `adainfer` CLI end to end on a tiny checkpoint and tiny task files."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import joblib
import numpy as np
import pytest
from tiny_models import VOCAB, save_tiny_checkpoint

from adainfer_hf import AlwaysExit
from adainfer_hf.artifact.constants import CLASSIFIER_CONFIG_NAME
from adainfer_hf.cli import main as cli
from adainfer_hf.policy.classifier import ExitClassifier
from adainfer_hf.training.collect import FeatureTable
from adainfer_hf.training.config import CalibrationConfig, ScheduleConfig, TrainingConfig
from adainfer_hf.training.vocabulary import choose_check_vocabulary

TASK_A = [
    {"input": w, "output": w.upper()}
    for w in "apple river chair house water music paper green light night money horse dream smile".split()
]
TASK_B = [
    {"input": f"{a}, {b}, {c}", "output": a}
    for a, b, c in zip(
        "red one cat sun box pen cup hat map car".split(),
        "blue two dog moon bag ink mug cap pin bus".split(),
        "green three cow star tin pad jar wig cup van".split(),
        strict=True,
    )
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_tiny_checkpoint(root / "model")
    for name, rows in (("upper", TASK_A), ("first", TASK_B)):
        (root / f"{name}.json").write_text(json.dumps(rows))
    return root


def _data_args(root):
    return [
        "--model",
        str(root / "model"),
        "--task-file",
        str(root / "upper.json"),
        str(root / "first.json"),
        "--shots",
        "0",
        "2",
        "--limit",
        "5",
        "--quiet",
        "--batch-size",
        "4",
    ]


def test_every_flag_has_help(capsys):
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == {"collect", "train", "simulate", "push", "pull", "demo", "eval", "doctor",
                                       "lm-eval"}
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
        if name == "lm-eval":  # `--help` is the harness's (tests/test_lm_eval_harness.py); no options of its own
            assert [a.dest for a in sub._actions] == ["harness_args"]
            continue
        with pytest.raises(SystemExit) as exit_info:
            cli.main([name, "--help"])
        assert exit_info.value.code == 0


def test_collect_writes_a_table(workdir, capsys):
    out = workdir / "table.npz"
    assert (
        cli.main(
            [
                "collect",
                *_data_args(workdir),
                "--features",
                "gap",
                "top_prob",
                "kl_prev",
                "--out",
                str(out),
                "--csv",
                str(workdir / "table.csv"),
            ]
        )
        == 0
    )
    table = FeatureTable.load(out)
    # 2 tasks x 2 shots x 5 prompts, 3 checked layers each
    assert (
        table.num_prompts == 20 and len(table) == 60 and table.feature_names == ("gap", "top_prob", "kl_prev")
    )
    assert sorted(set(table.shots.tolist())) == [0, 2] and set(table.task) == {"upper", "first"}
    assert (workdir / "table.csv").is_file() and "wrote 60 rows" in capsys.readouterr().out


def test_train_simulate_and_pull_a_local_dir(workdir, capsys):
    out = workdir / "clf"
    assert (
        cli.main(
            [
                "train",
                *_data_args(workdir),
                "--method",
                "logistic",
                "--target-agreement",
                "0.9",
                "--seed",
                "1",
                "--min-layers",
                "1",
                "2",
                "--tables-out",
                str(workdir / "tables"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "saved the exit classifier" in printed and "calibration: n=10 agreement=" in printed
    clf = ExitClassifier.from_pretrained(out)
    assert clf.num_layers == 4 and clf.lm_head_fingerprint is not None and clf.label == "final"
    cal = clf.calibration
    assert (
        cal["min_layer_grid"] == [1, 2]
        and cal["target_agreement"] == 0.9
        and cal["agreement"] >= 0.9
        and cal["training"]["method"] == "logistic"
    )
    # the artifact says how it was made: the flags' config, defaults included
    assert TrainingConfig.from_dict(cal["training_config"]) == TrainingConfig(
        method="logistic", seed=1, batch_size=4, hidden_states=True,
        calibration=CalibrationConfig(target_agreement=0.9, min_layers=(1, 2)))
    train = FeatureTable.load(workdir / "tables" / "train.npz")
    calib = FeatureTable.load(workdir / "tables" / "calibration.npz")
    assert cal["n_prompts"] == calib.num_prompts and train.num_prompts + calib.num_prompts == 20
    # disjoint examples: the same question with 0 and 2 shots stays on one side
    assert not {(t, i) for t, i in zip(train.task, train.example_index, strict=True)} & {
        (t, i) for t, i in zip(calib.task, calib.example_index, strict=True)
    }

    again = workdir / "clf_from_tables"
    assert (
        cli.main(
            [
                "train",
                "--model",
                str(workdir / "model"),
                "--from-tables",
                str(workdir / "tables"),
                "--method",
                "linear_svm",
                "--target-agreement",
                "0.9",
                "--out",
                str(again),
            ]
        )
        == 0
    )
    assert ExitClassifier.from_pretrained(again).calibration["n_prompts"] == calib.num_prompts
    assert ExitClassifier.from_pretrained(again).check_dtype is None  # the tables' fp32 head
    assert ExitClassifier.from_pretrained(again).calibration["training_config"] == TrainingConfig(
        method="linear_svm", calibration=CalibrationConfig(target_agreement=0.9)).to_dict()
    assert train.hidden is not None and calib.hidden is not None  # --tables-out keeps what a gate trains on
    gated = workdir / "clf_gated"
    assert cli.main(["train", "--model", str(workdir / "model"), "--from-tables", str(workdir / "tables"),
                     "--method", "logistic", "--target-agreement", "0.9", "--gate", "linear", "--gate-recall", "0.95",
                     "--check-cost", "2", "--gate-cost", "0.01", "--out", str(gated)]) == 0
    loaded = ExitClassifier.from_pretrained(gated)
    assert (gated / "exit_gate.safetensors").is_file() and loaded.gate is not None
    assert loaded.gate_fingerprint == loaded.gate.fingerprint() and loaded.gate.hidden_size == train.hidden.shape[1]
    shortlisted = workdir / "clf_vocabulary"
    assert cli.main(["train", "--model", str(workdir / "model"), "--from-tables", str(workdir / "tables"),
                     "--method", "gate_only", "--target-agreement", "0.9", "--check-vocabulary", "12",
                     "--check-cost", "2", "--gate-cost", "0.01", "--out", str(shortlisted)]) == 0
    loaded = ExitClassifier.from_pretrained(shortlisted)
    assert loaded.check_vocabulary == choose_check_vocabulary(train, 12, VOCAB)
    with pytest.raises(SystemExit):
        cli.main(["train", "--model", str(workdir / "model"), "--from-tables", str(workdir / "tables"),
                  "--check-vocabulary", "1", "--out", str(workdir / "never")])
    assert "--check-vocabulary: '1' is not an integer >= 2" in capsys.readouterr().err
    mismatch = ["train", "--model", str(workdir / "model"), "--from-tables", str(workdir / "tables"),
                "--check-dtype", "bfloat16", "--out", str(workdir / "never")]
    capsys.readouterr()
    assert cli.main(mismatch) == 2
    assert _one_error_line(capsys) == (f"error: --check-dtype bfloat16 differs from the tables' check dtype None "
                                       f"({workdir / 'tables'}); collect the tables again with --check-dtype "
                                       "bfloat16.")
    with pytest.raises(ValueError, match="--check-dtype bfloat16 differs from the tables' check dtype None"):
        cli.main(["--debug", *mismatch])  # the traceback, on request
    assert not (workdir / "never").exists()

    assert (
        cli.main(
            [
                "simulate",
                "--classifier",
                str(out),
                "--table",
                str(workdir / "tables" / "calibration.npz"),
                "--json",
                str(workdir / "sim.json"),
            ]
        )
        == 0
    )
    sim = json.loads((workdir / "sim.json").read_text())
    assert abs(sim["agreement"] - cal["agreement"]) < 1e-9 and set(sim["per_task"]) == {"upper", "first"}
    assert (
        cli.main(
            [
                "simulate",
                "--classifier",
                str(out),
                "--table",
                str(workdir / "tables" / "calibration.npz"),
                "--uncalibrated",
            ]
        )
        == 0
    )
    assert "(uncalibrated)" in capsys.readouterr().out

    assert cli.main(["pull", str(out), str(workdir / "pulled")]) == 0
    assert ExitClassifier.from_pretrained(workdir / "pulled").calibration == cal


def test_push_and_pull_through_a_local_hub(workdir, tmp_path, local_hub, monkeypatch):
    from huggingface_hub import constants as hub_constants

    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    src = workdir / "pushme"
    assert cli.main(["train", *_data_args(workdir), "--method", "linear_svm", "--gate", "linear", "--out",
                     str(src)]) == 0
    assert cli.main(["push", str(src), "org/exit-clf"]) == 0
    assert {"exit_classifier.safetensors", "exit_gate.safetensors"} <= set(local_hub.repos["org/exit-clf"]["files"])
    assert cli.main(["pull", "org/exit-clf", str(tmp_path / "pulled")]) == 0
    pulled = ExitClassifier.from_pretrained(tmp_path / "pulled")
    assert pulled.calibration == ExitClassifier.from_pretrained(src).calibration
    assert pulled.gate is not None and pulled.gate_fingerprint == ExitClassifier.from_pretrained(src).gate_fingerprint


def test_train_builtin_tasks_crf_gold_label(workdir):
    out = workdir / "crf"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a CRF has no pickle-free encoding; calibration warns about live use
        assert (
            cli.main(
                [
                    "train",
                    "--model",
                    str(workdir / "model"),
                    "--builtin-task",
                    "capitalize",
                    "next_number",
                    "--shots",
                    "1",
                    "--limit",
                    "6",
                    "--quiet",
                    "--method",
                    "crf",
                    "--label",
                    "gold",
                    "--target-agreement",
                    "0.5",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
    clf = ExitClassifier.from_pretrained(out)
    assert clf.label == "gold" and type(clf.estimator).__name__ == "CRFExitEstimator"
    assert clf.calibration["score"] == "crf_causal_sequence"


def test_interrupted_train_leaves_no_artifact(workdir, monkeypatch):
    out = workdir / "interrupted"

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(joblib, "dump", boom)
    assert cli.main(["train", *_data_args(workdir), "--method", "gap_rule", "--out", str(out)]) == 130
    assert not (out / CLASSIFIER_CONFIG_NAME).exists()
    assert not [p for p in os.listdir(workdir) if p.startswith(".interrupted")]
    monkeypatch.setattr(np, "savez_compressed", boom)
    assert cli.main(["collect", *_data_args(workdir), "--out", str(workdir / "half.npz")]) == 130
    assert not [p for p in os.listdir(workdir) if "half" in p]


def test_demo_trains_in_process_on_builtin_tasks(workdir, capsys):
    assert (
        cli.main(
            [
                "demo",
                "--model",
                str(workdir / "model"),
                "--train-limit",
                "3",
                "--quiet",
                "--target-agreement",
                "0.9",
                "--lossless-tokens",
                "12",
                "--repeats",
                "2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    # the lossless part: a drafting classifier trained now (none ships for this model), the stock and the lossless
    # text of every demo prompt side by side, compared token for token, with the time ratio
    assert "lossless generate (drafting classifier: trained now" in out
    assert out.count("  stock:    ") == out.count("  lossless: ") == 2
    assert out.count("identical (12 tokens); speed ") == 2 and "DIFFERENT" not in out
    assert (
        "training a logistic exit classifier on the built-in tasks" in out
        and "early exit: " in out and "same rule checked at every layer" in out
    )
    assert "calibration (" in out and "first_of_list" in out


def test_python_dash_m():
    proc = subprocess.run(
        [sys.executable, "-m", "adainfer_hf", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "collect" in proc.stdout and "demo" in proc.stdout


def test_lm_eval_hands_its_arguments_over_unchanged(monkeypatch):
    """`adainfer lm-eval ARGS` gives ARGS, options included, to the harness wrapper as they are."""
    args = cli.build_parser().parse_args(["lm-eval", "--model", "adainfer", "-o", "out", "--help"])
    assert args.command == "lm-eval" and args.harness_args == ["--model", "adainfer", "-o", "out", "--help"]


def test_lm_eval_without_the_harness_names_the_extra(monkeypatch, capsys):
    from adainfer_hf.cli import harness

    monkeypatch.setattr(harness.importlib.util, "find_spec", lambda name: None)
    assert cli.main(["lm-eval", "--model", "adainfer"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "pip install 'adainfer-hf[eval]'" in err[0]


# ---------------------------------------------------------------------------------------------------- user errors
def _one_error_line(capsys, *parts):
    """The one `error:` line on stderr (progress bars of model loading may precede it), holding `parts`."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Repo id must be" not in err, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and sum("error" in line for line in lines) == 1, err
    for part in parts:
        assert part in lines[-1], err
    return lines[-1]


@pytest.mark.parametrize("command", ["collect", "train", "eval"])
def test_a_missing_model_directory_is_one_error_line_and_status_2(tmp_path, capsys, command):
    missing = str(tmp_path / "no" / "such-model")
    argv = [command, "--model", missing, "--builtin-task", "capitalize", "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    _one_error_line(capsys, f"error: --model {missing!r}: no such directory", "'org/name'")
    with pytest.raises(cli.UsageError, match="no such directory"):
        cli.main([command, "--debug", *argv[1:]])  # --debug after the subcommand too
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("argv", "flag", "value"), [
    (["eval", "--limit", "0"], "--limit", "'0'"),
    (["collect", "--limit", "-3"], "--limit", "'-3'"),
    (["collect", "--batch-size", "0"], "--batch-size", "'0'"),
    (["train", "--shots", "0", "x"], "--shots", "'x'"),
    (["train", "--target-agreement", "1.5"], "--target-agreement", "'1.5'"),
    (["train", "--delta", "1"], "--delta", "'1'"),
    (["eval", "--timing-repeats", "0"], "--timing-repeats", "'0'"),
    (["eval", "--sweep-targets", "0.9", "0"], "--sweep-targets", "'0'"),
    (["demo", "--train-limit", "0"], "--train-limit", "'0'"),
])
def test_numeric_flags_out_of_range_exit_2_naming_the_value(tmp_path, capsys, argv, flag, value):
    command, *flags = argv
    rest = [] if command == "demo" else ["--model", str(tmp_path), "--builtin-task", "capitalize", "--out",
                                         str(tmp_path / "out")]
    with pytest.raises(SystemExit) as info:
        cli.main([command, *rest, *flags])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {flag}: {value} is not" in err and "Traceback" not in err


def test_other_user_errors_are_one_line_and_status_2(workdir, tmp_path, capsys):
    model = ["--model", str(workdir / "model")]
    assert cli.main(["collect", *model, "--out", str(tmp_path / "t.npz")]) == 2
    _one_error_line(capsys, "--task-file", "--builtin-task")
    assert cli.main(["simulate", "--classifier", str(tmp_path / "none"), "--table", str(tmp_path / "t.npz")]) == 2
    _one_error_line(capsys, str(tmp_path / "none"))
    assert cli.main(["eval", *model, "--builtin-task", "capitalize", "--methods", "dense,bogus", "--out",
                     str(tmp_path / "r.json")]) == 2
    _one_error_line(capsys, "--methods 'dense,bogus'", "['bogus']")
    assert not (tmp_path / "r.json").exists()


def test_python_dash_m_reports_a_user_error_on_one_line():
    proc = subprocess.run([sys.executable, "-m", "adainfer_hf", "collect", "--model", "./missing-model-dir",
                           "--builtin-task", "capitalize", "--out", "never.npz"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --model './missing-model-dir': no such directory, and not a Hub id of the form 'org/name' "
        "(expected a checkpoint directory, a Hub id or 'default')."]


def test_the_console_script_entry_point_resolves_to_main():
    """pyproject's `adainfer = "module:function"` must name a callable (the `adainfer` command runs it)."""
    text = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    (entry,) = re.findall(r'^adainfer = "([^"]+)"$', text, flags=re.M)  # (tomllib is 3.11+; we support 3.10)
    module, _, attr = entry.partition(":")
    target = getattr(importlib.import_module(module), attr)
    assert callable(target) and target is cli.main


def test_train_certifies_free_running_generations(workdir, capsys):
    out = workdir / "clf_free_running"
    assert cli.main(["train", *_data_args(workdir), "--method", "logistic", "--target-agreement", "0.5",
                     "--delta", "0.5", "--generation-tokens", "3", "--free-running", "4", "--exit-cache", "exact",
                     "--check-cost", "none", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    loaded = ExitClassifier.from_pretrained(out)
    figures = loaded.calibration["free_running"]
    assert loaded.calibration["training_config"]["generation"] == {
        "generation_tokens": 3, "first_layer": 1, "free_running_tokens": 4, "exit_cache": "exact"}
    assert loaded.calibration["training_config"]["schedule"] == ScheduleConfig(check_cost=None).to_dict()
    assert figures["new_tokens"] == 4 and figures["exit_cache"] == "exact" and figures["tests"]
    assert loaded.calibration["conclusion"].startswith("Free-running") and "Free-running" in printed
    # the calibration prompts are generated on, so saved tables cannot stand in for them
    never = workdir / "never_free"
    assert cli.main(["train", "--model", str(workdir / "model"), "--from-tables", str(workdir / "missing"),
                     "--free-running", "4", "--out", str(never)]) == 2
    _one_error_line(capsys, "--free-running 4 generates on the calibration prompts, which --from-tables does not")
    assert not never.exists()


def test_train_on_generated_tokens_with_the_gate_as_knob(workdir, capsys):
    out = workdir / "clf_generation"
    assert cli.main(["train", *_data_args(workdir), "--method", "logistic", "--target-agreement", "0.5",
                     "--delta", "0.5", "--generation-tokens", "3", "--first-layer", "2", "--gate", "linear",
                     "--knob", "gate", "--check-cost", "2", "--gate-cost", "0.01", "--tables-out",
                     str(workdir / "gen_tables"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    loaded = ExitClassifier.from_pretrained(out)
    calib = FeatureTable.load(workdir / "gen_tables" / "calibration.npz")
    assert calib.is_generation and set(calib.step.tolist()) == {0, 1, 2} and int(calib.layer.min()) == 2
    assert loaded.calibration["knob"] == "gate" and loaded.gate is not None
    assert loaded.calibration["n_sequences"] == calib.num_sequences
    assert f"calibrated on {calib.num_sequences}" in printed and "generations" in printed
    # the gate alone as the exit rule: --method gate_only brings its gate and calibrates it
    alone = workdir / "clf_gate_only"
    assert cli.main(["train", "--model", str(workdir / "model"), "--from-tables", str(workdir / "gen_tables"),
                     "--method", "gate_only", "--target-agreement", "0.5", "--delta", "0.5", "--check-cost", "2", "--gate-cost", "0.01",
                     "--out", str(alone)]) == 0
    loaded = ExitClassifier.from_pretrained(alone)
    assert loaded.calibration["knob"] == "gate" and loaded.gate is not None
    assert loaded.calibration["training"]["method"] == "gate_only" and isinstance(loaded.estimator, AlwaysExit)
    assert cli.main(["train", "--model", str(workdir / "model"), "--from-tables", str(workdir / "gen_tables"),
                     "--method", "gate_only", "--knob", "classifier", "--out", str(workdir / "never_alone")]) == 2
    _one_error_line(capsys, "method='gate_only' exits wherever its gate passes, so calibration tunes the gate: "
                    "knob must be 'gate' (or None); got knob='classifier'")
    assert not (workdir / "never_alone").exists()
    # the knob needs a gate: refused before anything is written
    never = workdir / "never_knob"
    assert cli.main(["train", *_data_args(workdir), "--knob", "gate", "--check-cost", "none", "--out",
                     str(never)]) == 2
    _one_error_line(capsys, "knob='gate' calibrates the gate's thresholds, but the classifier has no gate")
    assert not never.exists()
    assert cli.main(["train", *_data_args(workdir), "--first-layer", "2", "--out", str(never)]) == 2
    _one_error_line(capsys, "--first-layer 2 selects the layers --generation-tokens records")
    assert not never.exists()
