"""How long does collecting a prompt table take on the real SmolLM2, on 1 process and on N (sharded)?

`collect_features` runs one forward per prompt batch with the logit lens at every layer; under torchrun /
`accelerate launch` each process runs its share of the batches (`distributed=True`) and the main process merges
the table. This script alternates runs with each process count (`--processes 1 2`), `--repeats` times, each run
in fresh processes started by torchrun with `--threads` torch threads per process, and reports the median seconds
per 1,000 prompts and per prompt token.

    python -m benchmarks.cost.collect_throughput --processes 1 2 --prompts 40 --repeats 3

Prints one JSON line per run and a summary, and writes docs/results/smollm2/collect_throughput/<date>.json
(`--no-write`: print only). `--worker` is the per-process entry torchrun starts (not for direct use).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist
from transformers import AutoTokenizer

from adainfer_hf.data.builtin_tasks import builtin_task, builtin_task_names
from adainfer_hf.data.prompts import build_prompts
from adainfer_hf.models.auto import AutoAdaInferForCausalLM
from adainfer_hf.training.collect import collect_features
from adainfer_hf.utils.results import write_result
from benchmarks.common.real_models import model_dir

SHOTS = 2


def _prompts(n: int) -> list:
    prompts = []
    for name in builtin_task_names():
        prompts += build_prompts(builtin_task(name), SHOTS, limit=n)
    return prompts[:n]


def worker(args) -> None:
    """One process of a run: load, wait for the others, collect its share, report (the main process)."""
    distributed = "RANK" in os.environ
    torch.set_num_threads(args.threads)
    if distributed:
        dist.init_process_group("gloo")
    path = model_dir(args.model)
    model = AutoAdaInferForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    prompts = _prompts(args.prompts)
    tokens = sum(len(tok(p.text).input_ids) for p in prompts)
    if distributed:
        dist.barrier()
    start = time.perf_counter()
    table = collect_features(model, tok, prompts, batch_size=args.batch_size, progress=False, distributed=distributed)
    seconds = time.perf_counter() - start  # the main process has the merged table: the run is done
    if table is not None:
        print("RESULT " + json.dumps({"processes": dist.get_world_size() if distributed else 1,
                                      "threads_per_process": torch.get_num_threads(), "prompts": len(prompts),
                                      "prompt_tokens": tokens, "rows": len(table.layer), "seconds": seconds}),
              flush=True)
    if distributed:
        dist.destroy_process_group()


def _run(n: int, args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), "-m",
           "benchmarks.cost.collect_throughput", "--worker", "--model", args.model, "--prompts", str(args.prompts),
           "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or len(lines) != 1:
        raise RuntimeError(f"{n}-process run failed (status {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[0][len("RESULT "):])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="benchmarks.common.real_models key (default smollm2).")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="Process counts to alternate.")
    parser.add_argument("--prompts", type=int, default=40, help="Prompts per run (default 40).")
    parser.add_argument("--batch-size", type=int, default=8, help="Prompts per forward (default 8).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1).")
    parser.add_argument("--repeats", type=int, default=3, help="Runs per process count, alternating (default 3).")
    parser.add_argument("--no-write", action="store_true", help="Print only; write no result file.")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    runs = {n: [] for n in args.processes}
    for _ in range(args.repeats):
        for n in args.processes:  # alternating: the machine is shared, so drift hits every count alike
            result = _run(n, args)
            runs[n].append(result)
            print(json.dumps(result), flush=True)
    summary = {}
    for n, results in runs.items():
        seconds = statistics.median(r["seconds"] for r in results)
        summary[str(n)] = {"median_seconds": seconds, "s_per_1000_prompts": 1000 * seconds / args.prompts,
                           "ms_per_prompt_token": 1000 * seconds / results[0]["prompt_tokens"],
                           "runs_seconds": [r["seconds"] for r in results]}
        print(f"{n} process(es) x {args.threads} thread(s): {summary[str(n)]['s_per_1000_prompts']:.1f} s per "
              f"1,000 prompts (median of {len(results)}; {summary[str(n)]['ms_per_prompt_token']:.2f} ms per prompt "
              "token)")
    if not args.no_write:
        first = runs[args.processes[0]][0]
        payload = {"prompts": args.prompts, "prompt_tokens": first["prompt_tokens"], "rows": first["rows"],
                   "shots": SHOTS, "batch_size": args.batch_size, "threads_per_process": args.threads,
                   "repeats": args.repeats, "by_processes": summary}
        print("wrote", write_result(args.model, "collect_throughput", payload, ["python", "-m",
                                    "benchmarks.cost.collect_throughput", *(argv or sys.argv[1:])]))


if __name__ == "__main__":
    main()
