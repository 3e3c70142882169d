"""Generation wall-clock of exit classifiers against the stock model's `generate`: the one timing loop the
benchmarks share (`gate_real.py` and `generation_real.py` with one repeat, `decode_gain.py` with several).

Every run is warmed up once (a short untimed generation); then per repeat and prompt, the stock model's `generate`
and every run generate once each, greedy, batch 1, exactly `new_tokens` tokens, in an order rotated by one position
per repeat (so no run always follows the same one). The ratio of a run is the stock time of the same prompt and
repeat divided by its time.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch


def add_generation_timing_arguments(parser, *, new_tokens: int, repeats: int = 3, threads: int = 2) -> None:
    """`--new-tokens`, `--repeats` and `--threads` of the benchmarks that time `generate` (their defaults vary)."""
    parser.add_argument("--new-tokens", type=int, default=new_tokens, help="tokens generated per prompt, exactly")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed repeats (medians and quartiles)")
    parser.add_argument("--threads", type=int, default=threads, help="torch threads (the machine is shared)")


def timed_runs(dense, ada, tok, texts, runs, new_tokens, repeats):
    """`{run: {"ratios": [...], "s": ..., "dense_s": ..., "seconds": [...], "tokens": [...], "layers": [...]}}`
    with tokens and layers from the first repeat; `runs` maps a name to `(classifier, exit_cache)`, and the run
    "stock" (the stock model's `generate`) is added."""
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    short = {**gen, "max_new_tokens": 4, "min_new_tokens": 4}
    calls = {"stock": lambda enc, g=gen: (dense.generate(**enc, **g), None)}
    for name, (clf, cache) in runs.items():
        def call(enc, g=gen, clf=clf, cache=cache):
            res = ada.generate(**enc, **g, exit_policy=clf, exit_cache=cache, return_dict_in_generate=True)
            return res.sequences, res.exit_layers.float().reshape(-1).tolist()
        calls[name] = call
    names = list(calls)
    times = {name: np.zeros((repeats, len(texts))) for name in names}
    out = {name: {"tokens": [], "layers": []} for name in names}
    with torch.no_grad():
        warm = tok(texts[:1], return_tensors="pt")
        for name in names:
            calls[name](warm, short)
        for r in range(repeats):
            order = names[r % len(names):] + names[: r % len(names)]
            for i, text in enumerate(texts):
                enc = tok([text], return_tensors="pt")
                n = enc.input_ids.shape[1]
                for name in order:
                    t0 = time.perf_counter()
                    seq, layers = calls[name](enc)
                    times[name][r, i] = time.perf_counter() - t0
                    if r == 0:
                        out[name]["tokens"].append(seq[0, n:].tolist())
                        out[name]["layers"] += layers or []
    for name in names:
        out[name]["ratios"] = (times["stock"] / times[name]).reshape(-1).tolist()
        out[name]["s"], out[name]["dense_s"] = float(times[name].sum()), float(times["stock"].sum())
        out[name]["seconds"] = times[name].tolist()
    return out


def summarize(out, L):
    """Per run (not "stock"): median and quartiles of the ratios, the ratio of summed times, token agreement with
    the stock text, mean first divergence (common prefix length) and layers per generated token."""
    dense = out["stock"]["tokens"]
    rows = {}
    for name, r in out.items():
        if name == "stock":
            continue
        same = [np.array(a) == np.array(b) for a, b in zip(dense, r["tokens"], strict=True)]
        q1, med, q3 = np.quantile(r["ratios"], [0.25, 0.5, 0.75])
        rows[name] = {"prompts": len(same), "new_tokens": len(dense[0]) if dense else 0,
                      "speedup_median": float(med), "speedup_q1": float(q1), "speedup_q3": float(q3),
                      "speedup_sum": r["dense_s"] / r["s"], "n_ratios": len(r["ratios"]),
                      "token_agreement": float(np.mean(np.concatenate(same))),
                      "mean_prefix": float(np.mean([s.cumprod().sum() for s in same])),
                      "mean_layers_per_token": float(np.mean(r["layers"])) if r["layers"] else float(L),
                      "s": r["s"], "dense_s": r["dense_s"],
                      "seconds": r["seconds"], "dense_seconds": out["stock"]["seconds"]}
    return rows


def timed(fn, **kwargs):
    t0 = time.perf_counter()
    out = fn(**kwargs)
    return out, time.perf_counter() - t0


def first_token(dense, ada, tok, prompts, classifiers, batch_size):
    """Agreement / mean layers / wall-clock of each classifier on the prompts' first token."""
    batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    out = {name: {"agree": [], "layers": [], "ratios": [], "dense_s": 0.0, "s": 0.0} for name in classifiers}
    with torch.no_grad():
        warm = tok(batches[0][:1], return_tensors="pt", padding=True)
        dense(**warm, logits_to_keep=1)
        for clf in classifiers.values():
            ada(**warm, logits_to_keep=1, exit_policy=clf)
        for texts in batches:
            enc = tok(texts, return_tensors="pt", padding=True)
            for name, clf in classifiers.items():
                ref, t_dense = timed(dense, **enc, logits_to_keep=1, use_cache=False)
                got, t = timed(ada, **enc, logits_to_keep=1, use_cache=False, exit_policy=clf)
                r = out[name]
                r["agree"] += (ref.logits[:, -1].argmax(-1) == got.logits[:, -1].argmax(-1)).tolist()
                r["layers"] += got.exit_layers.tolist()
                r["ratios"].append(t_dense / t)
                r["dense_s"] += t_dense
                r["s"] += t
    return {name: {"n": len(r["agree"]), "agreement": float(np.mean(r["agree"])),
                   "mean_layers": float(np.mean(r["layers"])), "speedup_median": statistics.median(r["ratios"]),
                   "speedup_sum": r["dense_s"] / r["s"], "dense_s": r["dense_s"], "s": r["s"]}
            for name, r in out.items()}


def generation(dense, ada, tok, texts, classifiers, new_tokens, caches=None):
    """Token agreement / prefix / layers per token / wall-clock of `new_tokens` greedy tokens at batch 1, one
    alternating pass (`timing.timed_runs`); `caches` maps a classifier's name to its exit cache option (default
    "propagate")."""
    caches = caches or {}
    runs = {name: (clf, caches.get(name, "propagate")) for name, clf in classifiers.items()}
    return summarize(timed_runs(dense, ada, tok, texts, runs, new_tokens, 1), ada.config.num_hidden_layers)


def quartiles(values) -> dict:
    """`{"median", "q1", "q3", "n"}` of `values` (the summary every speed result reports)."""
    values = np.asarray(values, dtype=float).reshape(-1)
    if values.size == 0:
        raise ValueError("quartiles of no values: a run produced no timings.")
    q1, med, q3 = np.quantile(values, [0.25, 0.5, 0.75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3), "n": int(values.size)}
