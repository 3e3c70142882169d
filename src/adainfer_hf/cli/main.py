"""The `adainfer` command line: a thin layer over the library API (`python -m adainfer_hf` works too).

Subcommands: `collect` (feature table), `train` (collect, train, calibrate, save an artifact), `simulate`
(replay a classifier on a collected table), `push` / `pull` (Hugging Face Hub), `demo` (early exit on the
embedded model), `doctor` (contract checks of the installed transformers), `eval`, `lm-eval`
(lm-evaluation-harness with `--model adainfer`). Artifacts, tables and results are written to a temporary name and
renamed (`utils.atomic`), so Ctrl-C never leaves half of one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..artifact.constants import CLASSIFIER_CONFIG_NAME
from ..cache.exact import CACHE_MODES
from ..data.builtin_tasks import builtin_task, builtin_task_names
from ..doctor import main as doctor_main
from ..estimators.rules import GapThresholdRule
from ..models.default_model import DEFAULT_MODEL_NAME
from ..policy.classifier import ExitClassifier
from ..policy.features import FEATURES
from ..training.calibrate import KNOBS, simulate_exits
from ..training.collect import collect_features
from ..training.table import FeatureTable
from ..training.train import TRAIN_METHODS, train_and_calibrate, train_on_tables
from ..utils.atomic import atomic_file
from ..utils.tokenizers import left_padding
from .args import UsageError, add_debug_flag, fraction, int_at_least, run_command
from .common import (
    add_model_arg,
    add_run_args,
    add_task_args,
    figures_line,
    load_dense_model,
    prompts_from,
    tasks_from_args,
)
from .eval import add_eval_parser
from .harness import add_lm_eval_parser

__all__ = ["ARTIFACTS_DIR", "UsageError", "build_parser", "main", "shipped_classifier_dir"]

ARTIFACTS_DIR = Path(__file__).resolve().parent.parent / "artifacts"
DEMO_SHOTS = 5
DEMO_TRAIN_LIMIT = 24  # prompts per built-in task and shots value when the demo trains in-process


def shipped_classifier_dir(model_subdir: str = "smollm2-135m-instruct") -> Path | None:
    """Directory of the classifier shipped in the package for a model, or None when absent."""
    path = ARTIFACTS_DIR / model_subdir
    return path if (path / CLASSIFIER_CONFIG_NAME).is_file() else None


# ---------------------------------------------------------------------------------------------------- commands
def _cmd_collect(args) -> int:
    model, tok = load_dense_model(args.model)
    prompts = prompts_from(tasks_from_args(args), args.shots, args.limit, args.seed)
    run = dict(features=args.features, batch_size=args.batch_size, progress=not args.quiet,
               check_dtype=args.check_dtype)
    table = collect_features(model, tok, prompts, **run)
    table.save(args.out)
    if args.csv:
        table.to_csv(args.csv)
    print(f"wrote {len(table)} rows ({table.num_prompts} prompts, {table.X.shape[1]} features) to {args.out}")
    return 0


def _cmd_train(args) -> int:
    if args.first_layer != 1 and args.generation_tokens is None:
        raise ValueError(f"--first-layer {args.first_layer} selects the layers --generation-tokens records; pass "
                         "--generation-tokens N as well (prompt tables always record every layer).")
    if args.free_running is not None and args.from_tables:
        raise ValueError(f"--free-running {args.free_running} generates on the calibration prompts, which "
                         "--from-tables does not have; pass the task flags instead of --from-tables.")
    model, tok = load_dense_model(args.model)
    fit = dict(
        method=args.method, features=args.features, label=args.label, max_rows=args.max_rows, seed=args.seed
    )
    cal = dict(target_agreement=args.target_agreement, delta=args.delta, min_layers=args.min_layers,
               gate=None if args.gate == "none" else args.gate, gate_recall=args.gate_recall, gate_cost=args.gate_cost,
               knob=args.knob)
    if args.from_tables:  # reuse the tables of an earlier `--tables-out`: no collection
        train_table = FeatureTable.load(Path(args.from_tables) / "train.npz")
        calib_table = FeatureTable.load(Path(args.from_tables) / "calibration.npz")
        table_dtype = train_table.meta.get("check_dtype")
        if args.check_dtype is not None and args.check_dtype != table_dtype:
            raise ValueError(f"--check-dtype {args.check_dtype} differs from the tables' check dtype {table_dtype!r} "
                             f"({args.from_tables}); collect the tables again with --check-dtype {args.check_dtype}.")
        clf = train_on_tables(model, train_table, calib_table, check_cost=args.check_cost,
                              check_phase=args.check_phase, check_length=args.check_length or 256,
                              check_vocabulary=args.check_vocabulary, **fit, **cal)
    else:
        prompts = prompts_from(tasks_from_args(args), args.shots, args.limit, args.seed)
        run = dict(batch_size=args.batch_size, progress=not args.quiet, generation_tokens=args.generation_tokens,
                   first_layer=args.first_layer, free_running_tokens=args.free_running, exit_cache=args.exit_cache)
        clf, train_table, calib_table = train_and_calibrate(
            model, tok, prompts, calibration_fraction=args.calibration_fraction, check_cost=args.check_cost,
            check_phase=args.check_phase, check_length=args.check_length, check_dtype=args.check_dtype,
            hidden_states=bool(args.tables_out), check_vocabulary=args.check_vocabulary, **fit, **cal, **run
        )
    if args.model == "default":  # name the Hub model, not this machine's cache path
        clf = clf.replace(base_model_name_or_path=DEFAULT_MODEL_NAME)
    if args.tables_out:
        train_table.save(Path(args.tables_out) / "train.npz")
        calib_table.save(Path(args.tables_out) / "calibration.npz")
    clf.save_pretrained(args.out)
    figures = clf.calibration
    unit = "prompts" if not train_table.is_generation else "generations"
    print(f"trained {args.method} on {train_table.num_sequences} {unit}, calibrated on {calib_table.num_sequences}")
    print(figures["conclusion"])
    if "schedule" in figures:
        sched = figures["schedule"]
        print(f"check schedule: layers {sched['check_layers'] or 'none'} (one check = "
              f"{sched['check_cost_layers']:.2f} layers{_gate_part(sched)}; expected cost "
              f"{sched['relative_cost']:.3f} of dense)")
    if "decode_schedule" in figures:
        sched = figures["decode_schedule"]
        print(f"decode check schedule: layers {sched['check_layers'] or 'none'} (one check = "
              f"{sched['check_cost_layers']:.2f} layers in a single-token step{_gate_part(sched)})")
    print(f"calibration: {figures_line(figures)} risk_upper_bound={figures['risk_upper_bound']:.3f}")
    print(f"saved the exit classifier to {args.out}")
    return 0


def _gate_part(schedule: dict) -> str:
    gate = schedule.get("gate_cost_layers") or 0.0
    return f", behind a gate of {gate:.3f} layers" if gate else ""


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
        run = dict(batch_size=args.batch_size, seed=args.seed, progress=not args.quiet)
        clf, _, _ = train_and_calibrate(
            model, tok, prompts, method="logistic", target_agreement=args.target_agreement, **run
        )
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
    return 0


# ---------------------------------------------------------------------------------------------------- parser
# One flag per line or two reads better than the formatter's one keyword per line.
# fmt: off
def _add_data_args(p) -> None:
    add_model_arg(p)
    add_task_args(p, limit=50)
    p.add_argument("--check-dtype", default=None, choices=["bfloat16", "float16"],
                   help="Compute the logit lens with the LM head in this dtype (cheaper checks on an fp32 model); "
                   "the classifier is trained, calibrated and run the same way. Default: the model's dtype.")
    add_run_args(p)


def _add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="Collect, train, calibrate and save an exit classifier for a model.")
    _add_data_args(p)
    p.add_argument("--method", default="svm", choices=list(TRAIN_METHODS),
                   help="Classifier (default: svm, the paper's). 'gate_only': no classifier, the linear gate on the "
                   "hidden state is the exit rule (implies --gate linear --knob gate; the cheapest decode checks).")
    p.add_argument("--features", nargs="+", default=["gap", "top_prob"], choices=list(FEATURES),
                   help="Features the classifier reads (default: gap top_prob).")
    p.add_argument("--label", default="final", choices=["final", "gold"],
                   help="Training target: agree with the dense model ('final', default) or the gold answer.")
    p.add_argument("--target-agreement", type=fraction(), default=0.99,
                   help="Calibrated share of prompts whose early answer equals the dense one (default 0.99).")
    p.add_argument("--delta", type=fraction(closed_high=False), default=0.1,
                   help="Allowed failure probability of the guarantee (default 0.1).")
    p.add_argument("--calibration-fraction", type=fraction(closed_high=False), default=0.5,
                   help="Share of examples held out for calibration (default 0.5).")
    p.add_argument("--min-layers", type=int_at_least(1), nargs="+", metavar="K",
                   help="Candidate min_layer values for calibration (default: up to 8 evenly spaced layers; each "
                   "candidate costs a Bonferroni factor).")
    p.add_argument("--max-rows", type=int_at_least(1), default=20000, help="Cap on training rows (default 20000).")
    p.add_argument("--tables-out", help="Also save the train/calibration feature tables in this directory (with "
                   "the hidden states a gate trains on).")
    p.add_argument("--from-tables", metavar="DIR", help="Skip collection: train and calibrate on the train.npz "
                   "and calibration.npz an earlier --tables-out wrote (task flags are then ignored).")
    p.add_argument("--check-cost", default="auto", help="One exit check's cost in decoder layers, used to choose "
                   "the check schedule: a number, 'auto' (measured now on this device; default) or 'none' (check "
                   "after every layer from min_layer, as the paper does).")
    p.add_argument("--check-phase", default="both", choices=["both", "prefill", "decode"],
                   help="With --check-cost auto: 'both' (default) measures a check in a prompt and in a "
                   "single-token step and chooses a schedule for each; 'prefill' or 'decode' one schedule for all.")
    p.add_argument("--check-length", type=int_at_least(1), default=None, help="Sequence length for the measured check cost "
                   "(default: the prompts' median length; 256 with --from-tables).")
    p.add_argument("--gate", default="none", choices=["none", "linear"],
                   help="'linear' puts a linear probe on the hidden state in front of every check, so a check "
                   "computes the LM head only where the probe passes (cheap checks in decode); calibration and the "
                   "schedule cover the gate. Default: none.")
    p.add_argument("--gate-recall", type=fraction(), default=0.99,
                   help="Share of the training rows whose lens agrees that the gate passes (default 0.99).")
    p.add_argument("--gate-cost", default="auto", help="The gate's cost per check in decoder layers for the "
                   "schedule: a number or 'auto' (measured now; default).")
    p.add_argument("--knob", default=None, choices=list(KNOBS),
                   help="What calibration tunes: the classifier's threshold ('classifier', default; 'gate' with "
                   "--method gate_only) or, with --gate "
                   "linear, the gate's thresholds ('gate': the probe on the hidden state decides, the classifier at "
                   "its own decision is a veto where the head runs).")
    p.add_argument("--check-vocabulary", type=int_at_least(2), default=None, metavar="K",
                   help="Checks score K token ids only (the training tables' dense tokens, most frequent first, then "
                   "the lowest ids): K rows of the LM head per check, and an exit's next token is one of them "
                   "(calibrated so). Cheap checks and exits on large vocabularies; not for scoring other tokens' "
                   "log-likelihoods. Default: the whole vocabulary.")
    p.add_argument("--generation-tokens", type=int_at_least(1), default=None, metavar="N",
                   help="Train and calibrate on the first N tokens the dense model generates per prompt (a "
                   "classifier for generate; calibration then bounds the share of a generation's tokens that agree, "
                   "generations as the draws). Default: the prompt's next token only, as in the paper.")
    p.add_argument("--first-layer", type=int_at_least(1), default=1, metavar="K",
                   help="With --generation-tokens: record layers K..L-1 only (each recorded layer computes the LM "
                   "head for every token; default 1).")
    p.add_argument("--free-running", type=int_at_least(1), default=None, metavar="N",
                   help="Certify what generate produces: candidates calibrated on the training prompts, from strict "
                   "to loose, are tested by generating N tokens per calibration prompt, and the target bounds the "
                   "share of a generation's tokens before its first difference from dense. Default: off.")
    p.add_argument("--exit-cache", default="propagate", choices=list(CACHE_MODES),
                   help="With --free-running: the KV-cache option the generations use (default: propagate, "
                   "generate's default).")
    p.add_argument("--out", required=True, help="Output directory of the exit-classifier artifact.")
    p.set_defaults(func=_cmd_train)


def build_parser() -> argparse.ArgumentParser:
    """The `adainfer` argument parser (one subparser per command)."""
    parser = argparse.ArgumentParser(prog="adainfer", description="AdaInfer early exit for transformers models.")
    add_debug_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("collect", help="Collect per-layer exit features of prompts into a table (.npz).")
    _add_data_args(p)
    p.add_argument("--features", nargs="+", default=list(FEATURES), choices=list(FEATURES),
                   help="Features to record (default: all).")
    p.add_argument("--out", required=True, help="Output .npz file (written atomically).")
    p.add_argument("--csv", help="Also write the table as CSV to this path.")
    p.set_defaults(func=_cmd_collect)

    _add_train_parser(sub)

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

    p = sub.add_parser("demo", help="Early exit on the embedded SmolLM2 with the shipped (or a fresh) classifier.")
    add_model_arg(p, default="default")
    p.add_argument("--classifier", help="Exit-classifier directory (default: the one shipped for the model).")
    p.add_argument("--retrain", action="store_true", help="Ignore the shipped classifier and train one now.")
    p.add_argument("--train-limit", type=int_at_least(1), default=DEMO_TRAIN_LIMIT,
                   help=f"Prompts per built-in task and shots value when training (default {DEMO_TRAIN_LIMIT}).")
    p.add_argument("--target-agreement", type=fraction(), default=0.99, help="Calibration target when training.")
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
