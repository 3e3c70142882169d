"""Prompt-table collection throughput on the default SmolLM2, for 1 process or N under torchrun / accelerate.

    python benchmarks/collect_throughput.py --prompts 200
    python -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/collect_throughput.py --prompts 200

Prints (rank 0) one JSON line: processes, prompts, seconds, prompts per second, seconds per 1,000 prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
from transformers import AutoTokenizer

from adainfer_hf.data.builtin_tasks import builtin_task, builtin_task_names
from adainfer_hf.data.prompts import build_prompts
from adainfer_hf.models.auto import AutoAdaInferForCausalLM
from adainfer_hf.models.default_model import default_model_dir
from adainfer_hf.training.collect import collect_features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    path = default_model_dir()
    model = AutoAdaInferForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    prompts = []
    for name in builtin_task_names():
        prompts += build_prompts(builtin_task(name), 2, limit=args.prompts)
    prompts = prompts[: args.prompts]
    if distributed:
        dist.barrier()
    start = time.perf_counter()
    table = collect_features(model, tok, prompts, batch_size=args.batch_size, progress=False, distributed=distributed)
    if distributed:
        dist.barrier()
    seconds = time.perf_counter() - start
    if table is not None:
        n = dist.get_world_size() if distributed else 1
        print(json.dumps({"processes": n, "threads_per_process": torch.get_num_threads(), "prompts": len(prompts),
                          "rows": len(table.layer), "seconds": round(seconds, 2),
                          "prompts_per_s": round(len(prompts) / seconds, 2),
                          "s_per_1000_prompts": round(1000 * seconds / len(prompts), 1)}), flush=True)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
