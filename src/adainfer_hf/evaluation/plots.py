"""The evaluation's plots (matplotlib, an optional dependency imported when a plot is drawn), from `results.json`.

Per shots value: top-1 accuracy of the logit lens by layer, the exit features by layer, histograms of exit layers,
and accuracy against the FLOPs ratio (with the calibration sweep). `report.write_report` draws all four.
"""

from __future__ import annotations

import numpy as np

from .baselines import EVAL_METHODS, METHOD_LABELS

__all__ = ["plot_accuracy_vs_flops", "plot_exit_histograms", "plot_features", "plot_layer_curves"]


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
                       label=METHOD_LABELS.get(m, m))
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
    markers = dict(zip(EVAL_METHODS, "osD^vP", strict=True))
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
                       label=METHOD_LABELS.get(r["method"], r["method"]))
            top = max(top, r["accuracy"])
        ax.set_ylim(-0.02, max(0.1, 1.15 * max([top] + [p["accuracy"] for p in pts])))
        ax.set(title=f"{k}-shot (labels: calibration target)", xlabel="FLOPs ratio (paper's formula)",
               ylabel="top-1 accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
