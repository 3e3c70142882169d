"""Writes the README's status table from the result files (never by hand).

    python scripts/docs_tables.py          # rewrite the block between <!-- results:status --> markers
    python scripts/docs_tables.py --check  # exit 1 if README.md is not what the result files say

Per real model: lossless decode speed against stock `generate` (the newest docs/results/<key>/lossless/*.json),
the layers certified exits save on tasks at 0.99 and 0.95 (docs/results/<key>/results.json and
target-0.95/results.json, the `adainfer eval` runs), and the oracle ceiling (the share of layers left after the
first layer whose logit lens equals the dense first token, from the same eval runs).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("smollm2", "qwen2.5-0.5b", "gemma3-270m", "qwen2.5-1.5b")
NAMES = {"smollm2": "SmolLM2-135M-Instruct", "qwen2.5-0.5b": "Qwen2.5-Coder-0.5B-Instruct",
         "gemma3-270m": "Gemma-3-270M", "qwen2.5-1.5b": "Qwen2.5-Coder-1.5B-Instruct"}
BEGIN, END = "<!-- results:status -->", "<!-- /results:status -->"


def _eval_summary(path: Path) -> dict | None:
    """`{method: row}` of an `adainfer eval` results file's overall rows (None when the file is absent)."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return {row["method"]: row for row in data["summary"] if row["task"] == "all"}


def _saved(summary: dict | None) -> str:
    if summary is None or "adainfer" not in summary:
        return "-"
    row = summary["adainfer"]
    return f"{100 * row['pruning_ratio']:.0f}% (acc {100 * row['accuracy']:.1f} vs {100 * summary['dense']['accuracy']:.1f})"


def _newest(directory: Path) -> dict | None:
    files = sorted(directory.glob("*.json")) if directory.is_dir() else []
    return json.loads(files[-1].read_text()) if files else None


def lossless_cell(result: dict | None) -> str:
    """`speed (quartiles), acceptance, identical` of the lossless run at batch 1, from a stamped result file."""
    if result is None:
        return "not measured"
    run = result["runs"]["lossless"]["batch_1"]
    return (f"{run['speedup_median']:.2f}x ({run['speedup_q1']:.2f}-{run['speedup_q3']:.2f}), "
            f"{100 * run['acceptance']:.0f}% accepted, {run['identical']}/{run['prompts']} identical")


def status_table(root: Path = ROOT) -> str:
    rows = ["| model (layers) | lossless decode vs stock, batch 1 | certified savings on tasks @0.99 | @0.95 | "
            "oracle ceiling (first token) | lossless measured on |",
            "|---|---|---|---|---|---|"]
    for key in KEYS:
        results = root / "docs" / "results" / key
        s99, s95 = _eval_summary(results / "results.json"), _eval_summary(results / "target-0.95" / "results.json")
        lossless = _newest(results / "lossless")
        layers = (s99 or {}).get("dense", {}).get("num_layers", "?")
        oracle = f"{100 * s99['oracle']['pruning_ratio']:.0f}%" if s99 and "oracle" in s99 else "-"
        where = f"{lossless['stamp']['device']}, {lossless['stamp']['date'][:10]}" if lossless else "-"
        rows.append(f"| {NAMES[key]} ({layers}) | {lossless_cell(lossless)} | {_saved(s99)} | {_saved(s95)} | "
                    f"{oracle} | {where} |")
    return "\n".join(rows)


def render(readme: str, table: str) -> str:
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    return readme[:start] + "\n" + table + "\n" + readme[end:]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only compare; exit 1 when README.md is out of date")
    args = p.parse_args(argv)
    path = ROOT / "README.md"
    text = path.read_text()
    new = render(text, status_table())
    if args.check:
        if new != text:
            print("README.md's status table differs from the result files: run python scripts/docs_tables.py",
                  file=sys.stderr)
            return 1
        return 0
    path.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
