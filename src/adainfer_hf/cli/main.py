"""The `adainfer` command line: a thin layer over the library API (`python -m adainfer_hf` works too).

Subcommands: `collect` (feature table), `train` (collect, train, calibrate, save an artifact; `cli.train`), `simulate`
(replay a classifier on a collected table), `push` / `pull` (Hugging Face Hub), `demo` (early exit on the
embedded model), `doctor` (contract checks of the installed transformers), `eval`, `lm-eval`
(lm-evaluation-harness with `--model adainfer`). Artifacts, tables and results are written to a temporary name and
renamed (`utils.atomic`), so Ctrl-C never leaves half of one.
"""

from __future__ import annotations

import argparse
import json

import torch

from ..data.builtin_tasks import builtin_task, builtin_task_names
from ..doctor import main as doctor_main
from ..estimators.rules import GapThresholdRule
from ..models.default_model import shipped_classifier_dir
from ..policy.classifier import ExitClassifier
from ..policy.features import FEATURES
from ..training.calibrate import simulate_exits
from ..training.collect import collect_features
from ..training.config import CalibrationConfig, TrainingConfig
from ..training.table import FeatureTable
from ..training.train import train_and_calibrate
from ..utils.atomic import atomic_file
from ..utils.distributed import launch_state, place_replica
from ..utils.tokenizers import left_padding
from .args import UsageError, add_debug_flag, fraction, int_at_least, run_command
from .common import (
    add_data_args,
    add_model_arg,
    add_run_args,
    figures_line,
    load_dense_model,
    prompts_from,
    tasks_from_args,
)
from .demo_lossless import drafting_classifier, lossless_demo
from .eval import add_eval_parser
from .harness import add_lm_eval_parser
from .train import add_train_parser

__all__ = ["UsageError", "build_parser", "main"]

DEMO_SHOTS = 5
DEMO_TRAIN_LIMIT = 24  # prompts per built-in task and shots value when the demo trains in-process


# ---------------------------------------------------------------------------------------------------- commands
def _cmd_collect(args) -> int:
    state = launch_state()  # under `accelerate launch`: each process collects its share, the main one writes
    model, tok = load_dense_model(args.model)
    place_replica(model, state)
    prompts = prompts_from(tasks_from_args(args), args.shots, args.limit, args.seed)
    run = dict(features=args.features, batch_size=args.batch_size, progress=not args.quiet,
               check_dtype=args.check_dtype, distributed=state.num_processes > 1)
    table = collect_features(model, tok, prompts, **run)
    if table is None:  # another process's share, merged on the main process
        return 0
    table.save(args.out)
    if args.csv:
        table.to_csv(args.csv)
    print(f"wrote {len(table)} rows ({table.num_prompts} prompts, {table.X.shape[1]} features) to {args.out}")
    return 0


def _cmd_simulate(args) -> int:
    clf = ExitClassifier.from_pretrained(args.classifier)
    if args.uncalibrated:  # the estimator's own `predict` at every layer, as the paper uses it
        clf = ExitClassifier(clf.estimator, features=clf.features, label=clf.label)
    _, summary = simulate_exits(clf, FeatureTable.load(args.table))
    print(
        f"{args.classifier}{' (uncalibrated)' if args.uncalibrated else ''} on {args.table}: {figures_line(summary)}"
    )
    for task, figures in summary["per_task"].items():
        print(f"  {task:<28} {figures_line(figures)}")
    if args.json:
        with atomic_file(args.json, "w", encoding="utf-8") as f:
            f.write(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return 0


def _cmd_push(args) -> int:
    clf = ExitClassifier.from_pretrained(args.directory)
    info = clf.push_to_hub(args.repo_id, private=args.private or None, revision=args.revision)
    print(f"pushed {args.directory} to {args.repo_id}" + (f" ({info})" if info is not None else ""))
    return 0


def _cmd_pull(args) -> int:
    trust = args.trust_remote_classifier
    clf = ExitClassifier.from_pretrained(args.repo_id, revision=args.revision, trust_remote_classifier=trust)
    clf.save_pretrained(args.directory)
    print(f"saved {args.repo_id} to {args.directory}")
    return 0


def _cmd_doctor(args) -> int:
    return doctor_main()


def _cmd_demo(args) -> int:
    model, tok = load_dense_model(args.model)
    shipped = shipped_classifier_dir() if args.model == "default" and not args.retrain else None
    source = args.classifier or shipped
    tasks = [builtin_task(n, seed=args.seed) for n in builtin_task_names()]
    if source is not None:
        clf = ExitClassifier.from_pretrained(source)
        print(f"exit classifier: {source}")
    else:
        why = "--retrain" if args.retrain else "no classifier is shipped for this model"
        print(f"{why}: training a logistic exit classifier on the built-in tasks (shots 0 and {DEMO_SHOTS})")
        prompts = prompts_from(tasks, (0, DEMO_SHOTS), args.train_limit, args.seed)
        config = TrainingConfig(method="logistic", seed=args.seed, batch_size=args.batch_size,
                                calibration=CalibrationConfig(target_agreement=args.target_agreement))
        clf, _, _ = train_and_calibrate(model, tok, prompts, config, progress=not args.quiet)
    model.exit_classifier = clf
    # Demo prompts come from another seed's split, so they are (mostly) not the ones the classifier saw.
    prompts = [prompts_from([t], (DEMO_SHOTS,), 1, args.seed + 1)[0] for t in tasks]
    gap_rule = ExitClassifier(GapThresholdRule(threshold=0.8).fit([[0.0, 0.0]])).bind(model)
    with left_padding(tok):
        enc = tok([p.text for p in prompts], return_tensors="pt", padding=True)
    unscheduled = clf.replace(check_layers=None)  # the same calibrated rule, checked after every layer from min_layer
    with torch.no_grad():
        dense, early, every, rule = [  # full depth, the classifier, the same without schedule, the paper's rule
            model(**enc, use_cache=False, logits_to_keep=1, **policy)
            for policy in ({"exit_policy": None}, {}, {"exit_policy": unscheduled}, {"exit_policy": gap_rule})
        ]
    L = int(dense.exit_layers[0])

    def cell(out, i) -> str:
        return f"{tok.decode([int(out.logits[i, -1].argmax())])!r} @ {int(out.exit_layers[i])}/{L}"

    print(f"\n{'task':<16} {'query':<22} {'gold':<8} {'dense':<10} {'early exit':<16} "
          f"{'same rule, every layer':<24} gap>0.8 rule (paper)")
    for i, p in enumerate(prompts):
        query = p.text.rsplit("Q: ", 1)[-1].split("\n")[0][:20]
        dense_tok = repr(tok.decode([int(dense.logits[i, -1].argmax())]))
        print(f"{p.task:<16} {query:<22} {p.answer[:8]:<8} {dense_tok:<10} {cell(early, i):<16} "
              f"{cell(every, i):<24} {cell(rule, i)}")

    def summary(out) -> str:
        agree = (out.logits[:, -1].argmax(-1) == dense.logits[:, -1].argmax(-1)).float().mean()
        return f"{out.exit_layers.float().mean():.2f}/{L} layers, {agree:.0%} agreement with dense"

    print(f"\nearly exit: {summary(early)}; same rule checked at every layer: {summary(every)}; "
          f"gap>0.8 rule: {summary(rule)}")
    figures = clf.calibration or {}
    if "conclusion" in figures:
        n, target = figures.get("n_prompts"), figures.get("target_agreement")
        print(f"calibration ({n} prompts, target {target}): {figures['conclusion']}")
    sched = figures.get("schedule")
    if sched and sched["check_layers"]:
        print(f"check schedule: after layers {sched['check_layers']} (a check costs {sched['check_cost_layers']:.2f} "
              f"layers; expected cost {sched['relative_cost']:.1%} of dense)")
    elif sched:
        print(f"check schedule: none. A check costs {sched['check_cost_layers']:.2f} decoder layers and the exits "
              "this rule can certify save less than the checks would cost, so the model runs exactly as the stock "
              "model (no check, no overhead); the 'every layer' column shows where the rule would exit.")
    if args.lossless_tokens:
        drafting, where = drafting_classifier(model, tok, args.drafting_classifier, args.model == "default", args.seed,
                                              args.quiet)
        lossless_demo(model, tok, drafting.bind(model), where, args.lossless_tokens, args.repeats)
    return 0


# ---------------------------------------------------------------------------------------------------- parser
# One flag per line or two reads better than the formatter's one keyword per line.
# fmt: off
def build_parser() -> argparse.ArgumentParser:
    """The `adainfer` argument parser (one subparser per command)."""
    parser = argparse.ArgumentParser(prog="adainfer", description="AdaInfer early exit for transformers models.")
    add_debug_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("collect", help="Collect per-layer exit features of prompts into a table (.npz).")
    add_data_args(p)
    p.add_argument("--features", nargs="+", default=list(FEATURES), choices=list(FEATURES),
                   help="Features to record (default: all).")
    p.add_argument("--out", required=True, help="Output .npz file (written atomically).")
    p.add_argument("--csv", help="Also write the table as CSV to this path.")
    p.set_defaults(func=_cmd_collect)

    add_train_parser(sub)

    p = sub.add_parser("simulate", help="Replay a classifier's exits on a collected table (no model needed).")
    p.add_argument("--classifier", required=True, help="Exit-classifier directory.")
    p.add_argument("--table", required=True, help="Feature table written by `adainfer collect`.")
    p.add_argument("--uncalibrated", action="store_true", help="Ignore the calibrated min_layer/threshold: exit "
                   "where the estimator predicts 1, at any layer (the paper's uncalibrated use).")
    p.add_argument("--json", help="Also write the figures as JSON to this path.")
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser("push", help="Upload an exit-classifier directory to the Hugging Face Hub.")
    p.add_argument("directory", help="Exit-classifier directory written by `adainfer train`.")
    p.add_argument("repo_id", help="Target Hub repository, 'namespace/name' (created if missing).")
    p.add_argument("--private", action="store_true", help="Create the repository as private.")
    p.add_argument("--revision", help="Branch to commit to.")
    p.set_defaults(func=_cmd_push)

    p = sub.add_parser("pull", help="Download an exit classifier from the Hub into a local directory.")
    p.add_argument("repo_id", help="Hub repository id (or a local artifact directory).")
    p.add_argument("directory", help="Where to save it.")
    p.add_argument("--revision", help="Branch, tag or commit.")
    p.add_argument("--trust-remote-classifier", action="store_true",
                   help="Allow unpickling a joblib-only artifact (pickles run code; only for repos you trust).")
    p.set_defaults(func=_cmd_pull)

    p = sub.add_parser("demo", help="Early exit on the embedded SmolLM2 with the shipped (or a fresh) classifier, then "
                       "its stock and lossless text side by side.")
    add_model_arg(p, default="default")
    p.add_argument("--classifier", help="Exit-classifier directory (default: the one shipped for the model).")
    p.add_argument("--retrain", action="store_true", help="Ignore the shipped classifier and train one now.")
    p.add_argument("--train-limit", type=int_at_least(1), default=DEMO_TRAIN_LIMIT,
                   help=f"Prompts per built-in task and shots value when training (default {DEMO_TRAIN_LIMIT}).")
    p.add_argument("--target-agreement", type=fraction(), default=0.99, help="Calibration target when training.")
    p.add_argument("--drafting-classifier", metavar="DIR", help="Drafting artifact of the lossless part (default: "
                   "the one shipped for the model; else one trained now on the shipped drafting prompts).")
    p.add_argument("--lossless-tokens", type=int_at_least(0), default=48, metavar="N", help="Tokens the stock and the "
                   "lossless generate produce side by side (default 48; 0 skips the lossless part).")
    p.add_argument("--repeats", type=int_at_least(1), default=3, help="Alternating timed runs of each (default 3).")
    add_run_args(p)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("doctor", help="Check this installation's transformers/accelerate/scikit-learn against the "
                                      "internals adainfer_hf relies on (tiny random models, seconds).")
    p.set_defaults(func=_cmd_doctor)

    add_eval_parser(sub)
    for command in sub.choices.values():
        add_debug_flag(command, top_level=False)
    add_lm_eval_parser(sub)  # after --debug: its arguments all go to the harness
    return parser
# fmt: on


def main(argv=None) -> int:
    """Entry point of `adainfer`; `argv` defaults to `sys.argv[1:]`. Returns the exit status: 2 with one `error: ...`
    line for a user error (`--debug`: its traceback), as argparse does for a malformed command line; 130 on Ctrl-C."""
    args = build_parser().parse_args(argv)
    if args.command == "eval":
        return run_command(args, lambda: args.func(args, argv))  # records the command line in results.json
    return run_command(args, lambda: args.func(args))
