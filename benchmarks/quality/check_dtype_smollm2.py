"""Does a half-precision check head keep the calibration? The real SmolLM2-135M-Instruct on real prompts.

    python -m benchmarks.quality.check_dtype_smollm2 --task-file ../shared/data/function_vectors/abstractive/antonym.json ...

For each check dtype (the model's fp32, bfloat16, float16) the same prompts are collected through the model's exit
loop; then, against the fp32 rows:
  * how often the logit lens' top-1 token agrees (the token a fired check outputs), and the feature differences;
  * a logistic classifier trained and calibrated (target agreement with the dense answer, Learn-then-Test) on the
    same train / calibration / test split of examples (40/30/30), with each dtype's features: the agreement and
    mean layers achieved on the held-out test prompts; and the fp32-calibrated rule fed each dtype's features;
  * one check's measured cost in decoder layers at the prompts' median length (prefill) and for one token (decode).

Writes docs/results/smollm2/check_dtype/<date>.json (stamped).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from adainfer_hf.data.prompts import build_prompts, load_task, split_examples
from adainfer_hf.models.loading import load_adainfer_model
from adainfer_hf.training.calibrate import calibrate, simulate_exits
from adainfer_hf.training.check_cost import measure_check_cost
from adainfer_hf.training.collect import FeatureTable, collect_features
from adainfer_hf.training.train import train_exit_classifier
from benchmarks.common.results import add_result_arguments, save_result, settings_of

DTYPES = (None, "bfloat16", "float16")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task-file", action="append", required=True)
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--limit", type=int, default=40, help="prompts per task")
    p.add_argument("--targets", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.5],
                   help="calibration target agreements")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tables-dir", default=None, help="keep the collected tables here and reuse them next time")
    add_result_arguments(p)
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    from adainfer_hf.models.default_model import default_model_dir

    path = default_model_dir()
    model = load_adainfer_model(path)
    tok = AutoTokenizer.from_pretrained(path)
    prompts = [pr for f in args.task_file for pr in build_prompts(load_task(f), args.shots, args.limit, seed=0)]
    keys = sorted({(pr.task, pr.index) for pr in prompts})
    train_keys, calib_keys = (set(part) for part in split_examples(keys, [0.4, 0.3], seed=0))
    part = np.array([0 if (pr.task, pr.index) in train_keys else 1 if (pr.task, pr.index) in calib_keys else 2
                     for pr in prompts])
    median_len = int(np.median([len(tok(pr.text).input_ids) for pr in prompts]))
    tables = {}
    for d in DTYPES:
        path = Path(args.tables_dir) / f"{d or 'float32'}.npz" if args.tables_dir else None
        if path is not None and path.is_file():
            tables[d] = FeatureTable.load(path)
            continue
        tables[d] = collect_features(model, tok, prompts, features=("gap", "top_prob"), batch_size=args.batch_size,
                                     check_dtype=d)
        if path is not None:
            tables[d].save(path)
    ref = tables[None]
    out = {"prompts": len(prompts), "median_length": median_len, "dtypes": {}}
    print(f"{len(prompts)} prompts ({len(args.task_file)} tasks, {args.shots}-shot), median length {median_len}")
    splits = {d: [t.select_prompts(np.flatnonzero(part == i)) for i in range(3)] for d, t in tables.items()}
    fp32_clfs = {}
    for d, table in tables.items():
        name = d or "float32"
        row = {
            "top1_agreement_with_fp32": float((table.top_token == ref.top_token).mean()),
            "max_abs_diff_top_prob": float(np.abs(table.X[:, 1] - ref.X[:, 1]).max()),
            "mean_abs_diff_top_prob": float(np.abs(table.X[:, 1] - ref.X[:, 1]).mean()),
            "max_abs_diff_gap": float(np.abs(table.X[:, 0] - ref.X[:, 0]).max()),
            "check_cost_prefill": measure_check_cost(model, seq_len=median_len, check_dtype=d),
            "check_cost_decode": measure_check_cost(model, phase="decode", check_dtype=d),
            "targets": {},
        }
        print(f"{name:9} top-1 = fp32's on {row['top1_agreement_with_fp32']:.4f} of rows; |d top_prob| max "
              f"{row['max_abs_diff_top_prob']:.4f}, mean {row['mean_abs_diff_top_prob']:.5f}; one check = "
              f"{row['check_cost_prefill']:.2f} layers (prefill {median_len}), {row['check_cost_decode']:.2f} (decode)")
        train, calib, test = splits[d]
        for target in args.targets:
            clf = calibrate(train_exit_classifier(train, method="logistic"), calib, target_agreement=target)
            _, own = simulate_exits(clf, test)
            if d is None:
                fp32_clfs[target] = clf
            _, transfer = simulate_exits(fp32_clfs[target], test)  # fp32-calibrated rule fed this dtype's features
            rule = fp32_clfs[target]
            checked = np.isin(table.layer, rule.layers_to_check(int(table.num_layers.max())))  # rows it decides on
            flips = (rule.exit_mask(table.columns(rule.features)) != rule.exit_mask(ref.columns(rule.features)))
            flips = flips[checked]
            row["targets"][target] = {
                "never_exit": clf.calibration["never_exit"], "test_agreement": own["agreement"],
                "test_mean_layers": own["mean_exit_layer"], "fp32_rule_test_agreement": transfer["agreement"],
                "fp32_rule_test_mean_layers": transfer["mean_exit_layer"],
                "fp32_rule_decision_flips": int(flips.sum()), "rows": int(flips.size),
            }
            print(f"    target {target}: calibrated on {name}: test agreement {own['agreement']:.3f} at "
                  f"{own['mean_exit_layer']:.2f}/30 layers; the fp32-calibrated rule on {name} features: "
                  f"{transfer['agreement']:.3f} at {transfer['mean_exit_layer']:.2f}/30, its decision flips on "
                  f"{int(flips.sum())} of the {flips.size} rows it checks (all prompts)")
        out["dtypes"][name] = row
    save_result(args, "smollm2", "check_dtype", {**out, "args": settings_of(args)}, argv)


if __name__ == "__main__":
    main()
