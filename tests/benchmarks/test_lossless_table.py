"""`scripts/docs_tables.py`'s lossless blocks (the README's status column and the table of the four models with
the peers beside) read the newest stamped `benchmarks.speed.lossless` file of each model, written here by the real
writer into a temporary tree."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from adainfer_hf.utils.results import write_result

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("docs_tables", ROOT / "scripts" / "docs_tables.py")
tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tables)


def _row(kind, median, q1, q3, **extra):
    return {"kind": kind, "ratio": {"median": median, "q1": q1, "q3": q3, "n": 3}, "tokens_identical": 128,
            "tokens": 128, "rows": 2, "rows_identical": 2, "mismatches": [], "setting": {}, **extra}


def _payload():
    lossless = dict(acceptance=0.625, drafts_per_verification=1.5, layers_per_token=17.25)
    one = {"stock": _row("stock", 1, 1, 1),
           "lossless:16/18:8192:4:0.5": _row("lossless", 1.31, 1.2, 1.4, **lossless),
           "lossless:14/18:8192:4:0.6": _row("lossless", 1.05, 1.0, 1.1, acceptance=0.5),
           # faster, but one row is not the stock text: never the one reported while an identical run exists
           "lossless:12/18:8192:4": _row("lossless", 1.6, 1.5, 1.7, acceptance=0.3, rows_identical=1),
           "lossy:0.95": _row("lossy", 1.1, 1.0, 1.2, tokens_identical=100),
           "early_exit:9": _row("peer", 0.21, 0.2, 0.22), "early_exit:14": _row("peer", 0.35, 0.3, 0.4),
           "lookup:3": _row("peer", 0.97, 0.9, 1.0, prompts=8), "lookup:10": _row("peer", 0.88, 0.8, 0.9)}
    four = {"stock": _row("stock", 1, 1, 1),
            "lossless:16/18:8192:4:0.5": _row("lossless", 0.4, 0.38, 0.42, **lossless)}
    four["lossless:16/18:8192:4:0.5"]["tokens_identical"] = 120
    return {"num_layers": 18, "new_tokens": 64, "prompts": 16, "repeats": 3, "batches": {"1": one, "4": four}}


def _cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_the_lossless_table_from_a_synthetic_result(tmp_path):
    results = tmp_path / "docs" / "results"
    write_result("gemma3-270m", "lossless", _payload(), ["prog"], root=results)
    old = results / "gemma3-270m" / "lossless" / "2000-01-01.json"  # an older file the table must not read
    old.write_text('{"stamp": {}, "result": {}}', encoding="utf-8")
    lines = tables.lossless_table(tmp_path).splitlines()
    assert len(lines) == 2 + len(tables.KEYS)
    assert len(_cells(lines[0])) == len(_cells(lines[1])) == len(_cells(lines[2 + tables.KEYS.index("smollm2")]))
    row = dict(zip(_cells(lines[0]), _cells(lines[2 + tables.KEYS.index("gemma3-270m")]), strict=True))
    assert row["model (layers)"] == "Gemma-3-270M (18)" and row["drafter"] == "rule 16/18:8192:4:0.5"
    assert row["lossless, batch 1"] == "1.31x [1.20, 1.40]" and row["lossless, batch 4"] == "0.40x [0.38, 0.42]"
    assert (row["acceptance"], row["drafts per verify"], row["layers per token"]) == ("62%", "1.50", "17.25")
    assert row["identical tokens"] == "248/256"  # batch 1 and batch 4 of the reported run
    assert row["`assistant_early_exit` (k)"] == "0.35x [0.30, 0.40] (14)"
    assert row["prompt lookup (n)"] == "0.97x [0.90, 1.00] (3; 8 prompts)"  # the peers ran on a subset
    assert row["lossy 0.95 (identical tokens)"] == "1.10x [1.00, 1.20] (100/128)"
    assert row["tokens x prompts x repeats"] == "64 x 16 x 3"
    assert row["measured on"].endswith(sorted((results / "gemma3-270m" / "lossless").glob("*.json"))[-1].stem)
    assert "not measured" in lines[2 + tables.KEYS.index("smollm2")]
    cell = tables.lossless_cell(tables._newest(tmp_path, "gemma3-270m", "lossless", variant=None)[2])
    assert cell == "1.31x [1.20, 1.40], 62% accepted, 128/128 identical"
    assert tables.lossless_cell(None) == "not measured"


def test_an_artifact_with_an_empty_schedule_is_named_so(tmp_path):
    payload = _payload()
    one = payload["batches"]["1"]
    one["lossless:drafting"] = _row("lossless", 2.0, 1.9, 2.1, acceptance=None,
                                    setting={"classifier": 0, "empty_schedule": True})
    write_result("qwen2.5-0.5b", "lossless", payload, ["prog"], root=tmp_path / "docs" / "results")
    line = tables.lossless_table(tmp_path).splitlines()[2 + tables.KEYS.index("qwen2.5-0.5b")]
    assert _cells(line)[1:5] == ["drafting (artifact, empty schedule)", "2.00x [1.90, 2.10]", "-", "-"]
    # the status column says that nothing drafted rather than "- accepted"
    cell = tables.lossless_cell(tables._newest(tmp_path, "qwen2.5-0.5b", "lossless", variant=None)[2])
    assert cell == "2.00x [1.90, 2.10], nothing drafted (nothing pays: the stock path), 128/128 identical"
