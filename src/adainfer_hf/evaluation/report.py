"""Results people look at: `results.json` records and a Markdown table shaped like the paper's Table 2 (the plots
are in `plots`; [`write_report`] writes both).

[`merge_shards`] adds the sums of evaluation shards (one per process under `accelerate launch`) and
[`finalize_results`] turns them into metrics; pooled means and variances are exact because only sums travel.
[`markdown_table`] and [`write_report`] read nothing but the finished `results.json` dictionary.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .baselines import EVAL_METHODS, METHOD_LABELS
from .plots import plot_accuracy_vs_flops, plot_exit_histograms, plot_features, plot_layer_curves

__all__ = ["RESULT_KEYS", "finalize_results", "markdown_table", "merge_shards", "study_table", "write_report"]

RESULT_KEYS = ("task", "shots", "method", "accuracy", "exact_match", "mean_layers", "var_layers", "pruning_ratio",
               "flops_ratio", "seconds", "n")


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
        m = EVAL_METHODS.index(method) if method in EVAL_METHODS else len(EVAL_METHODS)
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
    methods = [m for m in EVAL_METHODS if any(r["method"] == m for r in records)]
    methods += sorted({r["method"] for r in records} - set(methods))
    rows = list(dict.fromkeys((r["task"], r["shots"]) for r in records))
    by = {(r["task"], r["shots"], r["method"]): r for r in records}
    L = results.get("num_layers")
    head = ["Task", "Shots", "n"]
    for m in methods:
        label = METHOD_LABELS.get(m, m)
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
    head2 = ["Task", "Shots", *[f"{METHOD_LABELS.get(m, m)} EM / agree" for m in methods]]
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
            lines.append(f"- **{METHOD_LABELS.get(m, m)}**: {note}")
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
