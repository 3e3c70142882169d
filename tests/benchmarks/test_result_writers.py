"""Every benchmark writes through the one stamping writer: `benchmarks.common.results` on top of
`adainfer_hf.utils.results`. The cheap scripts run here end to end on a tiny random Llama (their `model_dir`
pointed at it) and the file they write is read back by the table generator of docs/results.md, so a script and the
table built from its output cannot drift apart."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from adainfer_hf import ExitClassifier, GapThresholdRule
from adainfer_hf.tiny_models import llama_config
from adainfer_hf.utils.results import newest_result, read_result, result_files
from benchmarks.common import results as bench_results

ROOT = Path(__file__).resolve().parents[2]


def _docs_tables():
    spec = importlib.util.spec_from_file_location("docs_tables", ROOT / "scripts" / "docs_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    LlamaForCausalLM(llama_config()).save_pretrained(path)
    return path


def _only_file(root: Path, model: str, question: str) -> tuple[Path, dict, dict]:
    files = result_files(model, question, root, variant=None)
    assert len(files) == 1, files
    stamp, payload = read_result(files[0])
    assert stamp["commit"] is None or len(stamp["commit"]) == 40
    assert stamp["argv"][0].endswith(".py") and stamp["versions"]["torch"] == torch.__version__
    return files[0], stamp, payload


def test_save_result_stamps_the_variant_and_records_classifiers_by_config(tmp_path):
    clf_dir = tmp_path / "saved" / "probe"
    clf = ExitClassifier(GapThresholdRule(threshold=0.5).fit(np.zeros((1, 2))), min_layer=2)
    clf.save_pretrained(clf_dir)
    spec = f"probe@0.95={clf_dir}"
    args = type("Args", (), {"out_root": str(tmp_path / "results"), "variant": "rerun", "no_write": False})()
    argv = ["KEY", "--classifier", spec]
    path = bench_results.save_result(args, "tiny", "decode_gain", {"runs": {}}, argv, variant="vocabulary",
                                     classifiers=bench_results.classifier_configs([spec], [clf]))
    assert path.parent == tmp_path / "results" / "tiny" / "decode_gain"
    assert path.name.endswith("-vocabulary-rerun.json")
    data = json.loads(path.read_text())
    assert data["result"] == {"runs": {}}
    assert data["stamp"]["argv"][1:] == ["KEY", "--classifier", "<classifier:0>"]
    assert str(tmp_path) not in path.read_text()
    recorded = data["stamp"]["classifiers"][0]
    assert recorded["name"] == "probe@0.95" and recorded["min_layer"] == 2

    args.no_write = True
    assert bench_results.save_result(args, "tiny", "decode_gain", {}, argv) is None


def test_settings_of_scrubs_paths_also_inside_name_equals_dir(tmp_path):
    import argparse

    args = argparse.Namespace(classifier=[f"a={tmp_path}/x"], model=str(tmp_path / "m"), repeats=3,
                              out_root="docs/results", variant=None, no_write=False)
    settings = bench_results.settings_of(args)
    assert settings["classifier"][0].startswith("a=<") and settings["classifier"][0].endswith("/x")
    assert str(tmp_path) not in json.dumps(settings)
    assert settings["repeats"] == 3 and "out_root" not in settings


def test_catch_up_cost_writes_what_the_catch_up_table_reads(tiny_dir, tmp_path, monkeypatch):
    from benchmarks.cost import catch_up_cost

    monkeypatch.setattr(catch_up_cost, "model_dir", lambda key: tiny_dir)
    out = tmp_path / "docs" / "results"
    catch_up_cost.main(["--models", "smollm2", "--repeats", "1", "--inner", "1", "--out-root", str(out)])
    path, _, payload = _only_file(out, "models", "catch_up_cost")
    assert set(payload["models"]) == {"smollm2"}
    table = _docs_tables().catch_up_table(tmp_path)
    assert f"| {path.stem} | SmolLM2-135M-Instruct |" in table


def test_check_cost_real_writes_one_row_per_model(tiny_dir, tmp_path, monkeypatch):
    from benchmarks.cost import check_cost_real

    monkeypatch.setattr(check_cost_real, "model_dir", lambda key: tiny_dir)
    check_cost_real.main(["--models", "tiny", "--lengths", "8", "--repeats", "1", "--out-root", str(tmp_path)])
    _, _, payload = _only_file(tmp_path, "models", "check_cost_real")
    (row,) = payload["models"]
    assert row["model"] == "tiny" and row["num_layers"] == llama_config().num_hidden_layers
    assert row["decode_full"] > 0 and row["prefill8_full"] > 0


def test_vocabulary_cost_writes_what_the_shortlist_table_reads(tiny_dir, tmp_path, monkeypatch):
    from benchmarks.cost import vocabulary_cost

    monkeypatch.setattr(vocabulary_cost, "model_dir", lambda key: tiny_dir)
    monkeypatch.setattr(vocabulary_cost, "PHASES", (("decode", 1),))
    out = tmp_path / "docs" / "results"
    vocabulary_cost.main(["gemma3-270m", "--sizes", "16,32", "--repeats", "1", "--out-root", str(out)])
    _, _, payload = _only_file(out, "gemma3-270m", "vocabulary_cost")  # one model: under its own key
    assert [r["phase"] for r in payload["gemma3-270m"]["rows"]] == ["decode"]
    table = _docs_tables().vocabulary_cost_table(tmp_path)
    assert "| Gemma-3-270M (99) | decode |" in table and "| 16 ids | 32 ids |" in table


def test_gpu_gate_dry_run_writes_a_tiny_variant(tmp_path):
    from benchmarks.cost import gpu_gate

    gpu_gate.main(["--tiny", "--device", "cpu", "--repeats", "1", "--out-root", str(tmp_path)])
    path, _, payload = _only_file(tmp_path, "models", "gpu_gate")
    assert path.stem.endswith("-tiny")  # a dry run never replaces a GPU result of the same day
    assert {c["phase"] for c in payload["shapes"]["tiny"]["check_costs"]} == {"prefill", "decode"}


def test_bench_exit_writes_every_sample_under_the_shape(tmp_path):
    from benchmarks.speed import bench_exit

    bench_exit.main(["--shape", "tiny", "--lengths", "8", "--batches", "1", "--repeats", "1", "--phases", "prefill",
                     "--out-root", str(tmp_path)])
    path, _, payload = _only_file(tmp_path, "tiny", "bench_exit")
    assert path.stem.endswith("-cpu")
    (case,) = payload["results"]
    assert case["phase"] == "prefill" and case["samples"]["stock"]
    assert payload["args"]["shape"] == "tiny" and "out_root" not in payload["args"]


def test_newest_result_orders_by_date_then_time_and_filters_variants(tmp_path):
    d = tmp_path / "m" / "q"
    d.mkdir(parents=True)
    for stem in ("2026-12-02T0431", "2026-12-02T0123", "2026-12-01", "2026-12-03-0.99", "notes"):
        (d / f"{stem}.json").write_text("{}")
    assert [p.stem for p in result_files("m", "q", tmp_path)] == ["2026-12-01", "2026-12-02T0123", "2026-12-02T0431"]
    assert newest_result("m", "q", tmp_path).stem == "2026-12-02T0431"
    assert newest_result("m", "q", tmp_path, variant="0.99").stem == "2026-12-03-0.99"
    assert newest_result("m", "q", tmp_path, variant=None).stem == "2026-12-03-0.99"
    assert newest_result("m", "missing", tmp_path) is None
    for name in ("2026-12-01", "2026-12-01-0.95", "2026-11-23"):
        (tmp_path / "m" / "eval" / name).mkdir(parents=True)
        (tmp_path / "m" / "eval" / name / "results.json").write_text("{}")
    assert newest_result("m", "eval", tmp_path, filename="results.json").parent.name == "2026-12-01"
    assert newest_result("m", "eval", tmp_path, variant="0.95", filename="results.json").parent.name == "2026-12-01-0.95"


def test_read_result_reads_stamped_and_migrated_files_alike(tmp_path):
    stamped, migrated = tmp_path / "a.json", tmp_path / "b.json"
    stamped.write_text(json.dumps({"stamp": {"commit": "c"}, "result": {"runs": 1}}))
    migrated.write_text(json.dumps({"stamp": {"commit": "c", "reconstructed": "yes"}, "runs": 1}))
    assert read_result(stamped) == ({"commit": "c"}, {"runs": 1})
    assert read_result(migrated) == ({"commit": "c", "reconstructed": "yes"}, {"runs": 1})
    (tmp_path / "c.json").write_text("[1]")
    with pytest.raises(ValueError, match="JSON object"):
        read_result(tmp_path / "c.json")


def test_the_former_hand_tables_read_stamped_files(tmp_path):
    """A file `write_result` wrote (`{"stamp", "result"}`) renders like a migrated one: the peer and check-dtype
    tables show its numbers, and a newer file replaces an older one."""
    from adainfer_hf.utils.results import write_result

    out = tmp_path / "docs" / "results"
    row = {"method": "econ-calm@0.9", "overall_agreement": 0.25, "prefix_agreement": 0.125, "identical_prompts": 1,
           "mean_layers": 4.5, "x_hf": 3.5, "x_hf_min": 2.25}
    write_result("smollm2", "peer_economize", {"settings": {"prompts": 4}, "results": [row]}, ["peer.py"], root=out)
    table = _docs_tables().peer_table(tmp_path)
    assert "| economize CALM, threshold 0.9 | 0.250 / 0.125 | 1/4 | 4.5 | 3.50x (2.25x) |" in table

    target = {"test_agreement": 0.75, "test_mean_layers": 20.0, "fp32_rule_decision_flips": 0, "rows": 10}
    dtypes = {"float32": {"top1_agreement_with_fp32": 1.0, "max_abs_diff_top_prob": 0.0, "check_cost_prefill": 2.0,
                          "check_cost_decode": 12.0, "targets": {"0.9": target}},
              "float16": {"top1_agreement_with_fp32": 0.5, "max_abs_diff_top_prob": 0.125, "check_cost_prefill": 1.0,
                          "check_cost_decode": 6.0,
                          "targets": {"0.9": {**target, "test_agreement": 0.5, "fp32_rule_decision_flips": 3}}}}
    old = out / "smollm2" / "check_dtype" / "2026-01-01.json"
    old.parent.mkdir(parents=True)
    old.write_text(json.dumps({"stamp": {}, "median_length": 7, "dtypes": {"float32": dtypes["float32"]}}))
    write_result("smollm2", "check_dtype", {"median_length": 9, "dtypes": dtypes}, ["dtype.py"], root=out)
    table = _docs_tables().check_dtype_table(tmp_path)
    assert "prefill 9 / decode" in table  # the newer, stamped file
    assert "| float16 | 50.00% of rows | 0.12 | 1.00 / 6.0 | 3 of 10 checked rows | 0.500 / 20.00 |" in table
