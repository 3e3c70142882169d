"""`adainfer train --lossless` and `--text-file`: the drafting objective from the command line."""

from __future__ import annotations

import json

import pytest
from tiny_models import save_tiny_checkpoint

from adainfer_hf.cli import main as cli
from adainfer_hf.policy.classifier import ExitClassifier
from adainfer_hf.training.config import DraftingConfig, TrainingConfig

PROMPTS = ["the apple is", "one two three", "red blue green", "a house by the river", "water and light",
           "music paper money", "the night was", "a horse and a dream"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lossless_cli")
    save_tiny_checkpoint(root / "model")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n\n")
    (root / "prompts.jsonl").write_text("\n".join(json.dumps({"text": p, "kind": "k"}) for p in PROMPTS))
    return root


def _one_error_line(capsys, fragment):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err


@pytest.mark.parametrize("name", ["prompts.txt", "prompts.jsonl"])
def test_train_lossless_on_a_text_file_records_the_drafting_rule(workdir, capsys, name):
    out = workdir / f"drafting_{name}"
    assert cli.main(["train", "--model", str(workdir / "model"), "--text-file", str(workdir / name), "--lossless",
                     "--method", "logistic", "--generation-tokens", "6", "--draft-caps", "1", "3",
                     "--draft-vocabularies", "full", "64", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    loaded = ExitClassifier.from_pretrained(out)
    config = TrainingConfig.from_dict(loaded.calibration["training_config"])
    assert config.drafting == DraftingConfig(max_draft_tokens=(1, 3), vocabulary_sizes=(None, 64))
    assert config.generation.generation_tokens == 6
    record = loaded.calibration["drafting"]
    assert loaded.drafting and record["max_draft_tokens"] in (1, 3)
    assert {"device", "dtype", "threads"} <= set(loaded.calibration["cost_model"])
    assert record["why"] in printed and "held out: predicted" in printed
    # the held-out prompts are never the searched ones
    assert record["holdout"]["sequences"] + record["train"]["sequences"] == len(PROMPTS)
    if record["pays"]:
        assert loaded.decode_check_layers == tuple(record["rule"]["check_layers"])
    else:
        assert loaded.decode_check_layers == () and loaded.check_layers == ()


def test_bad_text_files_and_flags_are_named(workdir, capsys):
    bad = workdir / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": 3}\n')
    args = ["train", "--model", str(workdir / "model"), "--lossless", "--quiet", "--out", str(workdir / "never")]
    assert cli.main([*args, "--text-file", str(bad)]) == 2
    _one_error_line(capsys, "line 3")
    broken = workdir / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": \n')
    assert cli.main([*args, "--text-file", str(broken)]) == 2
    _one_error_line(capsys, "line 2: not a JSON object")
    assert cli.main([*args, "--text-file", str(workdir / "missing.txt")]) == 2
    _one_error_line(capsys, "missing.txt")
    assert cli.main(["train", "--model", str(workdir / "model"), "--text-file", str(workdir / "prompts.txt"),
                     "--draft-caps", "2", "--out", str(workdir / "never")]) == 2
    _one_error_line(capsys, "--draft-caps choose the drafting rule; pass --lossless")
    with pytest.raises(SystemExit):
        cli.main([*args, "--draft-vocabularies", "1"])
    assert "'1' is not a shortlist size" in capsys.readouterr().err
    assert not (workdir / "never").exists()
