"""The journeys in examples/ run: each script's `main` in-process on the embedded SmolLM2 (skipped where it cannot
be converted), the Hub one against the fake Hub, the harness one where lm-eval is installed."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
FV_DIR = ROOT.parent / "shared" / "data" / "function_vectors"


def _main(relative: str):
    spec = importlib.util.spec_from_file_location(f"example_{Path(relative).stem}", EXAMPLES / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_every_example_is_run_here():
    run_here = {"quickstart.py", "pipeline.py", "lossless_generation.py", "train_on_your_data.py", "push_pull.py",
                "lm_eval/run.py", "lm_eval/build_data.py"}
    assert {str(p.relative_to(EXAMPLES)) for p in EXAMPLES.rglob("*.py")} == run_here


def test_quickstart(smollm2_dir, capsys):
    _main("quickstart.py")()
    assert "schedule of the shipped classifier" in capsys.readouterr().out


def test_pipeline_keeps_the_stock_text_when_lossless(smollm2_dir):
    texts = _main("pipeline.py")(["--max-new-tokens", "12"])
    assert texts["lossless"] == texts["stock"]


def test_lossless_generation_reproduces_the_stock_text(smollm2_dir):
    rows = _main("lossless_generation.py")(["--max-new-tokens", "12"])
    assert all(r["identical"] for r in rows) and sum(r["drafts"] for r in rows) > 0


def test_training_on_your_own_data(smollm2_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    clf = _main("train_on_your_data.py")(["--limit", "12", "--out", "clf"])
    assert (tmp_path / "clf" / "exit_classifier_config.json").is_file()
    assert clf.calibration["training_config"]["calibration"]["target_agreement"] == 0.9


def test_push_pull(smollm2_dir, local_hub):
    _main("push_pull.py")(["--repo", "someone/smollm2-exit", "--token", "hf_test"])
    assert "exit_classifier_config.json" in local_hub.repos["someone/smollm2-exit"]["files"]


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed (the eval extra)")
@pytest.mark.skipif(not FV_DIR.is_dir(), reason="../shared/data/function_vectors is not beside the repository")
def test_lm_eval_journey(smollm2_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    stats = _main("lm_eval/run.py")(["--fv-dir", os.fspath(FV_DIR), "--limit", "4", "--output-path", "runs"])
    assert set(stats["tasks"]) == {"adainfer_fv_sentiment", "adainfer_fv_present_past"}
