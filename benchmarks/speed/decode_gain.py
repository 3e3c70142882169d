"""Decode wall-clock of saved exit classifiers against stock `generate`, with repeats.

`generation_real.py` times each rule once per held-out prompt (one alternating pass), which on a shared 2-core
machine leaves +-5-10% of noise on ratios that are themselves 0.9-1.1. This benchmark takes classifiers already
calibrated and saved (`generation_real.py --save-dir`, `adainfer train --out`) and times them on the same held-out
prompts (1-shot prompts of the four evaluated tasks, and chat questions, as in `generation_real.py`) with repeats:

* the timing loop is `timing.timed_runs` (also behind `generation_real.py`'s one pass): every run warmed up once,
  then per repeat and prompt the stock model's `generate` and every classifier once each, in an order rotated by
  one position per repeat; greedy, batch 1, exactly `--new-tokens` tokens;
* the ratio of a run is the stock time of the same prompt and repeat divided by its time; reported: the median
  and the quartiles over all (prompt, repeat) ratios, the ratio of summed times, token agreement with the stock
  text, the first divergence and layers per generated token.

Usage:
    python -m benchmarks.speed.decode_gain KEY --classifier NAME=DIR [--classifier NAME=DIR ...] [--caches exact,propagate]
Writes docs/results/<key>/decode_gain/<date>[-variant].json (stamped; each classifier by its config, not its
path) and prints a markdown table.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from adainfer_hf import AutoAdaInferForCausalLM
from benchmarks.common.classifiers import named_classifiers
from benchmarks.common.prompts import held_out_texts
from benchmarks.common.real_models import model_dir
from benchmarks.common.results import add_result_arguments, classifier_configs, save_result, settings_of
from benchmarks.common.timing import add_generation_timing_arguments, summarize, timed_runs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("key", help="a key of benchmarks/common/real_models.py")
    p.add_argument("--classifier", action="append", default=[], metavar="NAME=DIR", required=True)
    p.add_argument("--caches", default="exact", help="comma-separated exit_cache options, each classifier runs "
                   "with every one")
    p.add_argument("--eval-per-task", type=int, default=1)
    p.add_argument("--chat", type=int, default=2)
    add_generation_timing_arguments(p, new_tokens=64)
    add_result_arguments(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = model_dir(args.key)
    tok = AutoTokenizer.from_pretrained(path)
    dense = AutoModelForCausalLM.from_pretrained(path).eval()
    ada = AutoAdaInferForCausalLM.from_pretrained(path).eval()
    L = ada.config.num_hidden_layers
    classifiers = named_classifiers(args.classifier, ada)
    caches = args.caches.split(",")
    runs = {f"{name} {cache}": (clf, cache) for name, clf in classifiers.items() for cache in caches}
    texts = [t for part in held_out_texts(tok, 1, args.eval_per_task, args.chat) for t in part]
    rows = summarize(timed_runs(dense, ada, tok, texts, runs, args.new_tokens, args.repeats), L)
    record = {"benchmark": "decode_gain", "model": args.key, "num_layers": L, "args": settings_of(args),
              "prompts": len(texts), "threads": torch.get_num_threads(), "runs": rows,
              "classifiers": {name: {"decode_check_layers": c.decode_check_layers, "min_layer": c.min_layer,
                                     "conclusion": (c.calibration or {}).get("conclusion")}
                              for name, c in classifiers.items()},
              "versions": {"torch": torch.__version__}}
    save_result(args, args.key, "decode_gain", record, argv,
                classifiers=classifier_configs(args.classifier, classifiers.values()))
    print(f"{args.key}: {len(texts)} prompts x {args.new_tokens} tokens, {args.repeats} repeats")
    print("| run | speedup: median (quartiles) / of sums | token agreement / first divergence | layers per token |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['speedup_median']:.3f}x ({r['speedup_q1']:.3f}-{r['speedup_q3']:.3f}) / "
              f"{r['speedup_sum']:.3f}x | {r['token_agreement']:.3f} / {r['mean_prefix']:.1f} | "
              f"{r['mean_layers_per_token']:.2f} of {L} |")


if __name__ == "__main__":
    main()
