"""Trains the drafting artifact shipped for the embedded SmolLM2 (`adainfer train --lossless`), or one for any
checkpoint, by one documented command line.

    PYTHONPATH=src python scripts/train_shipped_artifacts.py                    # the shipped drafting artifact
    PYTHONPATH=src python scripts/train_shipped_artifacts.py --model DIR --out OUT [--first-layer K]

It runs `adainfer train` with the arguments below (printed first), so the artifact's
`calibration["training_config"]` records every setting; the prompts are the shipped drafting prompts
(`data/drafting_prompts.jsonl`), the cost model is measured on this machine during the run.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from adainfer_hf.cli.main import main as adainfer
from adainfer_hf.models.default_model import ARTIFACTS_DIR, DRAFTING_SUBDIR


def command(model: str, out: str, first_layer: int, tokens: int, vocabularies: list[str]) -> list[str]:
    """The `adainfer` arguments that train a drafting artifact."""
    return ["train", "--model", model, "--lossless", "--method", "logistic", "--generation-tokens", str(tokens),
            "--first-layer", str(first_layer), "--draft-vocabularies", *vocabularies, "--batch-size", "8",
            "--quiet", "--out", out]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="Checkpoint (default: the embedded SmolLM2).")
    p.add_argument("--out", default=str(ARTIFACTS_DIR / DRAFTING_SUBDIR), help="Artifact directory (default: the "
                   "shipped drafting artifact's).")
    p.add_argument("--first-layer", type=int, default=20, help="First recorded (checkable) layer (default 20: on the "
                   "embedded SmolLM2, 30 layers, a draft from below it is not worth its check).")
    p.add_argument("--generation-tokens", type=int, default=48, help="Tokens per prompt (default 48).")
    p.add_argument("--vocabularies", nargs="+", default=["full", "8192"], help="Shortlist sizes (default full 8192).")
    args = p.parse_args(argv)
    cmd = command(args.model, args.out, args.first_layer, args.generation_tokens, args.vocabularies)
    print("adainfer " + shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    status = adainfer(cmd)
    print(f"took {time.perf_counter() - t0:.0f} s", flush=True)
    if status == 0 and Path(args.out).is_dir():
        (Path(args.out) / "TRAINED_BY.txt").write_text("PYTHONPATH=src python scripts/train_shipped_artifacts.py "
                                                        + shlex.join(sys.argv[1:] if argv is None else argv) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
