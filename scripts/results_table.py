#!/usr/bin/env python
"""The README's table of lossless generation on the real models, built from the newest stamped result files.

Reads, for every model directory under the results root (default `docs/results`), the newest
`<model>/lossless/<date>.json` written by `python -m benchmarks.speed.lossless` (through
`adainfer_hf.utils.results.write_result`) and prints one Markdown row per model: the best lossless run's speed
against stock `generate` at batch 1 and batch 4 (median of the per-prompt ratios, quartiles in brackets), its
acceptance rate, the tokens identical to stock, the best peer of each kind (transformers' `assistant_early_exit`,
prompt-lookup decoding) and the lossy 0.95 reference, then the device and date of each file. Never copy the
numbers by hand: rerun this script.

Usage: `python scripts/results_table.py [--root docs/results] [--models smollm2 gemma3-270m ...]`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

QUESTION = "lossless"
ORDER = ("smollm2", "gemma3-270m", "qwen2.5-0.5b", "qwen2.5-1.5b")
HEADER = ("| model | lossless b1 | lossless b4 | acceptance | identical tokens | assistant_early_exit (best k) | "
          "prompt lookup (best n) | lossy 0.95 | rule | device, date |")


def newest(root: Path, model: str, question: str = QUESTION) -> Path | None:
    """The newest `<root>/<model>/<question>/<date>.json` (dates sort as text), or None."""
    files = sorted((Path(root) / model / question).glob("*.json"))
    return files[-1] if files else None


def _ratio(row: dict | None) -> str:
    if not row:
        return "-"
    q = row["ratio"]
    return f"{q['median']:.2f}x [{q['q1']:.2f}, {q['q3']:.2f}]"


def _best(rows: dict, prefix: str) -> tuple[str | None, dict | None]:
    names = [n for n in rows if n.startswith(prefix)]
    if not names:
        return None, None
    name = max(names, key=lambda n: rows[n]["ratio"]["median"])
    return name, rows[name]


def model_row(model: str, data: dict) -> str:
    """One Markdown row from a lossless result file's content (`{"stamp": ..., "result": ...}`)."""
    result, info = data["result"], data["stamp"]
    batches = result.get("batches", {})
    one, four = batches.get("1", {}), batches.get("4", {})
    name, lossless = _best(one or four, "lossless:")
    same_four = four.get(name) if name else None
    tokens = sum(r["tokens_identical"] for r in (lossless, same_four) if r)
    total = sum(r["tokens"] for r in (lossless, same_four) if r)
    acceptance = lossless.get("acceptance") if lossless else None
    peers = []
    for prefix in ("early_exit:", "lookup:"):
        peer, row = _best(one, prefix)
        peers.append(f"{_ratio(row)} ({peer.split(':', 1)[1]})" if row else "-")
    lossy = one.get("lossy:0.95")
    rule = name.split(":", 1)[1] if name else "-"
    device = f"{info['device'].get('gpu') or info['device'].get('cpu')}, {info['date'][:10]}"
    return (f"| {model} | {_ratio(lossless)} | {_ratio(same_four)} | "
            f"{'-' if acceptance is None else f'{acceptance:.2f}'} | {tokens}/{total} | {peers[0]} | {peers[1]} | "
            f"{_ratio(lossy)} | {rule} | {device} |")


def build_table(root: Path, models: list[str] | None = None) -> str:
    """The Markdown table of `models` (default: the four real models, then any other with a lossless result)."""
    root = Path(root)
    if models is None:
        found = sorted(p.parent.name for p in root.glob(f"*/{QUESTION}"))
        models = [m for m in ORDER if m in found] + [m for m in found if m not in ORDER]
    lines = [HEADER, "|" + "---|" * HEADER.count(" | ") + "---|"]
    for model in models:
        path = newest(root, model)
        if path is None:
            lines.append(f"| {model} | no result | | | | | | | | |")
            continue
        lines.append(model_row(model, json.loads(path.read_text(encoding="utf-8"))))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(Path("docs") / "results"))
    parser.add_argument("--models", nargs="*", default=None)
    args = parser.parse_args(argv)
    print(build_table(Path(args.root), args.models))
    return 0


if __name__ == "__main__":
    sys.exit(main())
