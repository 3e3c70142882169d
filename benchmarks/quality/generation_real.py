"""Early exit in generation on a real model: classifiers calibrated on generated tokens, measured in decode.

`gate_real.py` calibrates on the prompt's next token; a generation is mostly decode steps, whose tokens settle
earlier and differently. This benchmark

1. records generation tables (`collect_generation_features`): `--shots`-shot prompts of the ten training tasks of
   `eval_real.sh` (never evaluated), the dense model's first `--tokens` greedy tokens each, every layer from
   `--first-layer` on, with hidden states; the first `--train` examples of each task train, the next `--cal`
   calibrate (cached under `<adainfer cache>/eval/<key>-gen-.../`);
2. trains an SVM on (gap, top_prob) and a linear gate, and calibrates three rules per target with Learn-then-Test,
   sequences as the draws (Hoeffding-Bentkus): `full` (no gate; the classifier's threshold), `gated` (gate at
   recall 0.99 in front, the classifier's threshold calibrated) and `gate-knob` (the classifier at its own
   decision, the gate's thresholds shifted by the calibrated amount), and `probe` (`method="gate_only"`: the gate
   alone, calibrated as the knob); the schedules are chosen per phase with the measured check and
   gate costs (prefill on the first tokens, decode on the later ones); with `--free-running N` each rule is
   instead calibrated free-running (`training.free_running`: candidates from the train table, tested by
   generating N tokens on calibration prompts with `--free-running-cache`, propagate by default) and named
   `<rule>@<target>+free` (`+free-exact` with the exact cache); with `--vocabulary K` the checks score K token ids
   only (`check_vocabulary`: the train table's dense tokens, then the lowest ids), named `...+vK`;
3. generates `--new-tokens` greedy tokens at batch 1 for held-out prompts (the same format on the four evaluated
   tasks, and chat questions), dense (stock `generate`) and early exit alternating per prompt: token agreement with
   dense, common prefix, mean layers per generated token, median per-prompt wall-clock ratio; and the prompt
   forward alone (first-token scoring, batch 8) for the prefill ratio.

Usage: python -m benchmarks.quality.generation_real KEY [--targets 0.95,0.9] [--rules full,gate-knob,probe] [--propagate probe]
Writes docs/results/<key>/generation/<date>[-variant].json (stamped) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from adainfer_hf import AutoAdaInferForCausalLM
from adainfer_hf.data.prompts import build_prompts, load_task
from adainfer_hf.training.collect_generation import collect_generation_features
from adainfer_hf.training.config import CalibrationConfig, GateConfig, ScheduleConfig, TrainingConfig
from adainfer_hf.training.free_running import FreeRunning
from adainfer_hf.training.table import FeatureTable
from adainfer_hf.training.train import train_on_tables
from adainfer_hf.utils.results import scrub_path
from benchmarks.common.prompts import FV, held_out_texts
from benchmarks.common.real_models import model_dir
from benchmarks.common.results import add_result_arguments, save_result, settings_of
from benchmarks.common.timing import first_token, generation

TRAIN_TASKS = ("abstractive/present-past", "abstractive/singular-plural", "abstractive/english-french",
               "abstractive/english-german", "abstractive/landmark-country", "abstractive/person-sport",
               "abstractive/product-company", "abstractive/park-country", "abstractive/person-occupation",
               "extractive/choose_last_of_5")
RULES = {"full": dict(method="svm", gate=None, knob="classifier"),  # (method, gate kind, calibration knob)
         "gated": dict(method="svm", gate="linear", knob="classifier"),
         "gate-knob": dict(method="svm", gate="linear", knob="gate"),
         "probe": dict(method="gate_only", gate=None, knob=None)}


def tables(ada, tok, args):
    """(train table, calibration table, their directory, the calibration prompts): each table recorded once per
    configuration and cached on its own (the first `train` prompts of a task do not depend on `cal`, so a train
    table may be copied between directories)."""
    L = ada.config.num_hidden_layers
    first = args.first_layer or L // 2
    root = Path(os.environ.get("ADAINFER_HOME", Path.home() / ".cache/adainfer_hf")) / "eval"
    where = root / f"{args.key}-gen-{args.shots}shot-{args.tokens}tok-from{first}-{args.train}-{args.cal}"
    tasks = [load_task(FV / f"{t}.json") for t in TRAIN_TASKS]
    prompts = [q for t in tasks for q in build_prompts(t, args.shots, limit=args.train + args.cal, seed=0)]
    order = {}
    for q in prompts:  # the first `train` examples of each task train, the rest calibrate
        order.setdefault(q.task, []).append(q)
    train_p = [q for qs in order.values() for q in qs[: args.train]]
    cal_p = [q for qs in order.values() for q in qs[args.train:]]
    out = []
    for name, ps in (("train", train_p), ("calibration", cal_p)):
        if (where / f"{name}.npz").exists():
            out.append(FeatureTable.load(where / f"{name}.npz"))
            continue
        t0 = time.perf_counter()
        table = collect_generation_features(ada, tok, ps, new_tokens=args.tokens, features=("gap", "top_prob"),
                                            batch_size=args.batch_size, hidden_states=True, first_layer=first)
        table.meta["seconds"] = time.perf_counter() - t0
        table.save(where / f"{name}.npz")
        out.append(table)
    return out[0], out[1], where, cal_p


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("key", help="a key of benchmarks/common/real_models.py")
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--tokens", type=int, default=12, help="generated tokens recorded per prompt")
    p.add_argument("--first-layer", type=int, default=None, help="first recorded layer (default L // 2)")
    p.add_argument("--train", type=int, default=10, help="training examples per task")
    p.add_argument("--cal", type=int, default=30, help="calibration examples per task")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--targets", default="0.95,0.9")
    p.add_argument("--rules", default="full,gate-knob,probe", help=f"of {list(RULES)}")
    p.add_argument("--eval-per-task", type=int, default=2, help="held-out prompts per evaluated task")
    p.add_argument("--chat", type=int, default=4, help="chat questions (out of the training format)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--propagate", default="probe", help="rules also run with exit_cache='propagate' (all run "
                   "with 'exact', whose later tokens see the dense model's states)")
    p.add_argument("--free-running", type=int, default=0, metavar="N", help="calibrate free-running instead: "
                   "candidates from the train table, tested by generating N tokens (--free-running-cache) on the "
                   "first --free-running-prompts calibration prompts (training.free_running)")
    p.add_argument("--free-running-prompts", type=int, default=100)
    p.add_argument("--free-running-cache", default="propagate", choices=("propagate", "exact"),
                   help="the exit cache option the free-running generations use (and certify)")
    p.add_argument("--vocabulary", type=int, default=None, metavar="K", help="checks over K token ids "
                   "(ScheduleConfig(check_vocabulary=K)): the train table's dense tokens, then the lowest ids; "
                   "classifiers named <rule>@<target>+vK")
    p.add_argument("--collect-only", action="store_true")
    p.add_argument("--no-eval", action="store_true", help="stop after calibrating (and --save-dir): time the saved "
                   "classifiers with decode_gain.py instead")
    p.add_argument("--save-dir", default=None, help="also save each classifier under DIR/<rule>@<target> (for "
                   "peer_economize.py --exit-classifier NAME=DIR/<name>)")
    add_result_arguments(p)
    args = p.parse_args(argv)
    path = model_dir(args.key)
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    ada = AutoAdaInferForCausalLM.from_pretrained(path, exit_classifier=None).eval()
    L = ada.config.num_hidden_layers
    train, calib, where, cal_prompts = tables(ada, tok, args)  # (--free-running generates on cal_prompts)
    print(f"tables: {where} ({train.num_sequences} + {calib.num_sequences} sequences)")
    if args.collect_only:
        return
    dense = AutoModelForCausalLM.from_pretrained(path).eval()
    classifiers = {}
    for target in [float(t) for t in args.targets.split(",")]:
        for rule in args.rules.split(","):
            free = None if not args.free_running else FreeRunning(
                tok, cal_prompts[: args.free_running_prompts], args.free_running, args.free_running_cache)
            suffix = "" if not free else "+free" if free.exit_cache == "propagate" else "+free-exact"
            suffix += f"+v{args.vocabulary}" if args.vocabulary else ""
            config = TrainingConfig(
                method=RULES[rule]["method"], gate=GateConfig(kind=RULES[rule]["gate"]),
                calibration=CalibrationConfig(target_agreement=target, knob=RULES[rule]["knob"]),
                schedule=ScheduleConfig(check_cost="auto", check_phase="both", check_length=64,
                                        check_vocabulary=args.vocabulary))
            classifiers[f"{rule}@{target}{suffix}"] = train_on_tables(ada, train, calib, config, free_running=free)
    for name, c in classifiers.items():
        print(name, c.calibration.get("conclusion"), "| prefill", c.check_layers, "| decode", c.decode_check_layers)
        if args.save_dir:
            c.save_pretrained(Path(args.save_dir) / name)
    if args.no_eval:
        return

    held_out, chat = held_out_texts(tok, args.shots, args.eval_per_task, args.chat)
    texts = held_out + chat
    runs = dict(classifiers)
    caches = {name: "exact" for name in classifiers}
    propagate = set(args.propagate.split(",")) if args.propagate else set()
    for name, clf in classifiers.items():
        if name.split("@")[0] in propagate:
            runs[f"{name} propagate"] = clf
            caches[f"{name} propagate"] = "propagate"
    generated = generation(dense, ada, tok, texts, runs, args.new_tokens, caches)
    scoring = first_token(dense, ada, tok, held_out, classifiers, batch_size=8)
    record = {
        "benchmark": "generation_real", "model": args.key, "num_layers": L, "tables": scrub_path(where),
        "args": settings_of(args), "threads": torch.get_num_threads(),
        "train_sequences": train.num_sequences, "calibration_sequences": calib.num_sequences,
        "classifiers": {name: {"calibration": c.calibration, "min_layer": c.min_layer, "threshold": c.threshold,
                               "check_layers": c.check_layers, "decode_check_layers": c.decode_check_layers}
                        for name, c in classifiers.items()},
        "generation": generated, "first_token": scoring, "versions": {"torch": torch.__version__},
    }
    print("| rule | generation: token agreement / prefix / layers per token / speedup | first token: agreement / "
          "layers / speedup |")
    print("|---|---|---|")
    for name in runs:
        g, s = generated[name], scoring[name.split(" ")[0]]
        print(f"| {name} | {g['token_agreement']:.3f} / {g['mean_prefix']:.1f} / {g['mean_layers_per_token']:.2f} "
              f"of {L} / {g['speedup_median']:.2f}x | {s['agreement']:.3f} / {s['mean_layers']:.2f} / "
              f"{s['speedup_median']:.2f}x |")
    save_result(args, args.key, "generation", record, argv, variant="free" if args.free_running else None)


if __name__ == "__main__":
    main()
