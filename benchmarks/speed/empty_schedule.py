"""What a classifier whose schedules came out empty costs over the stock class in `generate`.

`adainfer train` ends with empty prefill and decode schedules when no check pays for itself at the target (the
classifier then never exits: L of L layers per token). Such a classifier should cost nothing: a drop-in class
carrying it must generate as fast as the stock class. This benchmark loads one checkpoint twice, as the stock
class (`AutoModelForCausalLM`) and as the AdaInfer class with a classifier whose `check_layers` and
`decode_check_layers` are empty (built here, as `train` leaves it: any estimator, it is never called; or
`--classifier DIR` for a saved one), and times greedy `generate` of exactly `--new-tokens` tokens, batch 1:

* runs: "stock" (the stock class), "empty" (the AdaInfer class with the classifier set as `model.exit_classifier`,
  as a user loads it) and "none" (the same AdaInfer model with `exit_policy=None`: the class alone);
* every run warmed up once; then per repeat and prompt each run once, the order rotated by one position per
  (repeat, prompt) so no run always follows the same one;
* the slowdown of a run is its time divided by the stock time of the same prompt and repeat; reported: median and
  quartiles over all (prompt, repeat) pairs, and the ratio of summed times; the generated tokens must equal the
  stock class's (checked).

Timings use `torch.set_num_threads(--threads)` (default 1, so concurrent processes on a small shared machine
interfere less).

Usage: python -m benchmarks.speed.empty_schedule KEY [KEY ...] [--prompts 8] [--new-tokens 32] [--repeats 3]
Writes docs/results/models/empty_schedule/<date>.json (one key: docs/results/<key>/empty_schedule/; stamped by
`adainfer_hf.utils.results`) and prints a markdown table; exits with status 1 when a run's tokens differ from the
stock class's.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from adainfer_hf import AutoAdaInferForCausalLM, ExitClassifier, GapThresholdRule
from benchmarks.common.prompts import held_out_texts
from benchmarks.common.real_models import model_dir
from benchmarks.common.results import (
    MODELS,
    add_result_arguments,
    classifier_configs,
    save_result,
    settings_of,
)
from benchmarks.common.timing import add_generation_timing_arguments


def empty_classifier(model) -> ExitClassifier:
    """A classifier as `adainfer train` leaves it when no schedule is certified: both schedules empty."""
    clf = ExitClassifier(GapThresholdRule().fit(np.zeros((1, 2))), check_layers=[], decode_check_layers=[])
    return clf.bind(model)


def _prompts(tok, n: int) -> list[str]:
    """`n` prompts: 1-shot prompts of the four evaluated tasks, then chat questions (as `decode_gain.py`)."""
    per_task = max(1, (n + 1) // 2 // 4)
    tasks, chat = held_out_texts(tok, 1, per_task, max(0, n - 4 * per_task))
    return (tasks + chat)[:n]


def time_runs(calls: dict, tok, texts: list[str], new_tokens: int, repeats: int) -> dict:
    """`{run: {"seconds": [repeats][prompts], "tokens": [...]}}`, orders rotated per (repeat, prompt)."""
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    names = list(calls)
    out = {name: {"seconds": np.zeros((repeats, len(texts))), "tokens": []} for name in names}
    with torch.no_grad():
        warm = tok(texts[:1], return_tensors="pt")
        for name in names:
            calls[name](warm, {**gen, "max_new_tokens": 4, "min_new_tokens": 4})
        for r in range(repeats):
            for i, text in enumerate(texts):
                enc = tok([text], return_tensors="pt")
                shift = (r * len(texts) + i) % len(names)
                for name in names[shift:] + names[:shift]:
                    t0 = time.perf_counter()
                    seq = calls[name](enc, gen)
                    out[name]["seconds"][r, i] = time.perf_counter() - t0
                    if r == 0:
                        out[name]["tokens"].append(seq[0, enc.input_ids.shape[1]:].tolist())
    return out


def summarize(out: dict) -> dict:
    stock = out["stock"]["seconds"]
    rows = {}
    for name, r in out.items():
        if name == "stock":
            continue
        ratios = (r["seconds"] / stock).reshape(-1)
        q1, med, q3 = np.quantile(ratios, [0.25, 0.5, 0.75])
        rows[name] = {"slowdown_median": float(med), "slowdown_q1": float(q1), "slowdown_q3": float(q3),
                      "slowdown_sum": float(r["seconds"].sum() / stock.sum()), "n_ratios": int(ratios.size),
                      "same_tokens": r["tokens"] == out["stock"]["tokens"],
                      "seconds": r["seconds"].tolist()}
    rows["stock"] = {"seconds": stock.tolist(), "median_s": float(np.median(stock))}
    return rows


def bench_model(key: str, args) -> dict:
    """Times the three runs on one model; prints its table and returns its record."""
    path = model_dir(key)
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    stock = AutoModelForCausalLM.from_pretrained(path).eval()
    ada = AutoAdaInferForCausalLM.from_pretrained(path, exit_classifier=None).eval()
    clf = ExitClassifier.from_pretrained(args.classifier) if args.classifier else empty_classifier(ada)
    ada.exit_classifier = clf  # as a user sets it (or loads it beside the checkpoint)
    L = ada.config.num_hidden_layers
    if clf.layers_to_check(L) or clf.layers_to_check(L, decode=True):
        raise SystemExit(f"{clf} has a non-empty schedule; this benchmark is for empty ones.")
    calls = {
        "stock": lambda enc, g: stock.generate(**enc, **g),
        "empty": lambda enc, g: ada.generate(**enc, **g),
        "none": lambda enc, g: ada.generate(**enc, **g, exit_policy=None),
    }
    texts = _prompts(tok, args.prompts)
    rows = summarize(time_runs(calls, tok, texts, args.new_tokens, args.repeats))
    print(f"\n{key}: {len(texts)} prompts x {args.new_tokens} tokens, {args.repeats} repeats, "
          f"{torch.get_num_threads()} thread(s); stock median {rows['stock']['median_s']:.3f} s per generate")
    print("| run | time / stock: median (quartiles) | of sums | same tokens |")
    print("|---|---|---|---|")
    for name in ("empty", "none"):
        r = rows[name]
        print(f"| {name} | {r['slowdown_median']:.4f}x ({r['slowdown_q1']:.4f}-{r['slowdown_q3']:.4f}) | "
              f"{r['slowdown_sum']:.4f}x | {r['same_tokens']} |")
    return {"num_layers": L,
            "prompts": len(texts), "new_tokens": args.new_tokens, "repeats": args.repeats, "runs": rows,
            "classifier": "--classifier" if args.classifier else "built: check_layers=[], decode_check_layers=[]"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("keys", nargs="+", help="keys of benchmarks/common/real_models.py")
    p.add_argument("--classifier", default=None, metavar="DIR", help="a saved classifier with empty schedules "
                   "instead of the one built here (one key only)")
    p.add_argument("--prompts", type=int, default=8)
    add_generation_timing_arguments(p, new_tokens=32, threads=1)
    add_result_arguments(p)
    args = p.parse_args(argv)
    if args.classifier and len(args.keys) != 1:
        p.error("--classifier goes with exactly one model key.")
    torch.set_num_threads(args.threads)
    results = {key: bench_model(key, args) for key in args.keys}
    record = {"benchmark": "empty_schedule", "args": settings_of(args), "threads": torch.get_num_threads(),
              "models": results}
    configs = None
    if args.classifier:
        configs = classifier_configs([args.classifier], [ExitClassifier.from_pretrained(args.classifier)])
    save_result(args, MODELS if len(args.keys) > 1 else args.keys[0], "empty_schedule", record, argv,
                classifiers=configs)
    differ = [f"{key} {name}" for key, r in results.items() for name in ("empty", "none")
              if not r["runs"][name]["same_tokens"]]
    if differ:
        raise SystemExit(f"generated tokens differ from the stock class's: {', '.join(differ)}")


if __name__ == "__main__":
    main()
