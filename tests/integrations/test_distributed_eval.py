"""`adainfer eval` sharded over two CPU processes with `accelerate launch` equals the single-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny_models import make_pair, tiny_tokenizer

from adainfer_hf.cli.eval import main as eval_main
from adainfer_hf.estimators.rules import GapThresholdRule
from adainfer_hf.policy.classifier import ExitClassifier


@pytest.fixture
def workdir(tmp_path):
    """A tiny Llama + tokenizer saved as a checkpoint, a task file and an exit classifier, all under tmp_path."""
    _, ada = make_pair("llama_gqa")
    tok = tiny_tokenizer()
    ada.save_pretrained(tmp_path / "model", safe_serialization=True)
    tok.save_pretrained(tmp_path / "model")
    inputs = [f"w{a} w{b}" for a, b in np.random.default_rng(0).integers(3, 99, (30, 2))]
    with torch.no_grad():  # half the answers are the model's own 0-shot prediction: accuracy is not trivially 0
        top = ada(**tok([f"Q: {x}\nA:" for x in inputs], return_tensors="pt"), exit_policy=None).logits[:, -1]
    top = top.argmax(-1).tolist()
    rows = [{"input": x, "output": f"w{t if i % 2 == 0 and t >= 3 else 3 + (t + 5) % 96}"}
            for i, (x, t) in enumerate(zip(inputs, top, strict=True))]
    (tmp_path / "task.json").write_text(json.dumps(rows), encoding="utf-8")
    clf = ExitClassifier(GapThresholdRule(threshold=0.0006).fit(np.zeros((1, 2)))).bind(ada)
    clf.save_pretrained(tmp_path / "clf")
    return tmp_path


def _args(d, out):
    return ["eval", "--model", str(d / "model"), "--exit-classifier", str(d / "clf"), "--task-file",
            str(d / "task.json"), "--shots", "0", "2", "--limit", "5", "--calibration-limit", "4", "--methods",
            "dense,adainfer,gap,shortgpt,oracle", "--shortgpt-layers", "1", "--batch-size", "1",
            "--max-new-tokens", "1", "--sweep-targets", "0.5", "--quiet", "--out", str(out)]


def test_two_processes_equal_one(workdir):
    eval_main(_args(workdir, workdir / "single.json"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # `--multi_gpu` makes accelerate start the processes with torchrun; without GPUs they join over gloo on the CPU
    # (accelerate's `--cpu` launcher would need MPI and a hostfile for more than one process).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "adainfer_hf.cli.eval",
           *_args(workdir, workdir / "multi.json")]
    proc = subprocess.run(cmd, env=env, cwd=workdir, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = json.loads((workdir / "single.json").read_text())
    multi = json.loads((workdir / "multi.json").read_text())
    assert multi["config"]["num_processes"] == 2 and single["config"]["num_processes"] == 1
    assert not list(workdir.glob(".multi.json.shard-*"))  # shards are merged, then removed
    keyed = {(r["task"], r["shots"], r["method"]): r for r in single["results"]}
    assert len(multi["results"]) == len(keyed) == 10
    for r in multi["results"]:
        ref = keyed[(r["task"], r["shots"], r["method"])]
        for key in ("n", "accuracy", "exact_match", "mean_layers", "var_layers", "flops_ratio",
                    "agreement_with_dense"):
            assert r[key] == pytest.approx(ref[key]), (r["method"], key)
        assert r["seconds"] > 0 and r["dense_seconds"] > 0
    by = {r["method"]: r for r in single["results"] if r["shots"] == 0}
    assert 0 < by["dense"]["accuracy"] and by["adainfer"]["mean_layers"] < 4  # the comparison is not vacuous
    for a, b in zip(multi["calibration_sweep"] + multi["layer_curves"],
                    single["calibration_sweep"] + single["layer_curves"], strict=True):
        assert a.keys() == b.keys()
        for key, value in a.items():
            assert value == (pytest.approx(b[key]) if not isinstance(value, str) else b[key]), key
