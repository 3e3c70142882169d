"""`adainfer train`: collect, train, calibrate and save an exit classifier.

The flags map one to one onto a [`TrainingConfig`], built once by [`training_config_from_args`]; the command then
calls `train_and_calibrate` (or `train_on_tables` with `--from-tables`) with it, so the saved artifact's
`calibration["training_config"]` records exactly what the command line asked for.

Under `accelerate launch` (or torchrun) every process collects its share of the prompts (and generations) on its
own replica of the model; the main process merges the tables, trains, calibrates and writes the artifact once, and
the other processes write nothing (`utils.distributed`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cache.exact import CACHE_MODES
from ..data.text_prompts import default_drafting_prompts, load_text_prompts
from ..models.default_model import DEFAULT_MODEL_NAME
from ..policy.features import FEATURES
from ..training.calibrate import KNOBS
from ..training.config import (
    TRAIN_METHODS,
    CalibrationConfig,
    DraftingConfig,
    GateConfig,
    GenerationCalibrationConfig,
    ScheduleConfig,
    TrainingConfig,
)
from ..training.table import FeatureTable
from ..training.train import train_and_calibrate, train_on_tables
from ..utils.distributed import launch_state, place_replica
from .args import fraction, int_at_least, layers_or
from .common import add_data_args, figures_line, load_dense_model, prompts_from, tasks_from_args

__all__ = ["add_train_parser", "training_config_from_args"]


def training_config_from_args(args: argparse.Namespace) -> TrainingConfig:
    """The [`TrainingConfig`] that `adainfer train`'s flags describe (`ValueError` naming a bad combination)."""
    return TrainingConfig(
        method=args.method, features=tuple(args.features), label=args.label, max_rows=args.max_rows, seed=args.seed,
        batch_size=args.batch_size, hidden_states=bool(args.tables_out),
        calibration=CalibrationConfig(target_agreement=args.target_agreement, delta=args.delta,
                                      calibration_fraction=args.calibration_fraction, knob=args.knob,
                                      min_layers=None if args.min_layers is None else tuple(args.min_layers)),
        gate=GateConfig(kind=None if args.gate == "none" else args.gate, recall=args.gate_recall,
                        cost=args.gate_cost),
        schedule=ScheduleConfig(check_cost=args.check_cost, check_phase=args.check_phase,
                                check_length=args.check_length, check_dtype=args.check_dtype,
                                check_vocabulary=args.check_vocabulary),
        generation=GenerationCalibrationConfig(generation_tokens=_generation_tokens(args),
                                               first_layer=args.first_layer, free_running_tokens=args.free_running,
                                               exit_cache=args.exit_cache),
        drafting=_drafting_config(args),
    )


def _check_flags(args) -> None:
    """Combinations of flags that cannot work, named by their flags (before the model is loaded)."""
    if args.first_layer != 1 and args.generation_tokens is None:
        raise ValueError(f"--first-layer {args.first_layer} selects the layers --generation-tokens records; pass "
                         "--generation-tokens N as well (prompt tables always record every layer).")
    if args.free_running is not None and args.from_tables:
        raise ValueError(f"--free-running {args.free_running} generates on the calibration prompts, which "
                         "--from-tables does not have; pass the task flags instead of --from-tables.")


def _cmd_train(args) -> int:
    _check_flags(args)
    config = training_config_from_args(args)
    text_prompts = _text_prompts(args)  # (a bad file fails before the model loads)
    # Under `accelerate launch` / torchrun every process collects its share; the main process trains and writes.
    state = launch_state()
    if args.from_tables and not state.is_main_process:
        return 0  # no collection to share: the main process does it all
    model, tok = load_dense_model(args.model)
    place_replica(model, state)
    if args.from_tables:  # reuse the tables of an earlier `--tables-out`: no collection
        train_table = FeatureTable.load(Path(args.from_tables) / "train.npz")
        calib_table = FeatureTable.load(Path(args.from_tables) / "calibration.npz")
        table_dtype = train_table.meta.get("check_dtype")
        if args.check_dtype is not None and args.check_dtype != table_dtype:
            raise ValueError(f"--check-dtype {args.check_dtype} differs from the tables' check dtype {table_dtype!r} "
                             f"({args.from_tables}); collect the tables again with --check-dtype {args.check_dtype}.")
        clf = train_on_tables(model, train_table, calib_table, config)
    else:
        prompts = text_prompts or prompts_from(tasks_from_args(args), args.shots, args.limit, args.seed)
        clf, train_table, calib_table = train_and_calibrate(model, tok, prompts, config, progress=not args.quiet)
        if not state.is_main_process:
            return 0  # the artifact, the tables and the summary are written once, by the main process
    if args.model == "default":  # name the Hub model, not this machine's cache path
        clf = clf.replace(base_model_name_or_path=DEFAULT_MODEL_NAME)
    if args.tables_out:
        train_table.save(Path(args.tables_out) / "train.npz")
        calib_table.save(Path(args.tables_out) / "calibration.npz")
    clf.save_pretrained(args.out)
    _print_summary(args, clf, train_table, calib_table)
    return 0


def _print_summary(args, clf, train_table, calib_table) -> None:
    figures = clf.calibration
    if "drafting" in figures:
        return _print_drafting_summary(args, figures, train_table, calib_table)
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


def _gate_part(schedule: dict) -> str:
    gate = schedule.get("gate_cost_layers") or 0.0
    return f", behind a gate of {gate:.3f} layers" if gate else ""


# ---------------------------------------------------------------------------------------------------- parser
# One flag per line or two reads better than the formatter's one keyword per line.
# fmt: off
def add_train_parser(sub) -> None:
    """The `train` subcommand: every field of [`TrainingConfig`] as a flag, plus where the data comes from."""
    p = sub.add_parser("train", help="Collect, train, calibrate and save an exit classifier for a model.")
    add_data_args(p)
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
    p.add_argument("--max-rows", type=int_at_least(2), default=20000, help="Cap on training rows (default 20000).")
    p.add_argument("--tables-out", help="Also save the train/calibration feature tables in this directory (with "
                   "the hidden states a gate trains on).")
    p.add_argument("--from-tables", metavar="DIR", help="Skip collection: train and calibrate on the train.npz "
                   "and calibration.npz an earlier --tables-out wrote (task flags are then ignored).")
    p.add_argument("--check-cost", type=layers_or("auto", "none"), default="auto", help="One exit check's cost in "
                   "decoder layers, used to choose the check schedule: a number, 'auto' (measured now on this "
                   "device; default) or 'none' (check after every layer from min_layer, as the paper does).")
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
    p.add_argument("--gate-cost", type=layers_or("auto"), default="auto", help="The gate's cost per check in "
                   "decoder layers for the schedule: a number or 'auto' (measured now; default).")
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
    _add_lossless_args(p)
    p.add_argument("--out", required=True, help="Output directory of the exit-classifier artifact.")
    p.set_defaults(func=_cmd_train)


def _add_lossless_args(p) -> None:
    """`--lossless` and the flags of the drafting objective, `--text-file`."""
    p.add_argument("--lossless", action="store_true",
                   help="Train for lossless generate: choose the rule (check layers, threshold, shortlist, draft cap) "
                   "with the best decode speed predicted under a cost model measured now on this device, on held-out "
                   "prompts; an empty schedule (the stock path) when nothing is predicted to pay. Default prompts: the "
                   "shipped drafting prompts; --generation-tokens defaults to 48.")
    p.add_argument("--text-file", metavar="FILE", help="Plain-text prompts: one per line, or JSONL {\"text\": ...} "
                   "(instead of the task flags).")
    p.add_argument("--draft-caps", type=int_at_least(1), nargs="+", default=None, metavar="N",
                   help="With --lossless: candidate draft caps (default 1 2 3 4 6 8).")
    p.add_argument("--draft-vocabularies", type=_size_or_full, nargs="+", default=None, metavar="K",
                   help="With --lossless: candidate shortlist sizes of the checks, 'full' for the whole vocabulary "
                   "(default: full).")
    p.add_argument("--draft-margin", type=float, default=0.02,
                   help="With --lossless: predicted speed-up over stock required to keep a schedule (default 0.02).")
# fmt: on


# ---------------------------------------------------------------------------------------------------- --lossless
def _size_or_full(text: str):
    """`--draft-vocabularies` values: an int >= 2 or 'full' (None: the whole vocabulary)."""
    if text == "full":
        return None
    if not text.isdigit() or int(text) < 2:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shortlist size (an int >= 2) or 'full'")
    return int(text)


def _generation_tokens(args):
    return args.generation_tokens if args.generation_tokens is not None or not args.lossless else 48


def _drafting_config(args) -> DraftingConfig | None:
    """The `DraftingConfig` of `--lossless` (None without it; its flags without it are refused by name)."""
    if not args.lossless:
        given = [f for f, v in (("--draft-caps", args.draft_caps), ("--draft-vocabularies", args.draft_vocabularies))
                 if v is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} choose the drafting rule; pass --lossless as well.")
        return None
    sizes = None if args.draft_vocabularies is None else tuple(args.draft_vocabularies)
    fields = dict(max_draft_tokens=tuple(args.draft_caps) if args.draft_caps else None, vocabulary_sizes=sizes,
                  margin=args.draft_margin)
    return DraftingConfig(**{k: v for k, v in fields.items() if v is not None})


def _text_prompts(args):
    """`--text-file`'s prompts, or with `--lossless` and no task flags the shipped drafting prompts; else None."""
    if args.text_file:
        return load_text_prompts(args.text_file)
    if args.lossless and not (args.task_file or args.builtin_task):
        return default_drafting_prompts()
    return None


def _print_drafting_summary(args, figures, train_table, holdout_table) -> None:
    record, cost = figures["drafting"], figures["cost_model"]
    rule, held = record["rule"], record["holdout"]
    print(f"drafting: {train_table.num_sequences} generations searched, {holdout_table.num_sequences} held out; "
          f"cost model on {cost['device']} ({cost['dtype']}, {cost['threads']} threads)")
    print(f"best rule: check layers {rule['check_layers']}, threshold {rule['threshold']:.4g}, shortlist "
          f"{rule['vocabulary_size'] or 'full'}, draft cap {rule['max_draft_tokens']}; held out: predicted "
          f"{held['predicted_speed']:.3f}x stock, acceptance {held['acceptance']:.3f}, "
          f"{held['draft_length']:.2f} tokens per verification")
    print(record["why"])
    print(f"saved the drafting classifier to {args.out}")
