"""The lossless benchmark modules: held-out prompts kept apart from the drafting set, the rule syntax, and the GPU
script's CPU dry run (random Llama of a tiny shape: lossless tokens equal the stock class's)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForCausalLM

from benchmarks.speed import lossless, lossless_gpu


def test_held_out_prompts_are_mixed_and_checked(tmp_path):
    prompts = lossless.read_prompts(lossless.HELD_OUT)
    assert len(prompts) >= 16 and {p["kind"] for p in prompts} == {"prose", "code", "qa"}
    first = lossless.mixed(prompts, 6)
    assert sorted(p["kind"] for p in first) == ["code", "code", "prose", "prose", "qa", "qa"]
    drafting = tmp_path / "drafting.jsonl"
    drafting.write_text(json.dumps({"text": "something else"}) + "\n", encoding="utf-8")
    assert lossless.check_held_out(prompts, drafting).startswith("checked")
    drafting.write_text(json.dumps({"text": prompts[3]["text"]}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="drafting prompts"):
        lossless.check_held_out(prompts, drafting)
    assert lossless.check_held_out(prompts, tmp_path / "absent.jsonl").startswith("not checked")
    with pytest.raises(ValueError, match="more prompts than the file has"):
        lossless.mixed(prompts, len(prompts) + 1)


def test_rule_syntax():
    assert lossless.parse_rules("-2:8192:4,10:0:6:0.5", 18) == [(16, 8192, 4, None), (10, 0, 6, 0.5)]
    for bad in ("18:0:4", "-18:0:4", "3:0", "3:x:4", "3:0:0", "3:0:4:1.5"):
        with pytest.raises(ValueError, match="--rules item"):
            lossless.parse_rules(bad, 18)


@pytest.mark.parametrize("module", [lossless, lossless_gpu])
def test_help(module, capsys):
    with pytest.raises(SystemExit) as done:
        module.main(["--help"]) if module is lossless_gpu else module.parse_args(["--help"])
    assert done.value.code == 0 and "usage" in capsys.readouterr().out.lower()


def test_gpu_script_dry_run(tmp_path):
    out = tmp_path / "gpu.json"
    assert lossless_gpu.main(["--tiny", "--device", "cpu", "--dtype", "float32", "--repeats", "2",
                              "--new-tokens", "8", "--out", str(out)]) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    assert set(result["cost"]["layer"]) == set(result["cost"]["head"]) == {"1", "2", "4", "8"}
    assert result["identity"]["rows"] == 2 and result["identity"]["rows_identical"] == 2
    assert sum(result["identity"]["draft_tokens"]) > 0  # the rule drafted, so verification ran


def test_gpu_model_is_the_stock_llama_with_the_same_weights():
    """The random model's lossless-free forward equals the stock LlamaForCausalLM carrying its weights (so the
    identity check above compares against the stock model, not against itself)."""
    model = lossless_gpu.build(None, True, "cpu", torch.float32)
    stock = LlamaForCausalLM(model.config).eval()
    stock.load_state_dict(model.state_dict())
    ids = torch.randint(1, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, exit_policy=None).logits, stock(ids).logits)
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False, exit_policy=None),
                           stock.generate(ids, max_new_tokens=6, do_sample=False))


def test_main_end_to_end_with_the_peers_on_fewer_prompts(tmp_path):
    """The benchmark on a tiny checkpoint: the lossless run is identical to stock at every batch size, and the
    peers (batch 1 only) run on `--peer-prompts` prompts against stock on those prompts."""
    from tiny_models import save_tiny_checkpoint

    from adainfer_hf.utils.results import newest_result, read_result

    model = save_tiny_checkpoint(tmp_path / "tiny")
    status = lossless.main(["tiny", "--model-dir", str(model), "--prompts", "4", "--new-tokens", "4", "--repeats",
                            "1", "--batches", "1", "2", "--rules=-1:0:2", "--lookup", "2", "--peer-prompts", "2",
                            "--threads", "1", "--out-root", str(tmp_path / "results")])
    assert status == 0
    _, payload = read_result(newest_result("tiny", "lossless", tmp_path / "results"))
    one, two = payload["batches"]["1"], payload["batches"]["2"]
    assert "peers" in payload["notes"] and payload["complete"]
    for rows in (one, two):
        (name,) = [n for n, r in rows.items() if r["kind"] == "lossless"]
        assert rows[name]["rows_identical"] == rows[name]["rows"] == 4
    assert one["lookup:2"]["rows"] == one["lookup:2"]["prompts"] == 2 and "lookup:2" not in two
