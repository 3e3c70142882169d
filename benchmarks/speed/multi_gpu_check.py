"""Does early exit work on a model placed across several GPUs, and does sharded collection on N GPUs equal one?

A prepared check for a machine with two or more CUDA devices (a few minutes on SmolLM2); it prints a pass/fail
table and exits with status 1 if any check fails.

    python -m benchmarks.speed.multi_gpu_check                      # every visible GPU
    python -m benchmarks.speed.multi_gpu_check --device cpu         # a CPU dry run (the placement check is skipped)

Checks (fp32, greedy, a batch of rows that exit at different layers, one running full depth, so the deeper
layers' K/V are filled or owed across the device boundary):

1. `device_map="balanced"` places the decoder layers on >= 2 GPUs (`hf_device_map`);
2. for each cache option (`propagate`, `exact`): `generate` with exits on the placed model gives the same tokens
   and exit layers as the same model on one device;
3. `generate(lossless=True)` on the placed model gives the stock model's greedy tokens (`exit_policy=None`);
4. sharded collection: `collect_features(distributed=True)` on N processes started by torchrun, one GPU each
   (`utils.distributed.place_replica`), gives the one-process table (tokens equal, features to 1e-5).

`--classifier DIR` uses a saved exit classifier instead of the scripted exits.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from adainfer_hf import AutoAdaInferForCausalLM, ExitClassifier, ScriptedExit
from adainfer_hf.data.builtin_tasks import builtin_task, builtin_task_names
from adainfer_hf.data.prompts import build_prompts
from adainfer_hf.training.collect import collect_features
from adainfer_hf.training.table import FeatureTable
from adainfer_hf.utils.distributed import launch_state, place_replica
from adainfer_hf.utils.tokenizers import left_padding
from benchmarks.common.prompts import FREE_TEXT, chat
from benchmarks.common.real_models import model_dir

CACHES = ("propagate", "exact")


def _prompts(n: int) -> list:
    return [p for name in builtin_task_names() for p in build_prompts(builtin_task(name), 2, limit=n)][:n]


def _load(path, **kwargs):
    return AutoAdaInferForCausalLM.from_pretrained(path, dtype=torch.float32, exit_classifier=None, **kwargs).eval()


def _policy(model, classifier: str | None, rows: int):
    if classifier:
        return ExitClassifier.from_pretrained(classifier).bind(model)
    L = model.config.num_hidden_layers
    return ScriptedExit([max(1, (i + 1) * L // rows) for i in range(rows)])  # the last row runs full depth


def _generate(model, tok, texts, new_tokens, **kwargs):
    with left_padding(tok), torch.no_grad():
        enc = tok(texts, return_tensors="pt", padding=True).to(next(model.parameters()).device)
        out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True,
                             pad_token_id=tok.pad_token_id, **kwargs)
    exits = getattr(out, "exit_layers", None)
    return out.sequences.cpu(), None if exits is None else exits.cpu()


def _checks(args, path, tok) -> list[tuple[str, bool, str]]:
    rows, results = [], []
    texts = [chat(tok, t) for t in FREE_TEXT[: args.rows]]
    single = _load(path).to(args.device if args.device == "cpu" else "cuda:0")
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    if gpus >= 2:
        placed = _load(path, device_map="balanced")
        devices = sorted({str(d) for d in placed.hf_device_map.values()})
        rows.append(("device_map='balanced' spans >= 2 GPUs", len(devices) >= 2, f"devices {devices}"))
    else:
        placed = single
        rows.append(("device_map='balanced' spans >= 2 GPUs", None, f"skipped: {gpus} GPU(s) on {args.device}"))
    policy = _policy(single, args.classifier, len(texts))
    for cache in CACHES:
        ref = _generate(single, tok, texts, args.new_tokens, exit_policy=policy, exit_cache=cache)
        got = _generate(placed, tok, texts, args.new_tokens, exit_policy=policy, exit_cache=cache)
        same = bool(torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1]))
        layers = sorted({int(v) for v in got[1].flatten().tolist()})
        rows.append((f"generate with exits, exit_cache={cache!r}: placed == one device", same,
                     f"exit layers seen {layers}"))
    stock = _generate(placed, tok, texts, args.new_tokens, exit_policy=None)[0]
    # Drafts are verified row by row: one exit layer for every row (or the classifier).
    drafts = policy if args.classifier else ScriptedExit(single.config.num_hidden_layers // 2)
    lossless = _generate(placed, tok, texts, args.new_tokens, exit_policy=drafts, lossless=True)[0]
    rows.append(("generate(lossless=True) on the placed model == stock greedy", bool(torch.equal(stock, lossless)),
                 f"{stock.shape[0]} rows x {args.new_tokens} tokens"))
    del placed
    results += rows
    results.append(_sharded_collection(args, single, tok))
    return results


def _sharded_collection(args, single, tok) -> tuple[str, bool, str]:
    n = max(2, torch.cuda.device_count()) if args.device == "cuda" else 2
    prompts = _prompts(args.prompts)
    reference = collect_features(single, tok, prompts, batch_size=args.batch_size, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "table.npz"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), "-m",
               "benchmarks.speed.multi_gpu_check", "--worker", str(out), "--model", args.model, "--prompts",
               str(args.prompts), "--batch-size", str(args.batch_size)]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        if args.device == "cpu":
            env["ACCELERATE_USE_CPU"] = "1"
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            return f"sharded collection on {n} processes == one", False, proc.stderr[-400:].replace("\n", " ")
        table = FeatureTable.load(out)
    same = (np.array_equal(table.top_token, reference.top_token) and np.array_equal(table.layer, reference.layer)
            and np.array_equal(table.final_token, reference.final_token))
    diff = float(np.abs(table.X - reference.X).max())
    return (f"sharded collection on {n} processes == one", same and diff <= 1e-5,
            f"{len(prompts)} prompts, {len(table.layer)} rows, max feature difference {diff:.1e}")


def _worker(args) -> None:
    """One process of the sharded collection: its own replica on its own GPU (or the CPU, over gloo)."""
    state = launch_state()
    path = _path(args.model)
    model = place_replica(_load(path), state)
    table = collect_features(model, AutoTokenizer.from_pretrained(path), _prompts(args.prompts),
                             batch_size=args.batch_size, progress=False, distributed=True)
    if table is not None:
        table.save(args.worker)


def _path(model: str) -> Path:
    return Path(model) if os.path.isdir(model) else model_dir(model)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="benchmarks.common.real_models key or a checkpoint dir.")
    parser.add_argument("--classifier", help="An exit-classifier directory (default: scripted exits per row).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--rows", type=int, default=4, help="Generated rows (default 4; at most 8).")
    parser.add_argument("--new-tokens", type=int, default=24, help="Tokens per row (default 24).")
    parser.add_argument("--prompts", type=int, default=32, help="Prompts of the sharded collection (default 32).")
    parser.add_argument("--batch-size", type=int, default=4, help="Prompts per collection batch (default 4).")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return
    path = _path(args.model)
    results = _checks(args, path, AutoTokenizer.from_pretrained(path))
    print("| check | result | detail |\n|---|---|---|")
    for name, ok, detail in results:
        print(f"| {name} | {'SKIP' if ok is None else 'PASS' if ok else 'FAIL'} | {detail} |")
    if any(ok is False for _, ok, _ in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
