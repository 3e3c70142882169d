"""What does a linear layer on a few rows cost on this CPU, in MKL's `linear` and in verification's product?

Lossless verification runs the owed draft positions and the current one through the deep layers and the LM head
at once: 2 to a few rows. This script times, for the real models' weight shapes (random fp32 weights of each
checkpoint's config, so no checkpoint is read), `torch.nn.functional.linear(x, W)` and
`architectures.few_rows.linear_few_rows(x, W)` (`W @ x.T`) on 1..`--rows` rows, alternating the two, and reports
the median milliseconds and each one's cost relative to `linear` on one row (what a stock decode step pays).

    python -m benchmarks.cost.few_rows [--threads 2] [--rows 1 2 3 4 5 8 16] [--repeats 15]

Writes docs/results/models/few_rows/<date>.json (`--out-root`, `--variant`, `--no-write`: print only).
"""

from __future__ import annotations

import argparse
import sys

import torch

from adainfer_hf.architectures.few_rows import MAX_FEW_ROWS, MIN_WEIGHT_ELEMENTS, linear_few_rows
from adainfer_hf.utils.timing import alternating_medians
from benchmarks.common.results import MODELS, add_result_arguments, save_result

# (model, weight name, out features, in features) from each checkpoint's config
SHAPES = (
    ("smollm2", "mlp.up_proj", 1536, 576), ("smollm2", "lm_head", 49152, 576),
    ("qwen2.5-0.5b", "mlp.up_proj", 4864, 896), ("qwen2.5-0.5b", "mlp.down_proj", 896, 4864),
    ("qwen2.5-0.5b", "lm_head", 151936, 896),
    ("gemma3-270m", "mlp.up_proj", 2048, 640), ("gemma3-270m", "lm_head", 262144, 640),
    ("qwen2.5-1.5b", "mlp.up_proj", 8960, 1536), ("qwen2.5-1.5b", "mlp.down_proj", 1536, 8960),
    ("qwen2.5-1.5b", "lm_head", 151936, 1536),
)


def measure(rows: list[int], repeats: int) -> list[dict]:
    out = []
    generator = torch.Generator().manual_seed(0)
    for model, name, n_out, n_in in SHAPES:
        weight = torch.randn(n_out, n_in, generator=generator)
        one = None
        for n in rows:
            x = torch.randn(1, n, n_in, generator=generator)
            seconds = alternating_medians({"linear": lambda x=x, w=weight: torch.nn.functional.linear(x, w),
                                           "product": lambda x=x, w=weight: linear_few_rows(x, w)},
                                          repeats, torch.device("cpu"), min_seconds=0.004)
            ms = {name: 1e3 * t for name, t in seconds.items()}
            one = ms["linear"] if n == 1 else one
            out.append({"model": model, "weight": name, "shape": [n_out, n_in], "rows": n,
                        "linear_ms": ms["linear"], "product_ms": ms["product"],
                        "linear_vs_one_row": ms["linear"] / one if one else None,
                        "product_vs_one_row": ms["product"] / one if one else None})
            print(f"{model:13s} {name:14s} rows {n:2d}: linear {ms['linear']:8.3f} ms, product {ms['product']:8.3f} "
                  f"ms" + (f" (x one row: {ms['linear'] / one:.2f} / {ms['product'] / one:.2f})" if one else ""),
                  flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.cost.few_rows", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 5, 8, 16])
    p.add_argument("--repeats", type=int, default=15)
    add_result_arguments(p)
    args = p.parse_args(argv)
    if args.rows[0] != 1 or any(n < 1 for n in args.rows):
        raise SystemExit(f"--rows must start at 1 (the reference) and hold positive counts; got {args.rows}.")
    torch.set_num_threads(args.threads)
    with torch.no_grad():
        rows = measure(args.rows, args.repeats)
    payload = {"threads": args.threads, "repeats": args.repeats, "rows": rows,
               "routing": {"max_few_rows": MAX_FEW_ROWS, "min_weight_elements": MIN_WEIGHT_ELEMENTS}}
    save_result(args, MODELS, "few_rows", payload, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
