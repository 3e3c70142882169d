"""The README's cross-model tables (the paper's Table 2 shape) from the runs of eval_real.sh and gate_real.py.

    python -m benchmarks.paper.paper_table [--keys smollm2 qwen2.5-0.5b gemma3-270m qwen2.5-1.5b] [--plot docs/results/models.png]

Reads the newest docs/results/<key>/eval/<date>/results.json (eval at the 0.99 classifier),
docs/results/<key>/eval/<date>-0.95/results.json (the 0.95 classifier) and docs/results/<key>/gate/<date>.json (full vs gated checks); a model without a run is skipped
with a note. Prints markdown tables and writes one plot: pruning ratio per model, AdaInfer at each target beside
the oracle ceiling.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from adainfer_hf.utils.results import newest_result, read_result

KEYS = ("smollm2", "qwen2.5-0.5b", "gemma3-270m", "qwen2.5-1.5b")
NAMES = {"smollm2": "SmolLM2-135M", "qwen2.5-0.5b": "Qwen2.5-Coder-0.5B", "gemma3-270m": "Gemma-3-270M",
         "qwen2.5-1.5b": "Qwen2.5-Coder-1.5B"}


def _summary(path: Path) -> dict:
    data = read_result(path)[1]
    return {row["method"]: row for row in data["summary"] if row["task"] == "all"}, data


def _cell(row: dict | None, L: int, speed: bool = True) -> str:
    if row is None:
        return "-"
    text = f"{100 * row['accuracy']:.1f} / {row['mean_layers']:.1f} ({100 * row['pruning_ratio']:.0f}%)"
    return text + (f" / {row['speedup']:.2f}x" if speed else "")


def load(root: Path, key: str):
    """The newest eval reports of `key` (docs/results/<key>/eval/<date>/ and <date>-0.95/) and its gate runs
    (docs/results/<key>/gate/<date>[-indist|-forced].json); None without an eval report."""
    s99_path = newest_result(key, "eval", root, filename="results.json")
    if s99_path is None:
        return None
    s99, data = _summary(s99_path)
    s95_path = newest_result(key, "eval", root, variant="0.95", filename="results.json")
    s95 = _summary(s95_path)[0] if s95_path else {}
    gates = {}
    for name, variant in (("gate", ""), ("gate_indist", "indist"), ("gate_forced", "forced")):
        found = newest_result(key, "gate", root, variant=variant)
        if found:
            gates[name] = read_result(found)[1]
    return {"key": key, "L": data["num_layers"], "n": s99["dense"]["n"], "s99": s99, "s95": s95, "gates": gates,
            "command": data["config"].get("command")}


def runs_of(root: Path, keys=KEYS) -> list[dict]:
    """The eval runs of the models in `keys` that have one (see `load`)."""
    return [r for r in (load(root, k) for k in keys) if r is not None]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keys", nargs="+", default=list(KEYS))
    p.add_argument("--root", default="docs/results")
    p.add_argument("--plot", default=None, help="default: docs/results/models/paper_table/<today>.png")
    p.add_argument("--section", default="all", choices=["all", "table2", "gates", "costs"],
                   help="print one group of tables only")
    args = p.parse_args(argv)
    show = {"table2", "gates", "costs"} if args.section == "all" else {args.section}
    runs = runs_of(Path(args.root), args.keys)
    missing = [k for k in args.keys if k not in {r["key"] for r in runs}]
    if "table2" in show:
        print(table2(runs))
    gated = [r for r in runs if r["gates"]]
    if gated and "gates" in show:
        print(gates_table(gated))
    if "costs" in show:
        print(costs_table(Path(args.root), args.keys))
    if missing:
        print(f"\n(no run yet for {', '.join(missing)})")
    if runs:
        import datetime

        plot = args.plot or f"{args.root}/models/paper_table/{datetime.date.today().isoformat()}.png"
        _plot(runs, plot)


def table2(runs) -> str:
    out = ["| model (L) | n | dense acc | AdaInfer @0.99 acc / layers (pruned) / speedup | AdaInfer @0.95 | "
           "gap>0.8 | CRF | ShortGPT | oracle acc / layers (pruned) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        s, L = r["s99"], r["L"]
        out.append(f"| {NAMES[r['key']]} ({L}) | {r['n']} | {100 * s['dense']['accuracy']:.1f} | "
              f"{_cell(s.get('adainfer'), L)} | {_cell(r['s95'].get('adainfer'), L)} | {_cell(s.get('gap'), L)} | "
              f"{_cell(s.get('crf'), L)} | {_cell(s.get('shortgpt'), L)} | {_cell(s.get('oracle'), L, speed=False)} |")
    out.append("")
    out.append("| model | FLOPs ratio (paper's formula) @0.99 / @0.95 / oracle | accuracy change @0.99 / @0.95 (points) |")
    out.append("|---|---|---|")
    for r in runs:
        s, s95 = r["s99"], r["s95"]
        dense = s["dense"]["accuracy"]
        a99, a95 = s.get("adainfer"), s95.get("adainfer")
        flops = " / ".join(f"{x['flops_ratio']:.3f}" if x else "-" for x in (a99, a95, s.get("oracle")))
        change = " / ".join(f"{100 * (x['accuracy'] - dense):+.1f}" if x else "-" for x in (a99, a95))
        out.append(f"| {NAMES[r['key']]} | {flops} | {change} |")
    return "\n".join(out)


def gates_table(gated) -> str:
    out = ["| model | trained on | one check in decode: full / gated (layers) | classifier | first token: agreement "
           "/ layers / speedup | 64-token generation: agreement / layers per token / speedup |", "|---|---|---|---|---|---|"]
    for r in gated:
        for kind, g in r["gates"].items():
            where = "other examples of the same tasks" if kind == "gate_indist" else "ten other tasks"
            dec = next(c for c in g["check_costs"] if c["phase"] == "decode")
            for name, info in g["classifiers"].items():
                f, t = g["first_token"][name], g["generation"][name]
                # [] = no checks; None = every layer from min_layer (decode: as in prompts)
                stock = info["check_layers"] == [] and info["decode_check_layers"] in ([], None)
                note = " (no check scheduled: the stock code path, ratio = noise)" if stock else ""
                out.append(f"| {NAMES[r['key']]} | {where} | {dec['full_check_layers']:.2f} / {dec['gate_layers']:.4f} | "
                      f"{name} | {f['agreement']:.3f} / {f['mean_layers']:.2f} / {f['speedup_median']:.2f}x | "
                      f"{t['token_agreement']:.3f} / {t['mean_layers_per_token']:.2f} / "
                      f"{t['speedup_median']:.2f}x{note} |")
    return "\n".join(out)


def costs_table(root, keys) -> str:
    out = []
    costs = []
    for key in keys:
        for name in ("gate_costs", "gate"):
            path = newest_result(key, name, root)
            if path is not None:
                costs.append((key, read_result(path)[1]))
                break
    if costs:
        out.append("")
        out.append("| model | layers / vocab | phase | full check | gate | bf16 head | shortlist head (1,024) | "
              "rank-64 head |")
        out.append("|---|---|---|---|---|---|---|---|")
        for key, g in costs:
            for c in g["check_costs"]:
                tokens = "decode" if c["phase"] == "decode" else f"prefill {c['length']}"
                out.append(f"| {NAMES[key]} | {g['num_layers']} / {g['vocab_size']:,} | {tokens} | "
                      f"{c['full_check_layers']:.3f} | {c['gate_layers']:.4f} | {c['bf16_check_layers']:.3f} | "
                      f"{c['shortlist1024_layers']:.3f} | {c['lowrank64_layers']:.3f} |")
    return "\n".join(out)


def _plot(runs, plot):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.25
    for i, (label, pick) in enumerate((("AdaInfer @0.99", lambda r: r["s99"].get("adainfer")),
                                       ("AdaInfer @0.95", lambda r: r["s95"].get("adainfer")),
                                       ("oracle ceiling", lambda r: r["s99"].get("oracle")))):
        values = [100 * (pick(r) or {"pruning_ratio": 0.0})["pruning_ratio"] for r in runs]
        ax.bar([j + (i - 1) * width for j in range(len(runs))], values, width, label=label)
    ax.set_xticks(range(len(runs)), [NAMES[r["key"]] for r in runs], fontsize=8)
    ax.set_ylabel("layers pruned (%)")
    ax.set_title("First-token early exit on unseen tasks (5-shot)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(plot, dpi=120)
    print(f"\nwrote {plot}")


if __name__ == "__main__":
    main()
