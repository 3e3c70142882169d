"""Cost of the exit machinery and speed of early exit, stock vs AdaInfer in one process on the same inputs.

Each case alternates the compared models call by call, repeats, and reports medians and ratios:
  (a) overhead when the classifier never fires, for three check schedules: none (pure framework overhead),
      one check, and a check after every layer (the paper's schedule);
  (b) speedup when every row exits after layer k (scripted), against the ideal: a stock model cut to k layers
      (k layers + one LM head on the last token), the least any implementation must do. Two figures:
      "deferred" is what a user gets (the skipped layers' K/V are computed only if a later token runs them);
      "filled" also computes every skipped layer's K/V inside the timed call (`cache.materialize()`): the
      worst case, where later tokens need all of them.
Prefill is a generation prefill (KV cache built, logits of the last token only); decode is `--decode-steps` cached
single-token steps after an untimed prefill.

    python -m benchmarks.speed.bench_exit --shape smollm2 --lengths 64 256 1024 --batches 1 8
    python -m benchmarks.speed.bench_exit --shape llama2-7b --device cuda --dtype float16   # on a GPU

Writes docs/results/<shape or model>/bench_exit/<date>-<device>[-<dtype>].json (stamped, every sample kept).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from adainfer_hf import AdaInferLlamaForCausalLM, ExitPolicy, ScriptedExit
from adainfer_hf.compat import output_cache
from benchmarks.common.results import add_result_arguments, save_result, settings_of

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000),
    # SmolLM2-135M-Instruct's shape
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
}


class NeverFire(ExitPolicy):
    """Checks at the given layers (computing the logit lens and features) and never exits."""

    def __init__(self, check_layers):
        self.features = ("gap", "top_prob")
        self.min_layer = 1
        self.check_layers = tuple(check_layers)

    def decide(self, features, layer, rows, state=None):
        return torch.zeros(features.shape[0], dtype=torch.bool, device=features.device)


def build(shape: str, device: str, dtype: torch.dtype, model_dir: str | None):
    if model_dir:
        stock = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    else:
        torch.manual_seed(0)
        config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096)
        with torch.device(device):
            stock = LlamaForCausalLM(config).to(dtype).eval()
    ada = AdaInferLlamaForCausalLM(stock.config).to(device=device, dtype=dtype).eval()
    ada.load_state_dict(stock.state_dict(), assign=True)  # shares the weights
    return stock, ada


def truncated(stock, k: int):
    config = stock.config.__class__(**{**stock.config.to_dict(), "num_hidden_layers": k})
    config._attn_implementation = stock.config._attn_implementation
    with torch.device("meta"):
        model = stock.__class__(config)
    model.load_state_dict(stock.state_dict(), strict=False, assign=True)
    model.model.rotary_emb = stock.model.rotary_emb  # non-persistent buffers are not in the state dict
    return model.eval()


_SAMPLES: list[dict] = []  # every timed call's seconds, per case, for the JSON output


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_calls(fns: dict, repeats: int, device: str) -> dict:
    """Median seconds of each callable, calls alternated so drift hits all alike.

    Each timed call directly follows an untimed call of the same callable: otherwise a call after a smaller
    model's pays for re-growing the allocator's memory (page faults; on CPU this made the stock model, which
    always followed the 22-layer ideal, up to 37% slower at batch 8).
    """
    times = {name: [] for name in fns}
    for fn in fns.values():  # warm-up
        fn()
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate: no model always goes first
            fn = fns[name]
            fn()  # untimed: the same call's memory footprint, as in steady use
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    _SAMPLES.append(times)
    return {name: statistics.median(v) for name, v in times.items()}


def _materialize(cache) -> None:
    if hasattr(cache, "materialize"):
        cache.materialize()


@torch.no_grad()
def prefill_fn(model, ids, policy=None, fill=False):
    """One prefill; each model builds its own default cache, as `generate` or a plain forward does."""
    kw = {} if policy is None else {"exit_policy": policy}

    def run():
        out = model(ids, use_cache=True, logits_to_keep=1, **kw)
        if fill:
            _materialize(output_cache(out))

    return run


@torch.no_grad()
def decode_fn(model, ids, steps: int, policy=None, fill=False):
    """One call = `steps` cached single-token steps after an (untimed) prefill of `ids`."""
    kw = {} if policy is None else {"exit_policy": policy}
    state = {}

    def prepare():
        out = model(ids, use_cache=True, logits_to_keep=1, **kw)
        _materialize(output_cache(out))  # the prompt's owed K/V are not this measurement's
        state["cache"] = output_cache(out)

    def run():
        cache = state["cache"]
        tok = ids[:, -1:]
        for _ in range(steps):
            model(tok, use_cache=True, past_key_values=cache, logits_to_keep=1, **kw)
        if fill:
            _materialize(cache)

    return prepare, run


def bench_case(stock, ada, ids, phase, ks, repeats, steps, device):
    L = stock.config.num_hidden_layers
    policies = {
        "never:no_checks": NeverFire(()),
        "never:one_check": NeverFire((L // 2,)),
        "never:every_layer": NeverFire(range(1, L)),
    }
    policies.update({f"exit@{k}": ScriptedExit(k) for k in ks})
    models = {"stock": (stock, None, False)}
    models.update({name: (ada, pol, False) for name, pol in policies.items()})
    models.update({f"filled@{k}": (ada, ScriptedExit(k), True) for k in ks})
    models.update({f"ideal@{k}": (truncated(stock, k), None, False) for k in ks})
    if phase == "prefill":
        fns = {name: prefill_fn(m, ids, pol, fill) for name, (m, pol, fill) in models.items()}
    else:
        pairs = {name: decode_fn(m, ids, steps, pol, fill) for name, (m, pol, fill) in models.items()}

        fns = {}
        for name, (prepare, run) in pairs.items():
            fns[name] = _Timed(prepare, run)
    t = time_calls(fns, repeats, device) if phase == "prefill" else time_split(fns, repeats, device)
    rows = {"overhead": {}, "exit": {}}
    for name in policies:
        if name.startswith("never"):
            rows["overhead"][name.split(":")[1]] = t[name] / t["stock"] - 1
    for k in ks:
        speedup = t["stock"] / t[f"exit@{k}"]
        filled = t["stock"] / t[f"filled@{k}"]
        ideal = t["stock"] / t[f"ideal@{k}"]
        rows["exit"][k] = {"speedup": speedup, "ideal": ideal, "of_ideal": speedup / ideal,
                           "speedup_filled": filled, "of_ideal_filled": filled / ideal}
    return t, rows


class _Timed:
    """A decode measurement: `prepare` (untimed: fresh prefilled cache) then `run` (timed)."""

    def __init__(self, prepare, run):
        self.prepare, self.run = prepare, run


def time_split(fns: dict, repeats: int, device: str) -> dict:
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate: no model always goes first
            f = fns[name]
            f.prepare()
            sync(device)
            t0 = time.perf_counter()
            f.run()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    _SAMPLES.append(times)
    return {name: statistics.median(v) for name, v in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2", help="random-weight model shape")
    p.add_argument("--model", default=None, help="a real Llama checkpoint dir instead of random weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024], help="prefill lengths")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--decode-steps", type=int, default=16, help="cached steps per decode measurement")
    p.add_argument("--decode-context", type=int, default=64, help="prompt length before decoding")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--exit-fractions", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--phases", nargs="+", default=["prefill", "decode"], choices=["prefill", "decode"])
    p.add_argument("--max-tokens", type=int, default=None,
                   help="skip prefill cases whose batch x length exceeds this (CPU time)")
    add_result_arguments(p)
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    stock, ada = build(args.shape, args.device, dtype, args.model)
    L = stock.config.num_hidden_layers
    ks = sorted({max(1, round(f * L)) for f in args.exit_fractions})
    g = torch.Generator().manual_seed(0)
    results = []
    cases = [("prefill", n, b) for n in args.lengths for b in args.batches
             if "prefill" in args.phases and (args.max_tokens is None or n * b <= args.max_tokens)]
    cases += [("decode", args.decode_context, b) for b in args.batches if "decode" in args.phases]
    print(f"model {args.model or args.shape} L={L} device={args.device} dtype={args.dtype} "
          f"threads={torch.get_num_threads()} repeats={args.repeats}")
    print(f"{'phase':8}{'len':>6}{'batch':>6} | overhead never-fires: {'none':>7}{'one':>7}{'every':>8} | "
          + " ".join(f"exit@{k}: speedup/ideal (of ideal; filled)" for k in ks))
    for phase, n, b in cases:
        ids = torch.randint(10, stock.config.vocab_size, (b, n), generator=g).to(args.device)
        t, rows = bench_case(stock, ada, ids, phase, ks, args.repeats, args.decode_steps, args.device)
        o = rows["overhead"]
        line = f"{phase:8}{n:>6}{b:>6} | {'':22}{o['no_checks']:>+7.1%}{o['one_check']:>+7.1%}{o['every_layer']:>+8.1%} | "
        line += " ".join(f"{e['speedup']:.2f}x/{e['ideal']:.2f}x ({e['of_ideal']:.2f}; {e['of_ideal_filled']:.2f})"
                         for e in rows["exit"].values())
        print(line, flush=True)
        results.append({"phase": phase, "length": n, "batch": b, "seconds": t, "samples": _SAMPLES[-1], **rows})
    variant = args.device.split(":")[0] + ("" if args.dtype == "float32" else f"-{args.dtype}")
    save_result(args, Path(args.model).name if args.model else args.shape, "bench_exit",
                {"args": settings_of(args), "results": results}, argv, variant=variant)
    return results


if __name__ == "__main__":
    sys.exit(main() and 0)
