"""What one exit check costs over a shortlist of the vocabulary (`check_vocabulary`), next to a full check.

For each model and phase (prompt forwards of 64 / 256 / 1024 tokens, and a single-token decode step), one check
(final norm, LM head, top-2, the decision's host copy) is timed against one decoder layer by the product's own
`training.check_cost.measure_check_cost`, with the whole vocabulary and with K token ids (the lowest K: the cost
does not depend on which), medians of `--repeats` alternating measurements.

Usage: python -m benchmarks.cost.vocabulary_cost KEY [KEY ...] [--sizes 4096,16384,32768] [--repeats 9]
Writes docs/results/models/vocabulary_cost/<date>.json (one model: docs/results/<key>/vocabulary_cost/; stamped)
and prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from transformers import AutoModelForCausalLM

from adainfer_hf.architectures import core as arch
from adainfer_hf.training.check_cost import measure_check_cost
from benchmarks.common.real_models import model_dir
from benchmarks.common.results import MODELS, add_result_arguments, save_result

PHASES = (("prefill", 64), ("prefill", 256), ("prefill", 1024), ("decode", 1))


def costs(model, sizes, repeats):
    """Rows {phase, tokens, full, K: layers...}: medians over `repeats` rounds, full and shortlisted alternating."""
    rows = []
    width = arch.head_of(model).width
    with torch.no_grad():
        for phase, length in PHASES:
            seq = length if phase == "prefill" else 256
            samples = {"full": [], **{k: [] for k in sizes}}
            for _ in range(repeats):
                samples["full"].append(measure_check_cost(model, seq_len=seq, phase=phase, repeats=5))
                for k in sizes:
                    samples[k].append(measure_check_cost(model, seq_len=seq, phase=phase, repeats=5,
                                                         check_vocabulary=range(min(k, width))))
            rows.append({"phase": phase, "tokens": length,
                         **{str(k): statistics.median(v) for k, v in samples.items()}})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("keys", nargs="+", help="keys of benchmarks/common/real_models.py")
    p.add_argument("--sizes", default="4096,16384,32768")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    add_result_arguments(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [int(k) for k in args.sizes.split(",")]
    out = {}
    for key in args.keys:
        model = AutoModelForCausalLM.from_pretrained(model_dir(key)).eval()
        out[key] = {"vocab": arch.head_of(model).width, "layers": model.config.num_hidden_layers,
                    "rows": costs(model, sizes, args.repeats)}
        print(f"\n{key} (vocab {out[key]['vocab']}): one check in decoder layers")
        print("| phase | tokens | full | " + " | ".join(f"{k} ids" for k in sizes) + " |")
        print("|---|---|---|" + "---|" * len(sizes))
        for r in out[key]["rows"]:
            print(f"| {r['phase']} | {r['tokens']} | {r['full']:.3f} | "
                  + " | ".join(f"{r[str(k)]:.3f}" for k in sizes) + " |")
        del model
    # the payload maps each model key to its rows (what scripts/docs_tables.py reads)
    save_result(args, MODELS if len(args.keys) > 1 else args.keys[0], "vocabulary_cost", out, argv)


if __name__ == "__main__":
    main()
