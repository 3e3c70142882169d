"""Full-vocabulary checks against gated checks on a real checkpoint: what one check costs, and what the calibrated
early exit gains with each, in first-token scoring and in generation.

    python -m benchmarks.quality.gate_real qwen2.5-0.5b [--tables DIR] [--prompts 32] [--gen-prompts 6] [--new-tokens 64]

1. Check cost, in decoder layers, measured on this device (`training.check_cost`): the full check (final norm +
   LM head + top-2) and the gate alone (a probe on the hidden state plus its one host copy), at prefill lengths
   64/256/1024 and in a single-token decode step; plus what a gated check costs on average at the schedule's
   layers, `gate + P(pass) x head`, with P(pass) read from the calibration table.
2. Four classifiers trained on the same tables: the paper's SVM on gap/top_prob, without and with a linear gate,
   each calibrated at 0.99 and 0.95 (Learn-then-Test on the composed rule) with schedules for prompts and decode
   steps from the measured costs. The tables are, by default, those `benchmarks/paper/eval_real.sh` wrote (ten other
   tasks: the evaluated tasks are unseen); with `--in-distribution N` they are collected here from N further
   examples of each evaluated task (disjoint from the evaluated examples; half train, half calibrate), the
   paper's intra-task setting.
3. First-token scoring on held-out prompts of four unseen tasks (5-shot, batches of 8): agreement of the top-1 with
   dense, mean layers, wall-clock ratio dense / early exit. 64-token greedy generation of free-text prompts
   (batch 1): token agreement, common prefix, mean layers per token, wall-clock ratio. Dense is the stock
   `AutoModelForCausalLM` with the same weights; each early-exit run is timed right after a dense run of the same
   input (alternating), and ratios are medians over inputs of the per-input ratios (also the ratio of sums).

Writes docs/results/<key>/gate/<date>[-indist|-forced].json, or with `--costs-only`
docs/results/<key>/gate_costs/<date>.json (stamped), and prints markdown tables.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from adainfer_hf.architectures import core as arch
from adainfer_hf.data.prompts import build_prompts, load_task, split_examples
from adainfer_hf.policy.gate import LinearGate
from adainfer_hf.training.calibrate import gate_passes
from adainfer_hf.training.check_cost import LayerClock, measure_check_cost, measure_gate_cost
from adainfer_hf.training.collect import collect_features
from adainfer_hf.training.config import CalibrationConfig, GateConfig, ScheduleConfig, TrainingConfig
from adainfer_hf.training.table import FeatureTable
from adainfer_hf.training.train import train_on_tables
from adainfer_hf.utils.results import scrub_path
from benchmarks.common.prompts import EVAL_TASKS, FREE_TEXT, FV, chat
from benchmarks.common.real_models import load_pair
from benchmarks.common.results import add_result_arguments, save_result
from benchmarks.common.timing import first_token, generation


def alternative_costs(model, length, phase, repeats, shortlist=1024, rank=64):
    """What the alternatives to a gate cost, in layers: a bfloat16 head, a shortlist head (logits of `shortlist`
    candidate tokens) and a rank-`rank` factorised head (cost only: neither gives the full-vocabulary gap)."""
    clock = LayerClock(model, length, 1, phase, repeats)
    head = model.get_output_embeddings().weight
    g = torch.Generator().manual_seed(0)
    rows = torch.randperm(head.shape[0], generator=g)[:shortlist].to(head.device)
    short = head.index_select(0, rows).contiguous()
    a = torch.randn(head.shape[1], rank, dtype=head.dtype, device=head.device)
    b = torch.randn(rank, head.shape[0], dtype=head.dtype, device=head.device)
    spec = arch.spec_for(model)

    def lens(weight_fn):
        def run():
            x = spec.exit_norm(model, clock.hidden[:, -1])
            weight_fn(x).softmax(-1).topk(2).values.to("cpu")
        return run

    return {"bf16_check_layers": measure_check_cost(model, seq_len=length, phase=phase, repeats=repeats,
                                                    check_dtype="bfloat16"),
            f"shortlist{shortlist}_layers": clock.in_layers(lens(lambda x: x @ short.T)),
            f"lowrank{rank}_layers": clock.in_layers(lens(lambda x: (x @ a) @ b))}


def check_costs(model, gate, calib, classifiers, repeats):
    """Full vs gated check cost in layers per phase (and the alternatives), and the gate's pass rate at each
    gated classifier's decode schedule."""
    rows = []
    with torch.no_grad():
        for phase, length in (("prefill", 64), ("prefill", 256), ("prefill", 1024), ("decode", 256)):
            full = measure_check_cost(model, seq_len=length, phase=phase, repeats=repeats)
            g = measure_gate_cost(model, gate, seq_len=length, phase=phase, repeats=repeats)
            rows.append({"phase": phase, "length": length if phase == "prefill" else 1, "full_check_layers": full,
                         "gate_layers": g, **alternative_costs(model, length, phase, repeats)})
    pass_rate = {}
    for name, clf in classifiers.items():  # (none with --costs-only: no calibration table)
        if clf.gate is None:
            continue
        passed = gate_passes(clf, calib)
        layers = clf.layers_to_check(int(calib.num_layers[0]), decode=True) or list(range(1, int(calib.num_layers[0])))
        at = np.isin(calib.layer, layers)
        pass_rate[name] = float(passed[at].mean()) if at.any() else float("nan")
    return rows, pass_rate


def in_distribution_tables(model, tok, tasks, skip: int, n: int):
    """Train / calibration tables (with hidden states) of the `n` examples of each task that follow the first
    `skip` (the evaluated ones: `build_prompts` takes a prefix of one permutation), split by example."""
    prompts = [q for t in tasks for q in build_prompts(t, 5, limit=skip + n, seed=0)[skip:]]
    table = collect_features(model, tok, prompts, features=("gap", "top_prob"), progress=False, hidden_states=True)
    keys = sorted({(q.task, q.index) for q in prompts})
    train_keys = set(split_examples(keys, [0.5], seed=0)[0])
    is_train = np.array([(q.task, q.index) in train_keys for q in prompts])
    return table.select_prompts(np.flatnonzero(is_train)), table.select_prompts(np.flatnonzero(~is_train))


def _print_costs(key, L, model, costs):
    print(f"{key}: L={L}, V={model.config.vocab_size}, threads={torch.get_num_threads()}")
    print("| phase | tokens | full check | gate | bf16 check | shortlist 1024 | low-rank 64 | (layers) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in costs:
        print(f"| {r['phase']} | {r['length']} | {r['full_check_layers']:.3f} | {r['gate_layers']:.4f} | "
              f"{r['bf16_check_layers']:.3f} | {r['shortlist1024_layers']:.3f} | {r['lowrank64_layers']:.3f} | |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("key", help="a key of benchmarks/common/real_models.py")
    p.add_argument("--tables", default=None, help="dir with train.npz / calibration.npz holding hidden states "
                   "(default: the one benchmarks/paper/eval_real.sh wrote for KEY)")
    p.add_argument("--prompts", type=int, default=32, help="held-out first-token prompts (over the four tasks)")
    p.add_argument("--gen-prompts", type=int, default=6)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--gate-recall", type=float, default=0.99)
    p.add_argument("--targets", default="0.99,0.95")
    p.add_argument("--repeats", type=int, default=9, help="timing repeats of the check-cost measurement")
    p.add_argument("--threads", type=int, default=None)
    add_result_arguments(p)
    p.add_argument("--in-distribution", type=int, default=0, metavar="N",
                   help="train and calibrate on N other examples of each evaluated task (default 0: the tables)")
    p.add_argument("--forced-checks", action="store_true", help="also run each classifier with its schedules "
                   "replaced by a check after every layer from its min_layer (the cost of checks that rarely fire)")
    p.add_argument("--costs-only", action="store_true", help="only part 1, with a random gate of the model's shape "
                   "(a gate's cost does not depend on its values); no tables needed")
    p.add_argument("--save-dir", default=None, help="also save each classifier under DIR/<name> (for "
                   "peer_economize.py --exit-classifier NAME=DIR/<name>)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tok, dense, ada = load_pair(args.key)
    L = ada.config.num_hidden_layers
    if args.costs_only:
        H = ada.config.hidden_size
        gate = LinearGate(range(1, L), np.random.default_rng(0).normal(size=(L - 1, H)), np.zeros(L - 1), np.zeros(L - 1))
        costs = check_costs(ada, gate, None, {}, args.repeats)[0]
        record = {"benchmark": "gate_real --costs-only", "model": args.key, "num_layers": L,
                  "vocab_size": ada.config.vocab_size, "hidden_size": H, "threads": torch.get_num_threads(),
                  "check_costs": costs}
        _print_costs(args.key, L, ada, costs)
        save_result(args, args.key, "gate_costs", record, argv)
        return
    per_task = max(1, args.prompts // len(EVAL_TASKS))
    tasks = [load_task(FV / f"{t}.json") for t in EVAL_TASKS]
    if args.in_distribution:
        tables = f"collected here: {args.in_distribution} examples per evaluated task after the evaluated ones"
        train, calib = in_distribution_tables(ada, tok, tasks, per_task, args.in_distribution)
    else:
        root = Path(os.environ.get("ADAINFER_HOME", Path.home() / ".cache/adainfer_hf")) / "eval"
        tables = Path(args.tables) if args.tables else next(root.glob(f"{args.key}-svm-10tasks-*/tables"))
        train, calib = FeatureTable.load(tables / "train.npz"), FeatureTable.load(tables / "calibration.npz")

    classifiers, train_s = {}, {}
    for target in [float(t) for t in args.targets.split(",")]:
        for gate in (None, "linear"):
            name = f"{'gated' if gate else 'full'}@{target}"
            t0 = time.perf_counter()
            config = TrainingConfig(method="svm", calibration=CalibrationConfig(target_agreement=target),
                                    gate=GateConfig(kind=gate, recall=args.gate_recall),
                                    schedule=ScheduleConfig(check_cost="auto", check_phase="both", check_length=128))
            classifiers[name] = train_on_tables(ada, train, calib, config)
            train_s[name] = time.perf_counter() - t0
            if args.save_dir:
                classifiers[name].save_pretrained(Path(args.save_dir) / name)
    if args.forced_checks:  # what checking costs where nothing exits: every layer from min_layer, in every step
        for name in list(classifiers):
            classifiers[f"{name} every layer"] = classifiers[name].replace(check_layers=None, decode_check_layers=None)
    gate = next(c.gate for c in classifiers.values() if c.gate is not None)
    costs, pass_rate = check_costs(ada, gate, calib, classifiers, args.repeats)

    rng = np.random.default_rng(0)
    prompts = [q.text for t in tasks for q in build_prompts(t, 5, limit=per_task, seed=0)]
    rng.shuffle(prompts)
    scoring = first_token(dense, ada, tok, prompts, classifiers, batch_size=8)
    texts = [chat(tok, t) for t in FREE_TEXT[: args.gen_prompts]]
    generated = generation(dense, ada, tok, texts, classifiers, args.new_tokens)

    record = {
        "benchmark": "gate_real", "model": args.key, "num_layers": L, "vocab_size": ada.config.vocab_size,
        "hidden_size": ada.config.hidden_size, "threads": torch.get_num_threads(), "tables": scrub_path(tables),
        "in_distribution": args.in_distribution,
        "train_prompts": train.num_prompts, "calibration_prompts": calib.num_prompts,
        "check_costs": costs, "gate_pass_rate_at_decode_schedule": pass_rate,
        "classifiers": {name: {"calibration": c.calibration.get("conclusion"), "min_layer": c.min_layer,
                               "check_layers": c.check_layers, "decode_check_layers": c.decode_check_layers,
                               "train_seconds": train_s.get(name),
                               "schedule": c.calibration.get("schedule"),
                               "decode_schedule": c.calibration.get("decode_schedule")}
                        for name, c in classifiers.items()},
        "first_token": scoring, "generation": generated,
        "versions": {"torch": torch.__version__},
    }
    _print_costs(args.key, L, ada, costs)
    print("| classifier | first-token agree | layers | speedup | gen agree | layers/token | gen speedup |")
    print("|---|---|---|---|---|---|---|")
    for name in classifiers:
        s, g = scoring[name], generated[name]
        print(f"| {name} | {s['agreement']:.3f} | {s['mean_layers']:.2f}/{L} | {s['speedup_median']:.2f}x | "
              f"{g['token_agreement']:.3f} | {g['mean_layers_per_token']:.2f}/{L} | {g['speedup_median']:.2f}x |")
    # the setting in the name: paper_table reads <date>.json, <date>-indist.json and <date>-forced.json
    setting = "-".join(v for v, on in (("indist", args.in_distribution), ("forced", args.forced_checks)) if on)
    save_result(args, args.key, "gate", record, argv, variant=setting or None)


if __name__ == "__main__":
    main()
