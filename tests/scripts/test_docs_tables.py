"""`scripts/docs_tables.py`'s blocks that replaced docs/results.md's last hand-copied tables (issue 30): each is
read from result files written by the real writer (`write_result`) into a temporary tree, the numbers checked
against the payload they came from, and a missing file gives a sentence naming the command that writes one. The
two benchmarks that gained a result file (`simulate_smollm2`, `lm_eval_smollm2`) run end to end on the embedded
SmolLM2 with a few prompts, and their files are read back by the same generator."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from adainfer_hf.utils.results import read_result, result_files, write_result

ROOT = Path(__file__).resolve().parents[2]
FV_DIR = ROOT.parent / "shared" / "data" / "function_vectors"
_spec = importlib.util.spec_from_file_location("docs_tables", ROOT / "scripts" / "docs_tables.py")
tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tables)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _rows(table: str) -> list[dict]:
    lines = [line for line in table.splitlines() if line.startswith("|")]
    head = _cells(lines[0])
    return [dict(zip(head, _cells(line), strict=True)) for line in lines[2:]]


def _write(tmp_path, model, question, payload, variant=None):
    return write_result(model, question, payload, ["prog"], root=tmp_path / "docs" / "results", variant=variant)


@pytest.mark.parametrize("table, command", [
    ("simulate_table", "benchmarks.quality.simulate_smollm2"),
    ("generation_sweep_table", "benchmarks.quality.generation_smollm2"),
    ("decode_steps_table", "benchmarks.cost.decode_steps"),
    ("decode_steps_groups_table", "benchmarks.cost.decode_steps"),
    ("lm_eval_table", "benchmarks.quality.lm_eval_smollm2"),
])
def test_a_table_without_its_file_names_the_command_that_writes_it(tmp_path, table, command):
    (tmp_path / "docs" / "results").mkdir(parents=True)
    text = getattr(tables, table)(tmp_path)
    assert text.startswith("Not measured on this commit") and f"python -m {command}" in text
    assert "|" not in text


def _rule(agreement, layers, gold, min_layer=17):
    return {"n": 320, "agreement": agreement, "mean_exit_layer": layers, "num_layers": 30,
            "gold_accuracy_dense": 0.3, "gold_accuracy_exit": gold, "min_layer": min_layer, "per_task": {}}


def test_the_simulate_table_from_a_synthetic_result(tmp_path):
    rules = {"gap>0.8": _rule(0.122, 1.81, 0.0, 1), "calibrated@0.9": _rule(0.947, 29.79, 0.291),
             "uncalibrated": _rule(0.119, 1.06, 0.0, 1), "calibrated@0.99": _rule(1.0, 30.0, 0.3)}
    path = _write(tmp_path, "smollm2", "simulate", {"held_out_prompts": 320, "held_out_tasks": ["a", "b"],
                                                     "rules": rules})
    text = tables.simulate_table(tmp_path)
    rows = _rows(text)
    assert [r["rule"] for r in rows] == ["calibrated, target 0.99", "calibrated, target 0.9",
                                         "uncalibrated SVM (paper)", "`gap > 0.8` (paper)"]
    assert rows[1]["agreement with dense"] == "0.947" and rows[1]["mean layers"] == "29.79 of 30"
    assert rows[1]["gold accuracy (dense 0.300)"] == "0.291"
    assert f"results/smollm2/simulate/{path.name}" in text


def test_the_generation_sweep_table_from_a_synthetic_result(tmp_path):
    rows = [{"exits": "exit@24", "cache": "exact", "agreement": 0.013, "prefix": 0.0, "mean_layers": 24.0,
             "dense_seconds": 10.8, "seconds": 9.4, "speedup": 10.8 / 9.4},
            {"exits": "classifier", "cache": "propagate", "agreement": 1.0, "prefix": 64.0, "mean_layers": 30.0,
             "dense_seconds": 10.9, "seconds": 11.9, "speedup": 10.9 / 11.9}]
    _write(tmp_path, "smollm2", "generation_sweep", {"num_layers": 30, "prompts": 20, "new_tokens": 64,
                                                     "batch_size": 10, "threads": 2, "rows": rows})
    got = _rows(tables.generation_sweep_table(tmp_path))
    assert got[0]["exits"] == "every token at 24" and got[0]["speedup"] == "1.15x"
    assert got[0]["mean layers / token"] == "24.00 / 30" and got[0]["dense s"] == "10.8"
    assert got[1]["exits"] == "classifier" and got[1]["KV cache"] == "propagate" and got[1]["speedup"] == "0.92x"


def _steps_payload(layers_share=0.844, head_share=0.102):
    return {"num_layers": 30, "new_tokens": 64, "cache": "exact", "repeats": 3,
            "args": {"classifier": "<tmp>/probe"}, "mean_layers_per_decode_token": 24.9,
            "stock": {"seconds_per_token": 0.0571, "layers_share": layers_share, "head_share": head_share,
                      "rest_share": 1 - layers_share - head_share, "head_in_layers": 3.6, "step_median_s": 0.057},
            "steps": {"exit": {"count_per_run": 38, "median_s": 0.044, "vs_stock": 0.77},
                      "full+catch-up": {"count_per_run": 25, "median_s": 0.062, "vs_stock": 1.08}}}


def test_the_decode_step_tables_from_a_synthetic_result(tmp_path):
    _write(tmp_path, "smollm2", "decode_steps", _steps_payload())
    (stock,) = _rows(tables.decode_steps_table(tmp_path))
    assert stock["stock decode step"] == "57.1 ms" and stock["head in layers"] == "3.6"
    assert stock["layers / final norm + head / rest"] == "84.4% / 10.2% / 5.4%"
    # the layers are 84.4% of the step: the whole step is 30 / 0.844 layers' time
    assert stock["step in layer-equivalents (layers + head + rest)"] == f"{30 / 0.844:.1f} (30 layers)"
    (groups,) = _rows(tables.decode_steps_groups_table(tmp_path))
    assert groups["exit steps"] == "38 at 0.77x" and groups["steps running every layer"] == "-"
    assert groups["steps that also catch up"] == "25 at 1.08x"
    assert groups["classifier (cache)"] == "`<tmp>/probe` (exact)" and groups["layers per token"] == "24.90 of 30"
    # 63 steps at the stock step's time against 38 at 0.77 of it and 25 at 1.08
    assert groups["predicted speedup"] == f"{63 / (38 * 0.77 + 25 * 1.08):.3f}x"


def test_the_lm_eval_table_from_a_synthetic_result(tmp_path):
    tasks = ["adainfer_fv_sentiment", "adainfer_fv_present_past"]
    metrics = {tasks[0]: {"acc": 0.63, "acc_stderr": 0.0485}, tasks[1]: {"exact_match": 0.89,
                                                                         "exact_match_stderr": 0.031}}
    exits = {tasks[0]: {"mean_exit_layer": 2.0}, tasks[1]: {"mean_exit_layer": 1.21}, "all": {"flops_ratio": 0.2407}}
    runs = {"gap>0.8": {"model": "adainfer", "metrics": {tasks[0]: {"acc": 0.54}, tasks[1]: {"exact_match": 0.0}},
                        "exits": exits, "num_layers": 30}, "hf": {"model": "hf", "metrics": metrics}}
    _write(tmp_path, "smollm2", "lm_eval", {"tasks": tasks, "limit": 100, "lm_eval": "0.4.13", "runs": runs})
    hf, gap = _rows(tables.lm_eval_table(tmp_path))
    assert hf["sentiment acc"] == "0.63 ± 0.05" and hf["present-past exact match"] == "0.89 ± 0.03"
    assert hf["sentiment layers"] == "all (stock)" and hf["FLOPs ratio (all)"] == "1"
    assert gap["model"] == "`adainfer`, paper's `gap > 0.8` rule" and gap["sentiment acc"] == "0.54"
    assert gap["present-past layers / token"] == "1.21" and gap["FLOPs ratio (all)"] == "0.2407"


def _decode_run(median, q1, q3, agreement=0.9, layers=16.0):
    return {"speedup_median": median, "speedup_q1": q1, "speedup_q3": q3, "speedup_sum": median,
            "token_agreement": agreement, "mean_prefix": 30.0, "mean_layers_per_token": layers}


def test_the_shortlist_summary_picks_the_fastest_exact_run_per_target(tmp_path):
    key = "gemma3-270m"
    _write(tmp_path, key, "decode_gain", {"num_layers": 18, "runs": {
        "gate-knob@0.95+v16384 exact": _decode_run(1.14, 1.03, 1.34, 0.862),
        "probe@0.95+v16384 exact": _decode_run(1.08, 0.98, 1.2),
        "probe@0.95 propagate": _decode_run(1.9, 1.8, 2.0),  # not the exact cache: never the one reported
        "gate-knob@0.9+free exact": _decode_run(2.5, 2.4, 2.6),  # free-running calibration: another question
        "gate-knob@0.95 exact": _decode_run(0.99, 0.96, 1.06, 0.922)}}, variant="vocabulary")
    _write(tmp_path, key, "gate_costs", {"num_layers": 18, "vocab_size": 262144, "check_costs": [
        {"phase": "prefill", "length": 64, "full_check_layers": 2.0, "gate_layers": 0.0003},
        {"phase": "decode", "length": 1, "full_check_layers": 12.26, "gate_layers": 0.0061}]})
    write_result("models", "vocabulary_cost", {key: {"vocab": 262144, "layers": 18, "rows": [
        {"phase": "decode", "tokens": 1, "full": 27.0, "4096": 0.5, "16384": 1.84}]}}, ["prog"],
        root=tmp_path / "docs" / "results")
    _write(tmp_path, key, "prefill_gain", {"layers": 18, "results": {
        "a": {"speedup_median": 0.993}, "b": {"speedup_median": 1.014}}})
    _write(tmp_path, key, "peer_economize", {"results": [
        {"method": "econ-calm@1 (never exits)", "x_hf": 7.47, "overall_agreement": 1.0},
        {"method": "econ-calm@0.9", "x_hf": 1.05, "overall_agreement": 0.06}]})
    rows = _rows(tables.summary_shortlist_table(tmp_path))
    assert len(rows) == len(tables.KEYS)
    row = rows[tables.KEYS.index(key)]
    assert row["model (layers / vocab)"] == "Gemma-3-270M (18 / 262,144)"
    assert row["one check in decode, layers: full / gated / shortlist"] == "12.26 / 0.006 / 1.84 (16,384 ids)"
    assert row["prefill: speedup (range)"].startswith("0.993-1.014x (2 classifiers")
    shortlist, full = row["decode @0.95: shortlist; full vocabulary"].split("; ")
    assert shortlist.startswith("gate-knob@0.95+v16384 **1.140x (1.030-1.340)**, 0.862, 16.00 layers")
    assert full.startswith("gate-knob@0.95 0.990x (0.960-1.060), 0.922")  # lower quartile below 1: not bold
    assert row["decode @0.9"] == "-; -"
    assert row["economize CALM vs HF `generate`"].startswith("never exiting 7.47x of HF's time; at 0.9 1.05x")
    other = rows[tables.KEYS.index("smollm2")]
    assert other["model (layers / vocab)"] == "SmolLM2-135M-Instruct" and other["decode @0.95: shortlist; full vocabulary"] == "-; -"
    assert other["one check in decode, layers: full / gated / shortlist"] == "- / -"  # no cost file, no shortlist run


def test_the_full_vocabulary_summary_reads_the_one_pass_generation_file(tmp_path):
    key = "qwen2.5-0.5b"
    gen = {"probe@0.95": {"speedup_median": 0.99, "token_agreement": 0.664},
           "probe@0.95 propagate": {"speedup_median": 1.04, "token_agreement": 0.594},
           "gate-knob@0.95": {"speedup_median": 0.97, "token_agreement": 0.7},
           "probe@0.9": {"speedup_median": 0.99, "token_agreement": 0.4}}
    _write(tmp_path, key, "generation", {"num_layers": 24, "classifiers": {}, "generation": gen})
    row = _rows(tables.summary_full_table(tmp_path))[tables.KEYS.index(key)]
    assert row["decode, one pass @0.95: rule speedup, agreement"] == "probe@0.95 0.99x, 0.664 (propagate 1.04x, 0.594)"
    assert row["@0.9"] == "probe@0.9 0.99x, 0.400" and row["@0.99"] == "-"
    assert row["prefill (first token, eval reports): AdaInfer @0.99 / @0.95"] == "- / -"  # no eval report here
    assert f"results/{key}/generation/" in row["file"]


@pytest.mark.skipif(not FV_DIR.is_dir(), reason="../shared/data/function_vectors is not beside the repository")
def test_simulate_smollm2_writes_what_the_simulate_table_reads(smollm2_dir, tmp_path):
    from benchmarks.quality import simulate_smollm2

    out = tmp_path / "docs" / "results"
    simulate_smollm2.main(["--fv-dir", os.fspath(FV_DIR), "--shots", "5", "--limit", "2", "--held-out-limit", "1",
                           "--out-root", str(out)])
    (path,) = result_files("smollm2", "simulate", out)
    stamp, payload = read_result(path)
    assert "--out-root" in stamp["argv"] and str(tmp_path) not in path.read_text()
    assert payload["held_out_prompts"] == len(simulate_smollm2.HELD_OUT_TASKS)  # one 5-shot prompt per task
    rules = payload["rules"]
    assert set(rules) == {"calibrated@0.99", "calibrated@0.9", "uncalibrated", "gap>0.8"}
    # 6 calibration prompts certify nothing: the calibrated classifiers are the dense model
    for name in ("calibrated@0.99", "calibrated@0.9"):
        assert rules[name]["mean_exit_layer"] == 30 and rules[name]["agreement"] == 1.0
        assert rules[name]["gold_accuracy_exit"] == rules[name]["gold_accuracy_dense"]
    rows = _rows(tables.simulate_table(tmp_path))
    assert rows[3]["mean layers"] == f"{rules['gap>0.8']['mean_exit_layer']:.2f} of 30"


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed (the eval extra)")
@pytest.mark.skipif(not FV_DIR.is_dir(), reason="../shared/data/function_vectors is not beside the repository")
def test_lm_eval_smollm2_writes_what_the_lm_eval_table_reads(smollm2_dir, tmp_path, monkeypatch):
    from benchmarks.quality import lm_eval_smollm2

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "docs" / "results"
    lm_eval_smollm2.main(["--fv-dir", os.fspath(FV_DIR), "--limit", "2", "--runs", "hf", "shipped",
                          "--out-root", str(out)])
    (path,) = result_files("smollm2", "lm_eval", out)
    payload = read_result(path)[1]
    hf, shipped = payload["runs"]["hf"], payload["runs"]["shipped"]
    assert "exits" not in hf and shipped["exits"]["all"]["requests"] > 0
    # the shipped classifier's schedule is empty: `--model adainfer` scores and generates as `--model hf`
    assert shipped["metrics"] == hf["metrics"]
    assert shipped["exits"]["all"]["mean_exit_layer"] == 30
    rows = _rows(tables.lm_eval_table(tmp_path))
    assert [r["model"] for r in rows] == ["`--model hf`", "`adainfer`, shipped classifier"]
