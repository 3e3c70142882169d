"""First-token scoring wall-clock of saved exit classifiers against the stock model, with repeats.

The prompt forward of `--eval-per-task` 1-shot prompts of each evaluated task (as in `generation_real.py`), in
batches of `--batch-size`, `logits_to_keep=1`, no cache: per batch the stock forward and each classifier's forward
alternate (`gate_real.first_token`), and the whole pass repeats `--repeats` times. Reported per classifier: the
median of all per-batch ratios (stock time / its time), the ratio of summed times, the agreement of the next token
with the stock one and the mean exit layer. `--lens-at-exits NAME` adds a twin of a `method="gate_only"`
classifier that computes the LM head at each check its gate passes (how the loop ran such rules before their
exits took the final head instead).

Usage: python -m benchmarks.speed.prefill_gain KEY --classifier NAME=DIR [...] [--repeats 3]
Writes docs/results/<key>/prefill_gain/<date>[-variant].json (stamped) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.common.classifiers import named_classifiers
from benchmarks.common.prompts import held_out_texts
from benchmarks.common.real_models import load_pair
from benchmarks.common.results import add_result_arguments, classifier_configs, save_result, settings_of
from benchmarks.common.timing import first_token


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("key", help="a key of benchmarks/common/real_models.py")
    p.add_argument("--classifier", action="append", default=[], metavar="NAME=DIR", required=True)
    p.add_argument("--eval-per-task", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lens-at-exits", action="append", default=[], metavar="NAME",
                   help="also time classifier NAME (one that exits wherever its gate passes) as the loop ran it "
                   "before such exits were deferred: the LM head at every check where the gate passes")
    add_result_arguments(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tok, dense, ada = load_pair(args.key)
    classifiers = named_classifiers(args.classifier, ada)
    configs = classifier_configs(args.classifier, classifiers.values())  # as saved (before any twin is added)
    for name in args.lens_at_exits:
        if name not in classifiers or not classifiers[name].exits_where_gate_passes():
            raise SystemExit(f"--lens-at-exits {name!r}: expected the name of a --classifier that exits wherever "
                             f"its gate passes (of {sorted(classifiers)}).")
        twin = classifiers[name].replace()
        twin.exits_where_gate_passes = lambda: False  # the head at each passing check, then `decide`
        classifiers[f"{name} (lens at exits)"] = twin
    prompts, _ = held_out_texts(tok, 1, args.eval_per_task, 0)
    runs = [first_token(dense, ada, tok, prompts, classifiers, args.batch_size) for _ in range(args.repeats)]
    out = {}
    for name in classifiers:
        rs = [r[name] for r in runs]
        out[name] = {"prompts": rs[0]["n"], "repeats": len(rs), "agreement": rs[0]["agreement"],
                     "mean_layers": rs[0]["mean_layers"],
                     "speedup_median": statistics.median(r["speedup_median"] for r in rs),
                     "speedup_sum": sum(r["dense_s"] for r in rs) / sum(r["s"] for r in rs),
                     "per_repeat_median": [r["speedup_median"] for r in rs]}
    print(f"{args.key}: {len(prompts)} prompts, batch {args.batch_size}, {args.repeats} repeats")
    print("| classifier | prefill speedup: median / of sums | next-token agreement | mean exit layer |")
    print("|---|---|---|---|")
    for name, r in out.items():
        print(f"| {name} | {r['speedup_median']:.3f}x / {r['speedup_sum']:.3f}x | {r['agreement']:.3f} | "
              f"{r['mean_layers']:.2f} of {ada.config.num_hidden_layers} |")
    save_result(args, args.key, "prefill_gain",
                {"benchmark": "prefill_gain", "key": args.key, "results": out, "layers": ada.config.num_hidden_layers,
                 "cpu_threads": args.threads, "args": settings_of(args)}, argv,
                classifiers=configs)


if __name__ == "__main__":
    main()
