"""Results people look at: `results.json` records, a Markdown table shaped like the paper's Table 2, and plots.

[`merge_shards`] adds the sums of evaluation shards (one per process under `accelerate launch`) and
[`finalize_results`] turns them into metrics; pooled means and variances are exact because only sums travel.
[`markdown_table`] and [`write_report`] read nothing but the finished `results.json` dictionary.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

__all__ = ["RESULT_KEYS", "finalize_results", "markdown_table", "merge_shards", "study_table", "write_report"]

RESULT_KEYS = ("task", "shots", "method", "accuracy", "exact_match", "mean_layers", "var_layers", "pruning_ratio",
               "flops_ratio", "seconds", "n")
_METHOD_ORDER = ("dense", "adainfer", "gap", "crf", "shortgpt", "oracle")
_LABELS = {"dense": "Dense", "adainfer": "AdaInfer", "gap": "gap>0.8", "crf": "CRF", "shortgpt": "ShortGPT",
           "oracle": "Oracle"}


# ---------------------------------------------------------------------------------------------------- sums
def _add(a, b):
    """Element-wise sum of two JSON-like sum structures (numbers, lists, dicts); keys starting with `_` are
    constants (the same in every shard) and keep `a`'s value."""
    if isinstance(a, dict):
        return {**b, **{k: v if k.startswith("_") or k not in b else _add(v, b[k]) for k, v in a.items()}}
    if isinstance(a, list):
        return [_add(x, y) for x, y in zip(a, b, strict=True)]
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return a + b
    return a


def merge_shards(shards) -> dict:
    """Adds evaluation shards (`evaluate.evaluate_prompts` outputs) of disjoint prompt sets into one.

    Args:
        shards (`Sequence[dict]`): shards of the same model (same `num_layers`).
    """
    shards = list(shards)
    if not shards:
        raise ValueError("merge_shards needs at least one shard; got none.")
    layers = {s["num_layers"] for s in shards}
    if len(layers) != 1:
        raise ValueError(f"Shards come from models with layer counts {sorted(layers)}; expected one model.")
    merged = {"num_layers": shards[0]["num_layers"]}
    for part in ("groups", "curves", "sweep"):
        acc: dict = {}
        for s in shards:
            for key, value in s.get(part, {}).items():
                acc[key] = _add(acc[key], value) if key in acc else value
        merged[part] = acc
    return merged


def _record(s: dict, L: int) -> dict:
    n = s["n"]
    mean = s["layers"] / n
    return {
        "accuracy": s["correct"] / n, "exact_match": s["em"] / s["em_n"] if s["em_n"] else None,
        "mean_layers": mean, "var_layers": max(0.0, s["layers_sq"] / n - mean * mean),
        "pruning_ratio": 1.0 - mean / L, "flops_ratio": s["flops"] / n, "seconds": s["seconds"], "n": int(n),
        "dense_seconds": s["dense_seconds"], "speedup": s["dense_seconds"] / s["seconds"] if s["seconds"] else None,
        "agreement_with_dense": s["agree"] / n, "flops_ratio_with_checks": s["flops_checks"] / n,
        "mean_checks": s["checks"] / n, "num_layers": L,
        "exit_histogram": {str(k): int(c) for k, c in enumerate(s["hist"]) if c},
    }


def _order(keys, task_order):
    tasks = list(dict.fromkeys([*(task_order or []), *sorted({k.split("\t")[0] for k in keys})]))
    def rank(key):
        task, shots, method = (key.split("\t") + ["", ""])[:3]
        m = _METHOD_ORDER.index(method) if method in _METHOD_ORDER else len(_METHOD_ORDER)
        return tasks.index(task), int(shots), m, method
    return sorted(keys, key=rank)


def finalize_results(shard: dict, model_name: str | None = None, methods_info: dict | None = None,
                     task_order=None, config: dict | None = None) -> dict:
    """The `results.json` dictionary of a (merged) shard.

    Returns:
        `dict` with `model`, `num_layers`, `methods` (how each method was built), `config`, `results` (one record
        per task x shots x method with `RESULT_KEYS` plus `dense_seconds`, `speedup`, `agreement_with_dense`,
        `flops_ratio_with_checks`, `mean_checks`, `exit_histogram`), `summary` (the same pooled over tasks, task
        `"all"`), `layer_curves` (per task x shots: logit-lens accuracy / agreement per layer, mean gap and
        top_prob per layer) and `calibration_sweep` (per shots and target, pooled over tasks).
    """
    L = shard["num_layers"]
    results, pooled = [], {}
    for key in _order(shard["groups"], task_order):
        task, shots, method = key.split("\t")
        s = shard["groups"][key]
        results.append({"task": task, "shots": int(shots), "method": method, **_record(s, L)})
        pk = f"all\t{shots}\t{method}"
        pooled[pk] = _add(pooled[pk], s) if pk in pooled else s
    summary = [{"task": "all", "shots": int(k.split("\t")[1]), "method": k.split("\t")[2], **_record(pooled[k], L)}
               for k in _order(pooled, ["all"])]
    curves = []
    for key in _order(shard["curves"], task_order):
        task, shots = key.split("\t")
        c, n = shard["curves"][key], shard["curves"][key]["n"]
        curves.append({"task": task, "shots": int(shots), "n": n,
                       "lens_accuracy": [v / n for v in c["lens_correct"]],
                       "lens_agreement": [v / n for v in c["lens_agree"]],
                       "mean_gap": [v / n for v in c["gap"]], "mean_top_prob": [v / n for v in c["top_prob"]]})
    sweep: dict = {}
    for key, s in shard["sweep"].items():
        _, shots, target = key.split("\t")
        sk = (int(shots), float(target))
        sweep[sk] = _add(sweep[sk], s) if sk in sweep else dict(s)
    calibration_sweep = [
        {"shots": shots, "target_agreement": target, "n": s["n"], "accuracy": s["correct"] / s["n"],
         "agreement_with_dense": s["agree"] / s["n"], "mean_layers": s["layers"] / s["n"],
         "flops_ratio": s["flops"] / s["n"], "threshold": s["_threshold"], "min_layer": s["_min_layer"],
         "never_exit": s["_never_exit"]}
        for (shots, target), s in sorted(sweep.items())]
    return {"model": model_name, "num_layers": L, "methods": methods_info or {}, "config": config or {},
            "results": results, "summary": summary, "layer_curves": curves, "calibration_sweep": calibration_sweep}


# ---------------------------------------------------------------------------------------------------- table
def _fmt(v, spec):
    return "–" if v is None else format(v, spec)


def markdown_table(results: dict) -> str:
    """A Markdown table shaped like the paper's Table 2, plus an exact-match / agreement table and notes.

    Rows are task / shots (and the pooled "all" rows); each method has a column group: top-1 accuracy, layers run
    (pruning ratio), the paper's FLOPs ratio, and wall-clock speedup over dense measured in the same run.
    """
    records = results["results"] + results.get("summary", [])
    methods = [m for m in _METHOD_ORDER if any(r["method"] == m for r in records)]
    methods += sorted({r["method"] for r in records} - set(methods))
    rows = list(dict.fromkeys((r["task"], r["shots"]) for r in records))
    by = {(r["task"], r["shots"], r["method"]): r for r in records}
    L = results.get("num_layers")
    head = ["Task", "Shots", "n"]
    for m in methods:
        label = _LABELS.get(m, m)
        head += [f"{label} Acc", f"{label} Layers (prune)", f"{label} FLOPs", f"{label} Speedup"]
    lines = [f"Model: `{results.get('model')}` ({L} layers). Acc = top-1 (first token = gold first token); "
             "Layers = mean layers run for the first token (pruning ratio); FLOPs = the paper's ratio "
             "(2l'(6h+s)+V)/(2L(6h+s)+V); Speedup = dense seconds / method seconds on the same batches, same run.",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    command = results.get("config", {}).get("command")
    if command:
        lines[1:1] = ["", f"Command: `{command}`"]
    for task, shots in rows:
        rs = [by.get((task, shots, m)) for m in methods]
        n = next((r["n"] for r in rs if r), 0)
        cells = [f"**{task}**" if task == "all" else task, str(shots), str(n)]
        for r in rs:
            if r is None:
                cells += ["–"] * 4
                continue
            cells += [f"{100 * r['accuracy']:.1f}", f"{r['mean_layers']:.1f} ({100 * r['pruning_ratio']:.0f}%)",
                      f"{r['flops_ratio']:.2f}", _fmt(r.get("speedup"), ".2f") + "×"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Exact match of the greedy answer (first line, stripped) and top-1 agreement with dense, %:", ""]
    head2 = ["Task", "Shots", *[f"{_LABELS.get(m, m)} EM / agree" for m in methods]]
    lines += ["| " + " | ".join(head2) + " |", "|" + "---|" * len(head2)]
    for task, shots in rows:
        cells = [f"**{task}**" if task == "all" else task, str(shots)]
        for m in methods:
            r = by.get((task, shots, m))
            em = None if r is None or r["exact_match"] is None else 100 * r["exact_match"]
            cells.append("–" if r is None else f"{_fmt(em, '.1f')} / {100 * r['agreement_with_dense']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    notes = results.get("methods", {})
    if notes:
        lines += ["", "Methods:"]
        for m, note in notes.items():
            if isinstance(note, dict):
                note = ", ".join(f"{k}={v}" for k, v in note.items() if k != "block_influence")
            lines.append(f"- **{_LABELS.get(m, m)}**: {note}")
    return "\n".join(lines) + "\n"


def study_table(study: dict) -> str:
    """A Markdown table of a generalization study (`study.generalization_study`'s output)."""
    head = ["Split", "Trained on", "Test task", "Shots", "Model", "n", "Dense acc", "Exit acc", "Agree", "Layers",
            "FLOPs"]
    lines = [f"Study `{study.get('study')}` ({study.get('method')}, target agreement {study.get('target_agreement')};"
             f" decisions {study.get('decisions')}).", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if study.get("command"):
        lines[1:1] = ["", f"Command: `{study['command']}`"]
    for r in study["results"]:
        lines.append("| " + " | ".join([
            r["split"], ", ".join(r["train_tasks"]), r["task"], str(r["shots"]), str(r["model"]), str(r["n"]),
            f"{100 * r['accuracy_dense']:.1f}", f"{100 * r['accuracy']:.1f}", f"{100 * r['agreement_with_dense']:.1f}",
            f"{r['mean_layers']:.1f}", f"{r['flops_ratio']:.2f}"]) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _shots_axes(plt, shots, rows=1, height=3.6):
    fig, axes = plt.subplots(rows, len(shots), figsize=(5.2 * len(shots), height * rows), squeeze=False)
    return fig, axes


def plot_layer_curves(results: dict, path) -> None:
    """The paper's Fig. 1: logit-lens top-1 accuracy (and agreement with the last layer) per layer and task."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator
    curves = results["layer_curves"]
    shots = sorted({c["shots"] for c in curves})
    fig, axes = _shots_axes(plt, shots, rows=2)
    for j, k in enumerate(shots):
        for c in (c for c in curves if c["shots"] == k):
            x = np.arange(1, len(c["lens_accuracy"]) + 1)
            axes[0, j].plot(x, c["lens_accuracy"], marker=".", label=f"{c['task']} (n={c['n']})")
            axes[1, j].plot(x, c["lens_agreement"], marker=".", label=c["task"])
        axes[0, j].set_title(f"{k}-shot: top-1 accuracy of the logit lens")
        axes[1, j].set_title(f"{k}-shot: top-1 agreement with the last layer")
        for ax in axes[:, j]:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("layer")
            ax.set_ylim(-0.03, 1.03)
            ax.grid(alpha=0.3)
        axes[0, j].legend(fontsize=7)
    fig.suptitle(f"{results.get('model')}: accuracy at each layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_features(results: dict, path) -> None:
    """The paper's Fig. 3: mean `gap` and `top_prob` of the logit lens per layer (pooled over tasks, and per task)."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator
    curves = results["layer_curves"]
    shots = sorted({c["shots"] for c in curves})
    fig, axes = _shots_axes(plt, shots)
    for j, k in enumerate(shots):
        ax, cs = axes[0, j], [c for c in curves if c["shots"] == k]
        w = np.array([c["n"] for c in cs], dtype=float)
        for name, color in (("mean_gap", "tab:blue"), ("mean_top_prob", "tab:orange")):
            vals = np.array([c[name] for c in cs])
            x = np.arange(1, vals.shape[1] + 1)
            for v in vals:
                ax.plot(x, v, color=color, alpha=0.15, lw=1)
            ax.plot(x, (vals * w[:, None]).sum(0) / w.sum(), color=color, lw=2.5, label=name[5:] + " (all tasks)")
        ax.axhline(0.8, color="gray", ls="--", lw=1, label="gap rule threshold 0.8")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(title=f"{k}-shot: features across layers (thin: per task)", xlabel="layer (1..L-1)", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_exit_histograms(results: dict, path, methods=("adainfer", "gap", "crf", "oracle")) -> None:
    """Exit-layer histogram of the first token per task (shots pooled), one step line per method."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator
    L = results["num_layers"]
    tasks = list(dict.fromkeys(r["task"] for r in results["results"]))
    cols = min(3, len(tasks))
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows), squeeze=False)
    for i, task in enumerate(tasks):
        ax = axes[i // cols, i % cols]
        width = 0.8 / len(methods)
        for j, m in enumerate(methods):
            hist = np.zeros(L + 1)
            for r in results["results"]:
                if r["task"] == task and r["method"] == m:
                    for k, c in r["exit_histogram"].items():
                        hist[int(k)] += c
            if hist.sum():  # side-by-side bars: methods exiting at the same layer stay visible
                ax.bar(np.arange(1, L + 1) + (j - (len(methods) - 1) / 2) * width, hist[1:], width=width,
                       label=_LABELS.get(m, m))
        ax.set(title=task, xlabel="exit layer", ylabel="prompts", xlim=(0.5, L + 0.5))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for j in range(len(tasks), rows * cols):
        axes[j // cols, j % cols].axis("off")
    fig.suptitle("Exit layer of the first token (shots pooled)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy_vs_flops(results: dict, path) -> None:
    """Top-1 accuracy against the FLOPs ratio: the classifier re-calibrated at several agreement targets (line)
    and every evaluated method (markers), pooled over tasks, one panel per shots value."""
    plt = _plt()
    sweep, summary = results.get("calibration_sweep", []), results.get("summary", [])
    shots = sorted({r["shots"] for r in summary} | {s["shots"] for s in sweep})
    fig, axes = _shots_axes(plt, shots, height=4.2)
    markers = dict(zip(_METHOD_ORDER, "osD^vP", strict=True))
    for j, k in enumerate(shots):
        ax = axes[0, j]
        pts = sorted((s for s in sweep if s["shots"] == k), key=lambda p: (p["flops_ratio"], p["accuracy"]))
        if pts:
            x, y = [p["flops_ratio"] for p in pts], [p["accuracy"] for p in pts]
            ax.plot(x, y, "-", color="gray", lw=1, zorder=1)
            ax.scatter(x, y, color="gray", s=18, zorder=2, label="AdaInfer re-calibrated")
            labels: dict = {}  # targets landing on the same point share one label
            for p in pts:
                labels.setdefault((round(p["flops_ratio"], 3), round(p["accuracy"], 3)), []).append(
                    f"{p['target_agreement']:g}")
            for (fx, acc), names in labels.items():
                ax.annotate(",".join(names), (fx, acc), fontsize=7, xytext=(3, 3), textcoords="offset points")
        top = 0.0
        for r in (r for r in summary if r["shots"] == k):
            ax.scatter(r["flops_ratio"], r["accuracy"], marker=markers.get(r["method"], "x"), s=60, zorder=3,
                       label=_LABELS.get(r["method"], r["method"]))
            top = max(top, r["accuracy"])
        ax.set_ylim(-0.02, max(0.1, 1.15 * max([top] + [p["accuracy"] for p in pts])))
        ax.set(title=f"{k}-shot (labels: calibration target)", xlabel="FLOPs ratio (paper's formula)",
               ylabel="top-1 accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Writes `results.md` (the tables), `results.json` and four PNG plots into `out_dir`.

    Returns:
        `dict[str, Path]`: name -> written file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"table": out / "results.md", "json": out / "results.json", "layer_accuracy": out / "layer_accuracy.png",
             "features": out / "features.png", "exit_histogram": out / "exit_histogram.png",
             "accuracy_vs_flops": out / "accuracy_vs_flops.png"}
    files["table"].write_text(markdown_table(results), encoding="utf-8")
    files["json"].write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    if results.get("layer_curves"):
        plot_layer_curves(results, files["layer_accuracy"])
        plot_features(results, files["features"])
    else:
        files.pop("layer_accuracy"), files.pop("features")
    plot_exit_histograms(results, files["exit_histogram"])
    plot_accuracy_vs_flops(results, files["accuracy_vs_flops"])
    return files
