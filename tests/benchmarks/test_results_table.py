"""`scripts/results_table.py` builds the README's lossless table from the newest stamped result files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from adainfer_hf.utils.results import write_result

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("results_table", ROOT / "scripts" / "results_table.py")
tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tables)


def _row(kind, median, q1, q3, **extra):
    return {"kind": kind, "ratio": {"median": median, "q1": q1, "q3": q3, "n": 3}, "tokens_identical": 128,
            "tokens": 128, "rows": 2, "rows_identical": 2, "mismatches": [], **extra}


def _payload():
    one = {"stock": _row("stock", 1, 1, 1),
           "lossless:16/18:8192:4:0.5": _row("lossless", 1.31, 1.2, 1.4, acceptance=0.625),
           "lossless:14/18:8192:4:0.6": _row("lossless", 1.05, 1.0, 1.1, acceptance=0.5),
           "early_exit:9": _row("peer", 0.21, 0.2, 0.22), "early_exit:14": _row("peer", 0.35, 0.3, 0.4),
           "lookup:3": _row("peer", 0.97, 0.9, 1.0), "lookup:10": _row("peer", 0.88, 0.8, 0.9)}
    four = {"stock": _row("stock", 1, 1, 1),
            "lossless:16/18:8192:4:0.5": _row("lossless", 0.4, 0.38, 0.42, acceptance=0.625)}
    four["lossless:16/18:8192:4:0.5"]["tokens_identical"] = 120
    return {"batches": {"1": one, "4": four}}


def test_table_from_a_synthetic_result(tmp_path):
    write_result("gemma3-270m", "lossless", _payload(), ["prog"], root=tmp_path)
    old = tmp_path / "gemma3-270m" / "lossless" / "2000-01-01.json"  # an older file the table must not read
    old.write_text('{"stamp": {}, "result": {}}', encoding="utf-8")
    lines = tables.build_table(tmp_path, ["gemma3-270m", "smollm2"]).splitlines()
    assert lines[0] == tables.HEADER and len(lines) == 4
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert len(cells) == lines[0].count("|") - 1 == len(lines[1].strip("|").split("|"))
    model, b1, b4, acc, same, ee, lookup, lossy, rule, device = cells
    assert (model, b1, b4, acc) == ("gemma3-270m", "1.31x [1.20, 1.40]", "0.40x [0.38, 0.42]", "0.62")
    assert same == "248/256"  # batch 1 and batch 4 of the best rule
    assert ee == "0.35x [0.30, 0.40] (14)" and lookup == "0.97x [0.90, 1.00] (3)"
    assert lossy == "-" and rule == "16/18:8192:4:0.5"
    assert device.endswith(tables.newest(tmp_path, "gemma3-270m").stem)
    assert "no result" in lines[3]


def test_models_found_in_the_root(tmp_path):
    write_result("qwen2.5-0.5b", "lossless", _payload(), ["prog"], root=tmp_path)
    write_result("smollm2", "lossless", _payload(), ["prog"], root=tmp_path)
    rows = tables.build_table(tmp_path).splitlines()[2:]
    assert [r.split("|")[1].strip() for r in rows] == ["smollm2", "qwen2.5-0.5b"]  # the README's order
