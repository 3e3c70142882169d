"""The lm-evaluation-harness journey end to end: build the two example tasks, run the harness with `--model
adainfer` on the embedded SmolLM2 (the shipped classifier), and print the exit statistics it wrote.

    python examples/lm_eval/run.py --fv-dir ../shared/data/function_vectors [--limit 20] [--output-path runs/]

It writes the task data and a copy of the task YAMLs (pointing at that data) under `--output-path`, so it runs from
any directory. Needs the `eval` extra (`pip install -e '.[eval]'`).
"""

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fv-dir", required=True, help="the function-vectors task directory")
    p.add_argument("--limit", type=int, default=20, help="examples per task (default 20)")
    p.add_argument("--output-path", default="runs/lm_eval_example")
    args = p.parse_args(argv)
    from adainfer_hf.integrations.lm_eval import cli as harness
    from adainfer_hf.models.default_model import default_model_dir, shipped_classifier_dir

    sys.path.insert(0, str(HERE))  # build_data.py beside this script (an example, not a package)
    from build_data import build

    work = Path(args.output_path).resolve()
    build(Path(args.fv_dir), work / "data")
    tasks = work / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    for yaml in HERE.glob("*.yaml"):  # the same tasks, reading the data just built
        (tasks / yaml.name).write_text(yaml.read_text().replace("examples/lm_eval/data/", f"{work / 'data'}/"))
    status = harness.main([
        "--model", "adainfer", "--device", "cpu", "--batch_size", "8", "--include_path", str(tasks),
        "--model_args", f"pretrained={default_model_dir()},dtype=float32,exit_classifier={shipped_classifier_dir()}",
        "--tasks", "adainfer_fv_sentiment,adainfer_fv_present_past", "--limit", str(args.limit),
        "--output_path", str(work / "results")])
    if status != 0:
        raise SystemExit(status)
    (sidecar,) = sorted((work / "results").glob("*/adainfer_exit_stats_*.json"))[-1:]
    stats = json.loads(sidecar.read_text())
    print({task: round(s["mean_exit_layer"], 2) for task, s in stats["tasks"].items()})
    return stats


if __name__ == "__main__":
    main()
