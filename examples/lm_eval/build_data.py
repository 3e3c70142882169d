"""Builds the JSONL files of the example lm-evaluation-harness tasks from function-vectors task files.

The function-vectors format is a JSON list of `{"input", "output"}`. Each task gets a seeded, disjoint split: a
`test` file (the evaluated examples) and a `train` file (the few-shot demonstrations).

    python examples/lm_eval/build_data.py --fv-dir /path/to/function_vectors --out examples/lm_eval/data

The task YAMLs beside this script read `examples/lm_eval/data/*.jsonl`, relative to the directory the harness
runs in (the repository root).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

TASKS = {"sentiment": "abstractive/sentiment.json", "present_past": "abstractive/present-past.json"}
SENTIMENT_CHOICES = ("positive", "negative")  # index = the multiple-choice label (doc_to_choice order)


def build(fv_dir: Path, out: Path, test_size: int = 200, seed: int = 0) -> dict[str, int]:
    """Writes `<task>_train.jsonl` and `<task>_test.jsonl` for each task; returns the test sizes."""
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, rel in TASKS.items():
        rows = json.loads((fv_dir / rel).read_text(encoding="utf-8"))
        if name == "sentiment":
            bad = sorted({r["output"] for r in rows} - set(SENTIMENT_CHOICES))
            if bad:
                raise ValueError(f"{fv_dir / rel}: outputs must be one of {SENTIMENT_CHOICES}; found {bad}.")
            rows = [{**r, "label": SENTIMENT_CHOICES.index(r["output"])} for r in rows]
        random.Random(seed).shuffle(rows)
        if len(rows) <= test_size:
            raise ValueError(f"{fv_dir / rel} has {len(rows)} examples; need more than --test-size={test_size}.")
        for split, part in (("test", rows[:test_size]), ("train", rows[test_size:])):
            with open(out / f"{name}_{split}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
        sizes[name] = test_size
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fv-dir", type=Path, required=True, help="function-vectors dataset directory")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    parser.add_argument("--test-size", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build(args.fv_dir, args.out, args.test_size, args.seed))


if __name__ == "__main__":
    main()
