"""Full vs gated exit checks on a GPU, fp16, random weights shaped like Llama-2-7B and Llama-3-8B.

    python -m benchmarks.cost.gpu_gate                      # on a CUDA device: both shapes, writes docs/results/models/gpu_gate/<date>.json
    python -m benchmarks.cost.gpu_gate --tiny --device cpu  # a seconds-long dry run of the same code on a tiny shape
                                                            # (written as <date>-tiny.json; --no-write: print only)

No checkpoint is needed (weights are random, so no exit is meaningful: this measures cost, not savings):

1. one check in decoder layers (`training.check_cost`): the full check (final norm + LM head over the vocabulary +
   top-2, one host copy) and the gate alone (a probe on the hidden state, one host copy), at prefill lengths
   64/256/1024 and in a single-token decode step;
2. the overhead of checking where nothing can be saved, in decode, batch 1: a decode step (KV cache of 256 tokens)
   of the stock forward (the AdaInfer class without a policy runs the stock code path) against the AdaInfer model checking after every layer with a classifier that never fires,
   (a) with full checks, (b) behind a gate that never passes; medians of alternating repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from transformers import DynamicCache, LlamaConfig

from adainfer_hf import AdaInferLlamaForCausalLM, ExitClassifier, GapThresholdRule
from adainfer_hf.policy.gate import LinearGate
from adainfer_hf.training.check_cost import measure_check_cost, measure_gate_cost
from benchmarks.common.results import MODELS, add_result_arguments, save_result

SHAPES = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000),
}


def build(shape: str, device: str, dtype: torch.dtype):
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096)
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # built and initialised on the device (random weights, real rotary buffers)
            model = AdaInferLlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def never_firing(num_layers: int, hidden_size: int, gate: bool):
    """A classifier that checks after every layer and never fires; with `gate`, behind a gate that never passes."""
    rule = GapThresholdRule(threshold=2.0).fit(np.zeros((1, 2)))  # gap <= 1 < 2: never
    g = None
    if gate:
        k = num_layers - 1
        g = LinearGate(range(1, num_layers), np.zeros((k, hidden_size), np.float32), np.zeros(k), np.full(k, np.inf))
    return ExitClassifier(rule, features=("gap", "top_prob"), min_layer=1, gate=g)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def decode_overhead(model, device, repeats: int, past: int = 256):
    L, H = model.config.num_hidden_layers, model.config.hidden_size
    policies = {"full checks": never_firing(L, H, gate=False), "gated checks": never_firing(L, H, gate=True)}
    ids = torch.randint(0, model.config.vocab_size, (1, past), device=device)
    step = torch.randint(0, model.config.vocab_size, (1, 1), device=device)
    mask = torch.ones(1, past + 1, dtype=torch.long, device=device)

    def one(policy):
        cache = DynamicCache()
        model(ids, use_cache=True, past_key_values=cache)  # fill outside the timing
        sync(device)
        t0 = time.perf_counter()
        model(step, attention_mask=mask, past_key_values=cache, use_cache=True, exit_policy=policy)
        sync(device)
        return time.perf_counter() - t0

    times = {"stock": [], **{k: [] for k in policies}}
    for _ in range(repeats):
        for name in times:
            times[name].append(one(None if name == "stock" else policies[name]))
    stock = statistics.median(times["stock"])
    return {name: {"median_s": statistics.median(t), "vs_stock": statistics.median(t) / stock}
            for name, t in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="llama-2-7b,llama-3-8b")
    p.add_argument("--tiny", action="store_true", help="the tiny shape only (a dry run)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--repeats", type=int, default=21)
    add_result_arguments(p)
    args = p.parse_args(argv)
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    shapes = ["tiny"] if args.tiny else args.shapes.split(",")
    record = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
              "dtype": str(dtype), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "shapes": {}}
    for shape in shapes:
        model = build(shape, args.device, dtype)
        L, H = model.config.num_hidden_layers, model.config.hidden_size
        gate = never_firing(L, H, gate=True).gate
        costs = []
        for phase, length in (("prefill", 64), ("prefill", 256), ("prefill", 1024), ("decode", 256)):
            costs.append({"phase": phase, "tokens": length if phase == "prefill" else 1,
                          "full_check_layers": measure_check_cost(model, seq_len=length, phase=phase,
                                                                  repeats=args.repeats),
                          "gate_layers": measure_gate_cost(model, gate, seq_len=length, phase=phase,
                                                           repeats=args.repeats)})
        record["shapes"][shape] = {"config": SHAPES[shape], "check_costs": costs,
                                   "decode_overhead": decode_overhead(model, args.device, args.repeats)}
        print(f"{shape} on {record['device']} ({dtype}):")
        for c in costs:
            print(f"  {c['phase']:7s} {c['tokens']:5d} tokens: full check {c['full_check_layers']:.3f} layers, "
                  f"gate {c['gate_layers']:.4f} layers")
        for name, r in record["shapes"][shape]["decode_overhead"].items():
            print(f"  decode step, {name}: {r['median_s'] * 1e3:.2f} ms ({r['vs_stock']:.3f}x stock)")
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    save_result(args, MODELS, "gpu_gate", record, argv, variant="tiny" if args.tiny else None)


if __name__ == "__main__":
    main()
