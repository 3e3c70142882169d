"""lm-evaluation-harness on the embedded SmolLM2-135M-Instruct: `--model hf` beside `--model adainfer` with the
shipped classifier, the shipped classifier checked after every layer from its `min_layer`, and the paper's
`gap > 0.8` rule, on the two tasks of examples/lm_eval/ (sentiment as multiple choice, present-past generated).

    python -m benchmarks.quality.lm_eval_smollm2 --fv-dir ../shared/data/function_vectors [--limit 100]

The harness's metrics (accuracy / exact match with their standard errors) and the exit statistics it reports
(mean exit layer per task, the paper's FLOPs ratio over all requests) are recorded; the model seconds are not a
speed measurement and are left out. Writes docs/results/smollm2/lm_eval/<date>.json (stamped). Needs the `eval`
extra.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
from pathlib import Path

import numpy as np
import torch

from adainfer_hf import AutoAdaInferForCausalLM, ExitClassifier, GapThresholdRule
from adainfer_hf.models.default_model import default_model_dir, shipped_classifier_dir
from benchmarks.common.results import add_result_arguments, save_result, settings_of

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lm_eval"
TASKS = ("adainfer_fv_sentiment", "adainfer_fv_present_past")
RUNS = ("hf", "shipped", "shipped-every-layer", "gap>0.8")


def _build_tasks(fv_dir: Path, work: Path) -> Path:
    """The example's task data built under `work/data` and its YAMLs copied to `work/tasks`, reading that data."""
    spec = importlib.util.spec_from_file_location("lm_eval_build_data", EXAMPLE / "build_data.py")
    build_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_data)
    build_data.build(fv_dir, work / "data")
    tasks = work / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    for yaml in EXAMPLE.glob("*.yaml"):
        (tasks / yaml.name).write_text(yaml.read_text().replace("examples/lm_eval/data/", f"{work / 'data'}/"))
    return tasks


def _classifiers(work: Path) -> dict[str, str]:
    """The classifier directory of each `--model adainfer` run."""
    shipped = ExitClassifier.from_pretrained(shipped_classifier_dir())
    every = work / "shipped_every_layer"
    shipped.replace(check_layers=None, decode_check_layers=None).save_pretrained(every)
    gap = work / "gap_rule"
    rule = GapThresholdRule(threshold=0.8).fit(np.zeros((1, 2)))
    model = AutoAdaInferForCausalLM.from_pretrained(default_model_dir(), exit_classifier=None)
    ExitClassifier(rule).bind(model).save_pretrained(gap)  # bound: the model's identity, as the shipped one has
    return {"shipped": str(shipped_classifier_dir()), "shipped-every-layer": str(every), "gap>0.8": str(gap)}


def _metrics(results: dict) -> dict:
    """`{task: {metric: value}}` of a harness result (numbers only: `acc`, `acc_stderr`, `exact_match`, ...)."""
    out = {}
    for task in TASKS:
        row = results["results"].get(task, {})
        out[task] = {k.split(",", 1)[0]: v for k, v in row.items() if isinstance(v, (int, float))
                     and not isinstance(v, bool)}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fv-dir", required=True, type=Path, help="the function-vectors task directory")
    p.add_argument("--limit", type=int, default=100, help="examples per task (default 100)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    add_result_arguments(p)
    args = p.parse_args(argv)
    import lm_eval
    from lm_eval.tasks import TaskManager

    import adainfer_hf.integrations.lm_eval  # noqa: F401  (registers `--model adainfer`)

    torch.set_num_threads(1)
    model = default_model_dir()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tasks = TaskManager(include_path=str(_build_tasks(args.fv_dir, work)))
        classifiers = _classifiers(work)
        for run in args.runs:
            model_type = "hf" if run == "hf" else "adainfer"
            model_args = f"pretrained={model},dtype=float32"
            if run != "hf":
                model_args += f",exit_classifier={classifiers[run]}"
            results = lm_eval.simple_evaluate(model=model_type, model_args=model_args, tasks=list(TASKS),
                                              limit=args.limit, batch_size=args.batch_size, device="cpu",
                                              task_manager=tasks)
            stats = results["config"].get("adainfer_exit_stats")
            runs[run] = {"model": model_type, "metrics": _metrics(results)}
            if stats is not None:
                keep = ("requests", "decisions", "mean_exit_layer", "pruning_ratio", "flops_ratio", "exit_histogram")
                runs[run]["exits"] = {name: {k: s.get(k) for k in keep}
                                      for name, s in [*stats["tasks"].items(), ("all", stats["all"])]}
                runs[run]["num_layers"] = stats["num_layers"]
            print(run, runs[run]["metrics"], {t: (s or {}).get("mean_exit_layer")
                                              for t, s in runs[run].get("exits", {}).items()})
    payload = {"benchmark": "lm_eval_smollm2", "tasks": list(TASKS), "limit": args.limit,
               "lm_eval": lm_eval.__version__, "args": settings_of(args), "runs": runs}
    save_result(args, "smollm2", "lm_eval", payload, argv)
    return payload


if __name__ == "__main__":
    main()
