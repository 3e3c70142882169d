"""What one exit check costs on each real model, in decoder layers: the full check (final norm + LM head over the
whole vocabulary + top-2) and a gate (`policy.gate.LinearGate`: RMS norm + one dot product), in single-token
decode steps and in prompts of 64/256/1024 tokens. Ratios of medians measured in one process.
Writes docs/results/models/check_cost_real/<date>.json (stamped) and prints a markdown table.

    python -m benchmarks.cost.check_cost_real --models smollm2 qwen2.5-0.5b gemma3-270m qwen2.5-1.5b
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from adainfer_hf import AutoAdaInferForCausalLM
from adainfer_hf.architectures import core as arch
from adainfer_hf.policy.gate import LinearGate
from adainfer_hf.training.check_cost import measure_check_cost
from benchmarks.common.real_models import model_dir
from benchmarks.common.results import MODELS, add_result_arguments, save_result


def _median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def gate_cost(model, repeats: int) -> float:
    """One gated check's gate (before any head) in decode, in decoder layers."""
    H = model.config.hidden_size
    rng = np.random.default_rng(0)
    gate = LinearGate([1], rng.normal(size=(1, H)), [0.0], [1e9])  # never passes: the gate's own cost only
    layer = arch.spec_of(model).decoder_layers(model)[0]
    hidden = torch.randn(1, 1, H)
    pos = torch.zeros(1, 1, dtype=torch.long)
    kw = {"position_ids": pos}
    pe = arch.spec_of(model).position_embeddings(model, hidden, pos)
    if pe is not None:
        kw["position_embeddings"] = pe
    t_gate = _median_seconds(lambda: bool(gate.passes(hidden[:, -1], 1).any()), repeats)
    t_layer = _median_seconds(lambda: layer(hidden, attention_mask=None, **kw), repeats)
    return t_gate / t_layer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["smollm2", "qwen2.5-0.5b", "gemma3-270m", "qwen2.5-1.5b"],
                   help="benchmarks/common/real_models.py keys.")
    p.add_argument("--lengths", nargs="+", type=int, default=[64, 256, 1024], help="Prompt lengths.")
    p.add_argument("--repeats", type=int, default=7, help="Timed repeats per measurement (medians).")
    add_result_arguments(p)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    results = []
    for key in args.models:
        model = AutoAdaInferForCausalLM.from_pretrained(model_dir(key), exit_classifier=None).eval()
        row = {"model": key, "num_layers": model.config.num_hidden_layers, "vocab": model.config.vocab_size,
               "hidden": model.config.hidden_size,
               "decode_full": measure_check_cost(model, phase="decode", repeats=args.repeats),
               "decode_gate": gate_cost(model, args.repeats)}
        for n in args.lengths:
            row[f"prefill{n}_full"] = measure_check_cost(model, seq_len=n, phase="prefill", repeats=args.repeats)
        results.append(row)
        print(json.dumps(row), flush=True)
        del model
    save_result(args, MODELS, "check_cost_real", {"benchmark": "check_cost_real", "repeats": args.repeats,
                                                  "threads": torch.get_num_threads(), "models": results}, argv)
    cols = ["decode_full", "decode_gate", *[f"prefill{n}_full" for n in args.lengths]]
    print("| model | layers | vocab | " + " | ".join(cols) + " |")
    for r in results:
        print(f"| {r['model']} | {r['num_layers']} | {r['vocab']} | " + " | ".join(f"{r[c]:.3g}" for c in cols) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
