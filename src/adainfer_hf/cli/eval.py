"""`adainfer eval`: paper-style evaluation from the command line, on one process or sharded with `accelerate launch`.

```
adainfer eval --model default --exit-classifier DIR --task-file a.json b.json --shots 0 5 --limit 20 \\
    --methods dense,adainfer,gap,crf,shortgpt,oracle --out results.json --report-dir docs/results
accelerate launch --multi_gpu --num_processes 2 -m adainfer_hf.cli.eval eval ...   # prompts split over processes
```

(`--multi_gpu` starts the processes with torchrun; on a machine without GPUs they join over gloo on the CPU.
accelerate's `--cpu` flag instead expects MPI, `mpirun` and a `--mpirun_hostfile`.)

Evaluated prompts are the first `--limit` examples of each task's evaluation pool (`data.build_prompts`); the next
`--calibration-limit` examples (disjoint) are the calibration prompts: the CRF is trained and calibrated on them when
no `--crf-classifier` is given, the adainfer classifier is re-calibrated on them for the accuracy-vs-FLOPs sweep, and
ShortGPT measures Block Influence on their text. Under `accelerate launch` every process builds these baselines
identically (same seed), evaluates its share of the prompts (`PartialState.split_between_processes`) and writes a
shard of sums; the main process merges the shards into one `results.json` (pooled means / variances, summed seconds).

`--study intra|inter|loto` runs a generalization study instead (see `adainfer_hf.evaluation.study`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from ..data.prompts import build_prompts
from ..evaluation.evaluate import EVAL_METHODS, SWEEP_TARGETS, evaluate_prompts, prepare_baselines
from ..evaluation.report import finalize_results, markdown_table, merge_shards, study_table, write_report
from ..evaluation.study import STUDY_MODES, generalization_study
from ..models.default_model import DEFAULT_MODEL_NAME
from ..policy.classifier import ExitClassifier
from ..utils.atomic import atomic_file
from ..utils.distributed import launch_state
from .args import UsageError, add_debug_flag, fraction, int_at_least, run_command
from .common import add_model_arg, add_run_args, add_task_args, load_dense_model, tasks_from_args

__all__ = ["add_eval_parser", "main", "run_eval"]


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Adds the `eval` subcommand to an `argparse` subparsers object; returns its parser."""
    p = subparsers.add_parser("eval", help="Evaluate early exit against dense and the baselines (paper Table 2).")
    add_model_arg(p)
    p.add_argument("--exit-classifier", help="Exit-classifier directory or Hub id (the 'adainfer' method).")
    add_task_args(p, limit=20)
    p.add_argument("--calibration-limit", type=int_at_least(1), default=None,
                   help="Held-out examples per task and shots for the CRF, the sweep and ShortGPT (default: --limit).")
    p.add_argument("--methods", default=",".join(EVAL_METHODS),
                   help=f"Comma-separated subset of {','.join(EVAL_METHODS)}.")
    p.add_argument("--shortgpt-layers", type=int_at_least(1), help="Layers ShortGPT removes (default: round(L/4)).")
    p.add_argument("--crf-classifier", help="A calibrated CRF classifier directory (default: trained on the "
                   "calibration prompts, calibrated to the adainfer classifier's target).")
    p.add_argument("--target-agreement", type=fraction(), help="CRF calibration target when trained here (default: the "
                   "adainfer classifier's recorded target, else 0.99).")
    p.add_argument("--sweep-targets", type=fraction(), nargs="*", default=list(SWEEP_TARGETS),
                   help="Agreement targets of the accuracy-vs-FLOPs re-calibration sweep (none: no sweep).")
    p.add_argument("--max-new-tokens", type=int_at_least(0), default=8,
                   help="Greedy tokens generated for exact match, stopping at a newline (0: skip; default 8).")
    p.add_argument("--timing-repeats", type=int_at_least(1), default=1,
                   help="Runs of each timed forward per batch; the fastest counts (default 1).")
    p.add_argument("--out", required=True, help="results.json path.")
    p.add_argument("--report-dir", help="Also write the Markdown table and PNG plots here.")
    p.add_argument("--study", choices=list(STUDY_MODES), help="Run a generalization study instead.")
    p.add_argument("--study-model", help="Second model for the inter-model transfer of --study.")
    p.add_argument("--study-method", default="svm", help="Classifier trained by --study (default: svm).")
    p.add_argument("--train-tasks", nargs="+", help="Training tasks of --study inter (default: first half).")
    add_run_args(p)
    p.set_defaults(func=run_eval)
    return p


def _write_json(path, data) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=1) + "\n")


def _run_study(args, model, tok, tasks, command: str) -> int:
    other = load_dense_model(args.study_model, "--study-model") if args.study_model else (None, None)
    results = generalization_study(model, tok, tasks, args.study, shots=args.shots, limit=args.limit,
                                   method=args.study_method, target_agreement=args.target_agreement or 0.99,
                                   train_tasks=args.train_tasks, other_model=other[0], other_tokenizer=other[1],
                                   seed=args.seed, batch_size=args.batch_size, progress=not args.quiet)
    results["command"] = command
    _write_json(args.out, results)
    table = study_table(results)
    if args.report_dir:
        Path(args.report_dir).mkdir(parents=True, exist_ok=True)
        with atomic_file(Path(args.report_dir) / f"study_{args.study}.md", "w", encoding="utf-8") as f:
            f.write(table)
    print(table)
    return 0


def run_eval(args, argv=None) -> int:
    """Runs `adainfer eval` with parsed arguments (see [`add_eval_parser`]); returns the exit status.

    `argv` (the command's arguments, for the record in results.json) defaults to `sys.argv[1:]`."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in EVAL_METHODS]
    if bad or not methods:
        raise UsageError(f"--methods {args.methods!r} has unknown names {bad}; expected from {list(EVAL_METHODS)}.")
    state = launch_state()  # under `accelerate launch`: gloo on the CPU when there is no accelerator
    model, tok = load_dense_model(args.model)
    model.to(state.device)
    tasks = tasks_from_args(args)
    command = "adainfer " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    if args.study:
        return _run_study(args, model, tok, tasks, command) if state.is_main_process else 0
    if "adainfer" in methods and not args.exit_classifier:
        raise UsageError("method 'adainfer' needs --exit-classifier DIR_OR_ID (or drop it from --methods).")
    clf = ExitClassifier.from_pretrained(args.exit_classifier) if args.exit_classifier else None
    crf = ExitClassifier.from_pretrained(args.crf_classifier) if args.crf_classifier else None
    n_cal = args.limit if args.calibration_limit is None else args.calibration_limit
    prompts, calibration = [], []
    for task in tasks:
        for k in args.shots:
            pool = build_prompts(task, k, limit=args.limit + n_cal, seed=args.seed)
            prompts += pool[: args.limit]
            calibration += pool[args.limit:]  # other examples than the evaluated ones: no leakage
    quiet = args.quiet or not state.is_main_process
    baselines = prepare_baselines(model, tok, calibration, methods=methods, exit_classifier=clf, crf_classifier=crf,
                                  shortgpt_layers=args.shortgpt_layers, target_agreement=args.target_agreement,
                                  sweep_targets=args.sweep_targets if clf is not None else (), seed=args.seed,
                                  batch_size=args.batch_size, progress=not quiet)
    with state.split_between_processes(prompts) as mine:
        shard = evaluate_prompts(model, tok, mine, baselines, methods=methods, batch_size=args.batch_size,
                                 max_new_tokens=args.max_new_tokens, timing_repeats=args.timing_repeats,
                                 progress=not quiet)
    out = Path(args.out)
    shard_path = out.with_name(f".{out.name}.shard-{state.process_index}-of-{state.num_processes}.json")
    _write_json(shard_path, shard)
    state.wait_for_everyone()
    if not state.is_main_process:
        return 0
    paths = [out.with_name(f".{out.name}.shard-{i}-of-{state.num_processes}.json") for i in range(state.num_processes)]
    merged = merge_shards(json.loads(p.read_text(encoding="utf-8")) for p in paths)
    config = {"command": command, "model": args.model, "exit_classifier": args.exit_classifier,
              "tasks": [t.name for t in tasks], "task_files": args.task_file, "shots": args.shots, "limit": args.limit, "calibration_limit": n_cal,
              "seed": args.seed, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
              "num_processes": state.num_processes, "device": str(state.device),
              "torch_threads": torch.get_num_threads(), "timing_repeats": args.timing_repeats,
              "timing": "first-token forward (prefill, use_cache=False), dense and methods interleaved per batch"}
    name = getattr(model.config, "_name_or_path", None) or args.model
    if args.model == "default":
        name = f"{DEFAULT_MODEL_NAME} (embedded GGUF Q4_1, dequantized to float32)"
    results = finalize_results(merged, model_name=name, methods_info=baselines.info,
                               task_order=[t.name for t in tasks], config=config)
    _write_json(out, results)
    for p in paths:
        p.unlink(missing_ok=True)
    if args.report_dir:
        write_report(results, args.report_dir)
    print(markdown_table(results))
    return 0


def main(argv=None) -> int:
    """Standalone entry point (`python -m adainfer_hf.cli.eval eval ...`), for use before `eval` is wired into
    `adainfer`; `argv` defaults to `sys.argv[1:]`."""
    parser = argparse.ArgumentParser(prog="adainfer")
    add_debug_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_debug_flag(add_eval_parser(sub), top_level=False)
    args = parser.parse_args(argv)
    return run_command(args, lambda: args.func(args, argv))


if __name__ == "__main__":
    sys.exit(main())
