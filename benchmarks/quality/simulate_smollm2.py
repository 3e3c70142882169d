"""Exits replayed on tasks the classifier never saw (SmolLM2-135M-Instruct): `adainfer train` on six
function-vectors tasks, calibrated at 0.99 and, from the same tables, at 0.9; `adainfer collect` on four other
tasks; then `adainfer simulate` of each calibrated classifier, of the 0.99 one uncalibrated (the paper's SVM: its
own `predict` at every layer) and of the paper's `gap > 0.8` rule.

    python -m benchmarks.quality.simulate_smollm2 --fv-dir ../shared/data/function_vectors

Nothing is timed: every figure is a count over the collected tables (agreement with the dense model's token,
mean exit layer, gold accuracy), so the run means the same on a loaded machine. The classifiers check after every
layer from their calibrated `min_layer` (`--check-cost none`, the paper's schedule), so the replay shows the
calibrated rule itself rather than a schedule chosen from this machine's timings. Writes
docs/results/smollm2/simulate/<date>.json (stamped).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from adainfer_hf import ExitClassifier, GapThresholdRule
from adainfer_hf.cli.main import main as adainfer
from adainfer_hf.training import FeatureTable
from adainfer_hf.training.calibrate import simulate_exits
from benchmarks.common.results import add_result_arguments, save_result, settings_of

TRAIN_TASKS = ("sentiment", "capitalize", "country-capital", "choose_first_of_5", "antonym", "english-french")
HELD_OUT_TASKS = ("landmark-country", "present-past", "choose_last_of_3", "person-sport")
GAP_THRESHOLD = 0.8


def task_files(fv_dir: Path, names) -> list[str]:
    """The function-vectors file of each task name (`abstractive/` or `extractive/`)."""
    out = []
    for name in names:
        found = [fv_dir / kind / f"{name}.json" for kind in ("abstractive", "extractive")]
        found = [p for p in found if p.is_file()]
        if not found:
            raise FileNotFoundError(f"task {name!r}: no {name}.json under {fv_dir}/abstractive or /extractive")
        out.append(str(found[0]))
    return out


def _figures(summary: dict) -> dict:
    keys = ("n", "agreement", "mean_exit_layer", "num_layers", "pruning_ratio", "gold_accuracy_dense",
            "gold_accuracy_exit")
    return {k: summary[k] for k in keys if k in summary}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fv-dir", required=True, type=Path, help="the function-vectors task directory")
    p.add_argument("--model", default="default", help="checkpoint (default: the embedded SmolLM2)")
    p.add_argument("--shots", type=int, nargs="+", default=[0, 5])
    p.add_argument("--limit", type=int, default=80, help="training examples per task and shots value (default 80)")
    p.add_argument("--held-out-limit", type=int, default=40,
                   help="held-out examples per task and shots value (default 40: 320 prompts)")
    p.add_argument("--targets", type=float, nargs="+", default=[0.99, 0.9])
    p.add_argument("--work-dir", default=None, help="where the tables and classifiers go (default: a temporary one)")
    add_result_arguments(p)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    shots = [str(k) for k in args.shots]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        tables, held_out = work / "tables", work / "held_out.npz"
        common = ["--model", args.model, "--shots", *shots, "--seed", "0", "--quiet"]
        classifiers = {}
        for i, target in enumerate(args.targets):
            out = work / f"classifier-{target:g}"
            data = (["--task-file", *task_files(args.fv_dir, TRAIN_TASKS), "--limit", str(args.limit),
                     "--tables-out", str(tables)] if i == 0 else ["--from-tables", str(tables)])
            status = adainfer(["train", *common, *data, "--method", "svm", "--target-agreement", str(target),
                               "--check-cost", "none", "--out", str(out)])
            if status:
                raise SystemExit(status)
            classifiers[f"calibrated@{target:g}"] = ExitClassifier.from_pretrained(out)
        status = adainfer(["collect", *common, "--task-file", *task_files(args.fv_dir, HELD_OUT_TASKS),
                           "--limit", str(args.held_out_limit), "--out", str(held_out)])
        if status:
            raise SystemExit(status)
        table = FeatureTable.load(held_out)
        first = classifiers[f"calibrated@{args.targets[0]:g}"]
        classifiers["uncalibrated"] = ExitClassifier(first.estimator, features=first.features, label=first.label)
        gap = GapThresholdRule(threshold=GAP_THRESHOLD).fit(np.zeros((1, 2)))
        classifiers[f"gap>{GAP_THRESHOLD:g}"] = ExitClassifier(gap, features=["gap", "top_prob"], label="final")
        rules = {}
        for name, clf in classifiers.items():
            _, summary = simulate_exits(clf, table)
            rules[name] = {**_figures(summary), "min_layer": clf.min_layer,
                           "per_task": {t: _figures(s) for t, s in summary["per_task"].items()}}
            print(f"{name}: agreement {summary['agreement']:.3f}, {summary['mean_exit_layer']:.2f} of "
                  f"{summary['num_layers']} layers, gold accuracy {summary.get('gold_accuracy_exit', float('nan')):.3f}"
                  f" (dense {summary.get('gold_accuracy_dense', float('nan')):.3f})")
    payload = {"benchmark": "simulate_smollm2", "train_tasks": list(TRAIN_TASKS),
               "held_out_tasks": list(HELD_OUT_TASKS), "held_out_prompts": table.num_prompts,
               "args": settings_of(args), "rules": rules}
    save_result(args, "smollm2", "simulate", payload, argv)
    return payload


if __name__ == "__main__":
    main()
