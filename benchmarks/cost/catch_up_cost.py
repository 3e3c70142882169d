"""What the exact KV option's catch-up costs on this device: one decoder layer run for q positions at once.

With `exit_cache="exact"` a token that exits after layer k owes layers k+1..L; the next token that goes deeper
runs each owed layer for the owed positions and itself in one call (a query of q = owed + 1 positions). In a
memory-bound decode step that call costs about what one position costs, so the exit saved the owed layers; if the
device's matrix kernels get slower with every extra row, the catch-up costs as much as the layers saved. This
script times one real decoder layer (the first, no KV context: the projections and the MLP, which dominate a
decode step) at q = 1, 2, 3, 4 in rotation, and, for reference, the layer's largest matrix (the MLP's up
projection) through `F.linear` and as `W @ x.T`, the same product with the operands swapped.

    python -m benchmarks.cost.catch_up_cost --models smollm2 qwen2.5-0.5b gemma3-270m qwen2.5-1.5b

Prints a markdown table (times relative to q = 1; median of `--repeats` rounds) and writes
docs/results/models/catch_up_cost/<date>.json (stamped, `benchmarks.common.results`).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from adainfer_hf import AutoAdaInferForCausalLM
from adainfer_hf.architectures import core as arch
from benchmarks.common.real_models import model_dir
from benchmarks.common.results import MODELS, add_result_arguments, save_result

QUERIES = (1, 2, 3, 4)


def _rotation_medians(fns: dict, repeats: int, inner: int) -> dict:
    """Median seconds per call of each function, the functions called in rotation (each round times every one)."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - t0) / inner)
    return {name: statistics.median(ts) for name, ts in times.items()}


@torch.no_grad()
def layer_costs(model, repeats: int, inner: int) -> dict:
    """Seconds of one decoder layer at each query length, and of the up projection through both kernels."""
    layer = arch.spec_of(model).decoder_layers(model)[0]
    H = model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    calls = {}
    for q in QUERIES:
        hidden = torch.randn(1, q, H, generator=g)
        pos = torch.arange(q).unsqueeze(0)
        kwargs = {"position_ids": pos}
        pe = arch.spec_of(model).position_embeddings(model, hidden, pos)
        if pe is not None:
            kwargs["position_embeddings"] = pe
        calls[f"layer q={q}"] = lambda h=hidden, kw=kwargs: layer(h, attention_mask=None, **kw)
    weight = layer.mlp.up_proj.weight  # [intermediate, H] on every family measured here
    for q in (1, 2):
        x = torch.randn(q, H, generator=g)
        calls[f"linear q={q}"] = lambda x=x: F.linear(x, weight)
        calls[f"swapped q={q}"] = lambda x=x: (weight @ x.T).T
    return _rotation_medians(calls, repeats, inner)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["smollm2", "qwen2.5-0.5b", "gemma3-270m", "qwen2.5-1.5b"])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--inner", type=int, default=20, help="calls per timed sample")
    add_result_arguments(p)
    args = p.parse_args(argv)
    record = {"benchmark": "catch_up_cost", "threads": torch.get_num_threads(), "torch": torch.__version__,
              "repeats": args.repeats, "inner": args.inner, "models": {}}
    print("| model | one layer at q = 2 / 3 / 4 (x q = 1) | up projection q = 2 (x q = 1): F.linear / W @ x.T |")
    print("|---|---|---|")
    for key in args.models:
        model = AutoAdaInferForCausalLM.from_pretrained(model_dir(key), exit_classifier=None).eval()
        s = layer_costs(model, args.repeats, args.inner)
        record["models"][key] = s
        rel = " / ".join(f"{s[f'layer q={q}'] / s['layer q=1']:.2f}" for q in QUERIES[1:])
        print(f"| {key} | {rel} | {s['linear q=2'] / s['linear q=1']:.2f} / "
              f"{s['swapped q=2'] / s['swapped q=1']:.2f} |", flush=True)
        del model
    save_result(args, MODELS, "catch_up_cost", record, argv)


if __name__ == "__main__":
    main()
