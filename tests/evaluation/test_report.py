"""results.json records from sums, the Table-2-shaped Markdown table, and the PNG plots."""

from __future__ import annotations

import json

import numpy as np
import pytest

from adainfer_hf.evaluation.report import (
    RESULT_KEYS,
    finalize_results,
    markdown_table,
    merge_shards,
    study_table,
    write_report,
)

L = 4

METHODS = ("dense", "adainfer", "oracle")


def _shard(rng, tasks=("alpha", "beta"), shots=(0, 5), n=6):
    """A synthetic shard with known per-example values (returned too, for the by-hand reference)."""
    shard, raw = {"num_layers": L, "groups": {}, "curves": {}, "sweep": {}}, {}
    for task in tasks:
        for k in shots:
            dense_sec = float(rng.uniform(1, 2))
            for m in METHODS:
                layers = np.full(n, L) if m == "dense" else rng.integers(1, L + 1, n)
                correct = rng.integers(0, 2, n)
                flops = rng.uniform(0.2, 1.0, n)
                raw[(task, k, m)] = (layers, correct, flops)
                hist = np.bincount(layers, minlength=L + 1).tolist()
                sec = dense_sec if m == "dense" else dense_sec / 2
                shard["groups"][f"{task}\t{k}\t{m}"] = {
                    "n": n, "correct": int(correct.sum()), "agree": int(correct.sum()), "em": 1, "em_n": n,
                    "layers": float(layers.sum()), "layers_sq": float((layers.astype(float) ** 2).sum()),
                    "flops": float(flops.sum()), "flops_checks": float(flops.sum()) * 2, "checks": 3.0,
                    "seconds": sec, "dense_seconds": dense_sec, "hist": hist}
            shard["curves"][f"{task}\t{k}"] = {
                "n": n, "lens_correct": rng.integers(0, n + 1, L).tolist(), "lens_agree": [1, 2, 3, n],
                "gap": (rng.uniform(0, 1, L - 1) * n).tolist(), "top_prob": (rng.uniform(0, 1, L - 1) * n).tolist()}
            for t in (0.5, 0.9):
                shard["sweep"][f"{task}\t{k}\t{t}"] = {
                    "n": n, "correct": 2, "agree": 3, "layers": 3.0 * n, "flops": 0.8 * n, "_threshold": t,
                    "_min_layer": 1, "_never_exit": False}
    return shard, raw


def test_finalize_against_by_hand_values():
    rng = np.random.default_rng(0)
    shard, raw = _shard(rng)
    res = finalize_results(shard, model_name="tiny", task_order=["beta", "alpha"])
    assert [r["task"] for r in res["results"]][:3] == ["beta"] * 3  # task_order is honoured
    assert [r["method"] for r in res["results"]][:3] == list(METHODS)
    for r in res["results"]:
        assert set(RESULT_KEYS) <= set(r)
        layers, correct, flops = raw[(r["task"], r["shots"], r["method"])]
        assert r["n"] == len(layers) and r["accuracy"] == pytest.approx(correct.mean())
        assert r["mean_layers"] == pytest.approx(layers.mean()) and r["var_layers"] == pytest.approx(layers.var())
        assert r["pruning_ratio"] == pytest.approx(1 - layers.mean() / L)
        assert r["flops_ratio"] == pytest.approx(flops.mean())
        assert r["speedup"] == pytest.approx(1.0 if r["method"] == "dense" else 2.0)
    # pooled "all" rows: means and variances over every example of every task
    for r in res["summary"]:
        layers = np.concatenate([raw[(t, r["shots"], r["method"])][0] for t in ("alpha", "beta")])
        assert r["task"] == "all" and r["n"] == layers.size
        assert r["mean_layers"] == pytest.approx(layers.mean()) and r["var_layers"] == pytest.approx(layers.var())
    sweep = res["calibration_sweep"]
    assert [(s["shots"], s["target_agreement"]) for s in sweep] == [(0, 0.5), (0, 0.9), (5, 0.5), (5, 0.9)]
    assert sweep[0]["threshold"] == 0.5 and sweep[0]["n"] == 12 and sweep[0]["flops_ratio"] == pytest.approx(0.8)
    json.dumps(res)  # JSON-able


def test_merge_shards_pools_exactly():
    rng = np.random.default_rng(1)
    a, raw_a = _shard(rng, tasks=("alpha",), n=4)
    b, raw_b = _shard(rng, tasks=("alpha",), n=7)
    merged = finalize_results(merge_shards([a, b]))
    for r in merged["results"]:
        key = (r["task"], r["shots"], r["method"])
        layers = np.concatenate([raw_a[key][0], raw_b[key][0]])
        assert r["n"] == 11 and r["mean_layers"] == pytest.approx(layers.mean())
        assert r["var_layers"] == pytest.approx(layers.var())
        assert r["seconds"] == pytest.approx(a["groups"]["\t".join(map(str, key))]["seconds"]
                                             + b["groups"]["\t".join(map(str, key))]["seconds"])
    assert merged["calibration_sweep"][0]["threshold"] == 0.5  # constants are not summed
    with pytest.raises(ValueError, match="layer counts"):
        merge_shards([a, {**b, "num_layers": 5}])


def test_markdown_table_and_plots(tmp_path):
    from PIL import Image

    shard, _ = _shard(np.random.default_rng(2), tasks=("alpha", "beta", "gamma", "delta"))
    res = finalize_results(shard, model_name="tiny", methods_info={"dense": "full depth"})
    table = markdown_table(res)
    assert "| Task | Shots | n | Dense Acc |" in table and "AdaInfer Speedup" in table and "Oracle FLOPs" in table
    assert "| alpha | 0 | 6 |" in table and "| **all** | 5 | 24 |" in table
    assert "- **Dense**: full depth" in table
    files = write_report(res, tmp_path / "report")
    assert json.loads(files["json"].read_text())["results"] == res["results"]
    assert files["table"].read_text() == table
    for name in ("layer_accuracy", "features", "exit_histogram", "accuracy_vs_flops"):
        with Image.open(files[name]) as img:
            assert img.format == "PNG" and img.size[0] > 500 and img.size[1] > 200


def test_study_table():
    study = {"study": "loto", "method": "svm", "target_agreement": 0.9, "decisions": "simulated",
             "results": [{"split": "loto:a", "train_tasks": ["b"], "task": "a", "shots": 0, "model": "m", "n": 3,
                          "accuracy_dense": 0.5, "accuracy": 0.25, "agreement_with_dense": 0.75, "mean_layers": 3.5,
                          "flops_ratio": 0.9}]}
    assert "| loto:a | b | a | 0 | m | 3 | 50.0 | 25.0 | 75.0 | 3.5 | 0.90 |" in study_table(study)
