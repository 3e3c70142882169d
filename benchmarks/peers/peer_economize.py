"""The peer a user would pick instead: economize's CALM early exit, against HF `generate` and our AdaInfer classes.

Same model, same prompts, same token budget, one process. Every method decodes the prompts one at a time (batch
size 1), greedily, for exactly ``--max-new-tokens`` tokens (EOS does not stop anyone, so every method does the same
number of steps). Repeats alternate the methods (the order rotates each repeat); seconds are the median over repeats
of the summed wall-clock of the per-prompt calls, and ``x HF`` is that median over HF ``generate``'s (> 1: slower);
``min`` is the same ratio of the fastest repeats (less sensitive to other jobs on a shared machine).

Methods:

- ``hf``: stock ``AutoModelForCausalLM.generate`` (the dense reference; its tokens define agreement);
- ``econ-plain``: ``economize.apply(model)`` with no technique, decoded by economize's own loop (its loop overhead);
- ``econ-calm@T``: ``economize.apply(model, CalmConfig(confidence="softmax", threshold=T, min_layer=M))``; T = 1
  never exits (but still computes the confidence after every layer ``M..L-1``). Decoded with ``EfficientModel.decode``
  because economize 0.3.2's ``generate`` rejects the ``cache`` model kwarg that transformers 5.24 passes;
- ``ada-shipped``: ``AdaInfer<Arch>ForCausalLM`` with the classifier shipped for SmolLM2, as shipped;
- ``ada-shipped-checks``: the same classifier with ``check_layers=None`` (checks every layer from its ``min_layer``);
- ``ada-gap@T``: ``ExitClassifier(GapThresholdRule(threshold=T), check_layers=(), decode_check_layers=M..L-1)``: the
  same decision as economize's softmax CALM (top-1 minus top-2 probability of the logit lens > T), checked in decode
  steps only, like CALM, whose prompt always runs every layer;
- ``ada-gap@T+prompt``: the same rule with the package default schedule (the prompt step may exit too).

All AdaInfer runs use ``generate(..., exit_cache="propagate")``. The AdaInfer side is skipped, with a message, when
``adainfer_hf`` has no class for the model's ``model_type``.

Agreement is against the dense greedy tokens, pooled over prompts: ``prefix`` = tokens before the first divergence /
tokens generated, ``overall`` = positions equal / tokens generated. Layers per token count every generated token
(the first one comes from the prompt pass); for economize ``kv fill`` is the skipped layers whose K/V were projected
from the exit state and ``head`` the LM-head calls made by the confidence measure, both per generated token.

    python -m benchmarks.peers.peer_economize                                   # SmolLM2, 12 prompts x 40 tokens, 3 repeats
    python -m benchmarks.peers.peer_economize --model qwen2.5-0.5b --prompts 6 --max-new-tokens 32 --repeats 2

Writes ``docs/results/<model>/peer_economize/<date>[-variant].json`` (stamped; each ``--exit-classifier`` by its
config, not its path).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.metadata
import json
import platform
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from adainfer_hf.utils.results import scrub_path
from benchmarks.common.prompts import FV
from benchmarks.common.results import add_result_arguments, classifier_configs, save_result

FV_DIR = FV / "abstractive"
FV_TASKS = ("antonym", "country-capital", "sentiment", "english-french", "present-past", "singular-plural",
            "landmark-country", "synonym", "person-occupation")
FREE_TEXT = (
    "The history of the printing press begins in",
    "Explain why the sky is blue.\n",
    "Write a short story about a robot who learns to paint.\n",
)
SHOTS = 5
# adainfer_hf class per model_type; a name the installed package lacks means "skip the AdaInfer side".
ADAINFER_CLASSES = {
    "llama": "AdaInferLlamaForCausalLM",
    "opt": "AdaInferOPTForCausalLM",
    "qwen2": "AdaInferQwen2ForCausalLM",
    "gemma3_text": "AdaInferGemma3ForCausalLM",
}


# ---------------------------------------------------------------------------------------------------- prompts
def fv_prompt(task: str, rng: random.Random) -> str:
    """A 5-shot ``Q: x\\nA: y`` prompt from one function-vector task (the query's answer left open)."""
    items = json.loads((FV_DIR / f"{task}.json").read_text())
    picked = rng.sample(items, SHOTS + 1)
    demos = "".join(f"Q: {d['input']}\nA: {d['output']}\n\n" for d in picked[:SHOTS])
    return demos + f"Q: {picked[SHOTS]['input']}\nA:"


def build_prompts(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (name, text) prompts: function-vector tasks and free text interleaved 3:1, so a prefix is a mix."""
    rng = random.Random(seed)
    fv = [(f"fv:{t}", fv_prompt(t, rng)) for t in FV_TASKS]
    free = [(f"free:{i}", text) for i, text in enumerate(FREE_TEXT)]
    mixed = []
    while fv or free:
        for _ in range(3):
            if fv:
                mixed.append(fv.pop(0))
        if free:
            mixed.append(free.pop(0))
    if n > len(mixed):
        raise SystemExit(f"--prompts {n}: only {len(mixed)} prompts are defined")
    return mixed[:n]


# ---------------------------------------------------------------------------------------------------- models
def resolve_model_dir(key: str) -> Path:
    if key == "smollm2":
        from adainfer_hf import default_model_dir

        return Path(default_model_dir())
    from benchmarks.common.real_models import model_dir

    return Path(model_dir(key))


def shipped_dir() -> Path | None:
    """The SmolLM2 classifier shipped in the package (None when absent)."""
    from adainfer_hf.models.default_model import shipped_classifier_dir

    return shipped_classifier_dir()


def dense_config(model, max_new: int, tokenizer, **extra):
    """The model's generation config, greedy, exactly ``max_new`` tokens (no EOS stop)."""
    gc = copy.deepcopy(model.generation_config)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gc.update(do_sample=False, eos_token_id=None, pad_token_id=pad, max_new_tokens=max_new, min_new_tokens=None,
              temperature=None, top_p=None, top_k=None, **extra)
    return gc


# ---------------------------------------------------------------------------------------------------- methods
class Method:
    """One decoding configuration: ``run(ids, n) -> (tokens [n] list, layers per token list or None, extra)``."""

    def __init__(self, name, family, run, info=None):
        self.name, self.family, self.run, self.info = name, family, run, info or {}


def hf_method(model, tokenizer):
    def run(ids, n):
        out = model.generate(ids, generation_config=dense_config(model, n, tokenizer))
        return out[0, ids.shape[1]:].tolist(), None, {}

    return Method("hf", "hf", run, {"class": type(model).__name__})


def econ_methods(model, thresholds, min_layer):
    import economize
    from economize.techniques.dynamic_depth import CalmConfig

    plain = economize.apply(model)  # no technique: economize's decoding loop alone
    calm = economize.apply(model, CalmConfig(confidence="softmax", threshold=1.0, min_layer=min_layer))
    technique = calm.techniques["calm"]
    num_layers = calm.adapter.num_layers

    def run_plain(ids, n):
        return plain.decode(ids[0], n).tokens.view(-1).tolist(), None, {}

    methods = [Method("econ-plain", "economize", run_plain, {"technique": None})]
    for t in thresholds:
        config = dataclasses.replace(technique.config, threshold=float(t))

        def run(ids, n, config=config):
            technique.config = config
            result = calm.decode(ids[0], n)
            tokens = result.tokens.view(-1).tolist()
            meter = technique.last_policy.meter
            decode = meter.per_layer("decode")  # [L, 3]: entered, ran, K/V filled per layer, decode passes only
            passes = int(decode[0, 0])
            ran = int(decode[:, 1].sum())
            filled = int(decode[:, 2].sum())
            head = float(meter.extra.get("confidence_head_tokens", 0.0))
            # the first generated token comes from the prompt pass, which CALM always runs to the last layer
            extra = {"mean_layers": (num_layers + ran) / (1 + passes), "kv_fill_per_token": filled / len(tokens),
                     "head_calls_per_token": head / len(tokens), "decode_passes": passes}
            return tokens, None, extra

        never = t >= 1.0
        methods.append(Method(f"econ-calm@{t:g}" + (" (never exits)" if never else ""), "economize", run,
                              {"config": dataclasses.asdict(config)}))
    return methods


def ada_methods(path, tokenizer, model_type, thresholds, min_layer, prompt_threshold, classifiers=()):
    import adainfer_hf
    from adainfer_hf import ExitClassifier, GapThresholdRule

    cls_name = ADAINFER_CLASSES.get(model_type)
    cls = getattr(adainfer_hf, cls_name, None) if cls_name else None
    if cls is None:
        print(f"[skip] adainfer_hf {importlib.metadata.version('adainfer-hf')} has no AdaInfer class for "
              f"model_type {model_type!r} (looked for {cls_name or 'nothing'}); only HF vs economize run.")
        return [], None
    model = cls.from_pretrained(str(path), dtype=torch.float32, exit_classifier=None).eval()
    num_layers = model.config.num_hidden_layers
    policies = {}
    shipped = shipped_dir() if model_type == "llama" else None
    if shipped is not None:
        clf = ExitClassifier.from_pretrained(shipped)
        try:
            clf.validate_for(model)
            policies["ada-shipped"] = clf
            policies["ada-shipped-checks"] = clf.replace(check_layers=None, decode_check_layers=None)
        except ValueError as err:
            print(f"[skip] shipped classifier does not fit this model: {err}")
    for spec in classifiers:  # NAME=DIR: calibrated classifiers saved by benchmarks.quality.gate_real --save-dir
        name, _, directory = spec.partition("=")
        clf = ExitClassifier.from_pretrained(directory)
        clf.validate_for(model)
        policies[f"ada-{name}"] = clf
    rule_layers = tuple(range(min_layer, num_layers))

    def gap(t, **schedule):
        rule = GapThresholdRule(feature_index=0, threshold=float(t)).fit(np.zeros((1, 2)))
        return ExitClassifier(rule, features=("gap", "top_prob"), min_layer=min_layer, **schedule)

    for t in thresholds:
        if t < 1.0:
            policies[f"ada-gap@{t:g}"] = gap(t, check_layers=(), decode_check_layers=rule_layers)
    if prompt_threshold is not None:
        policies[f"ada-gap@{prompt_threshold:g}+prompt"] = gap(prompt_threshold)

    methods = []
    for name, policy in policies.items():
        def run(ids, n, policy=policy):
            gc = dense_config(model, n, tokenizer, return_dict_in_generate=True)
            out = model.generate(ids, generation_config=gc, exit_policy=policy, exit_cache="propagate")
            layers = out.exit_layers[0].tolist()
            return out.sequences[0, ids.shape[1]:].tolist(), layers, {"mean_layers": sum(layers) / len(layers)}

        info = {"class": cls.__name__, "exit_cache": "propagate", "policy": repr(policy),
                "prompt_checks": policy.layers_to_check(num_layers, decode=False),
                "decode_checks": policy.layers_to_check(num_layers, decode=True)}
        methods.append(Method(name, "adainfer", run, info))
    return methods, model


# ---------------------------------------------------------------------------------------------------- metrics
def agreement(ref: list[int], got: list[int]) -> tuple[int, int]:
    """(common prefix length, equal positions) of two generations; missing positions count as different."""
    prefix = 0
    for a, b in zip(ref, got, strict=False):
        if a != b:
            break
        prefix += 1
    return prefix, sum(a == b for a, b in zip(ref, got, strict=False))


def median(xs):
    return statistics.median(xs) if xs else float("nan")


@torch.no_grad()
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2 (default) or a key of benchmarks/common/real_models.py")
    p.add_argument("--prompts", type=int, default=12)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--thresholds", default="1.0,0.95,0.9,0.8",
                   help="CALM thresholds (economize; ours uses those < 1 for the gap rule)")
    p.add_argument("--min-layer", type=int, default=1, help="first layer after which a token may exit (both)")
    p.add_argument("--prompt-threshold", type=float, default=0.9,
                   help="gap rule also run with the package's default schedule (prompt step may exit); -1: skip")
    p.add_argument("--no-adainfer", action="store_true", help="HF vs economize only")
    p.add_argument("--exit-classifier", action="append", default=[], metavar="NAME=DIR",
                   help="also run this calibrated classifier (e.g. one gate_real.py --save-dir wrote); repeatable")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    p.add_argument("--seed", type=int, default=0)
    add_result_arguments(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    thresholds = [float(t) for t in args.thresholds.split(",") if t.strip()]
    prompt_threshold = None if args.prompt_threshold < 0 else args.prompt_threshold

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    dense = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    model_type = dense.config.model_type
    num_layers = dense.config.num_hidden_layers
    print(f"model {args.model}: {type(dense).__name__} ({model_type}, {num_layers} layers) from {path}")

    methods = [hf_method(dense, tokenizer)]
    # CALM attaches no hooks and rewrites no weights: the economize wrappers share the dense model's modules.
    methods += econ_methods(dense, thresholds, args.min_layer)
    skipped = None
    if args.no_adainfer:
        skipped = "--no-adainfer"
    else:
        ada, ada_model = ada_methods(path, tokenizer, model_type, thresholds, args.min_layer, prompt_threshold,
                                     args.exit_classifier)
        methods += ada
        if not ada:
            skipped = f"adainfer_hf has no class for model_type {model_type!r}"

    prompts = build_prompts(args.prompts, args.seed)
    encoded = [tokenizer(text, return_tensors="pt").input_ids for _, text in prompts]
    n_new = args.max_new_tokens
    print(f"{len(prompts)} prompts ({min(e.shape[1] for e in encoded)}-{max(e.shape[1] for e in encoded)} "
          f"tokens) x {n_new} new tokens, {args.repeats} repeats, {args.threads} thread(s)")

    for m in methods:  # warm-up: one short call each
        m.run(encoded[0], 4)

    seconds = {m.name: [] for m in methods}
    outputs: dict[str, list] = {}
    extras: dict[str, list] = {}
    deterministic = {m.name: True for m in methods}
    for r in range(args.repeats):
        order = methods[r % len(methods):] + methods[:r % len(methods)]
        for m in order:
            total, toks, ext = 0.0, [], []
            for ids in encoded:
                t0 = time.perf_counter()
                tokens, layers, extra = m.run(ids, n_new)
                total += time.perf_counter() - t0
                if len(tokens) != n_new:
                    raise RuntimeError(f"{m.name} generated {len(tokens)} tokens, expected {n_new}")
                toks.append(tokens)
                ext.append({"layers": layers, **extra})
            seconds[m.name].append(total)
            if m.name in outputs:
                deterministic[m.name] &= outputs[m.name] == toks
            else:
                outputs[m.name], extras[m.name] = toks, ext
            print(f"  repeat {r + 1}/{args.repeats} {m.name:<28} {total:8.2f} s", flush=True)

    ref = outputs["hf"]
    hf_s = median(seconds["hf"])
    rows = []
    for m in methods:
        got = outputs[m.name]
        pre = eq = 0
        per_prompt = []
        for (name, _), a, b, e in zip(prompts, ref, got, extras[m.name], strict=True):
            pp, ee = agreement(a, b)
            pre, eq = pre + pp, eq + ee
            per_prompt.append({"prompt": name, "prefix": pp, "equal": ee, "tokens": b, **e})
        total_tokens = n_new * len(prompts)
        means = [e["mean_layers"] for e in extras[m.name] if "mean_layers" in e]
        layers = statistics.fmean(means) if means else float(num_layers)
        row = {"method": m.name, "family": m.family, "prefix_agreement": pre / total_tokens,
               "overall_agreement": eq / total_tokens,
               "identical_prompts": sum(p["prefix"] == n_new for p in per_prompt),
               "mean_layers": layers, "seconds_median": median(seconds[m.name]), "seconds": seconds[m.name],
               "x_hf": median(seconds[m.name]) / hf_s, "x_hf_min": min(seconds[m.name]) / min(seconds["hf"]),
               "deterministic": deterministic[m.name],
               "info": m.info, "per_prompt": per_prompt}
        for key in ("kv_fill_per_token", "head_calls_per_token"):
            vals = [e[key] for e in extras[m.name] if key in e]
            if vals:
                row[key] = statistics.fmean(vals)
        rows.append(row)

    print(f"\n{args.model}: {len(prompts)} prompts x {n_new} tokens, median of {args.repeats} (HF generate "
          f"{hf_s:.2f} s); agreement vs dense greedy")
    head = (f"{'method':<28} {'prefix':>7} {'overall':>7} {'same':>5} {'layers':>7} {'kv fill':>7} "
            f"{'head':>5} {'seconds':>8} {'x HF':>6} {'min':>5}")
    print(head)
    print("-" * len(head))
    for row in rows:
        kv = f"{row['kv_fill_per_token']:7.2f}" if "kv_fill_per_token" in row else f"{'':>7}"
        hc = f"{row['head_calls_per_token']:5.1f}" if "head_calls_per_token" in row else f"{'':>5}"
        print(f"{row['method']:<28} {row['prefix_agreement']:7.3f} {row['overall_agreement']:7.3f} "
              f"{row['identical_prompts']:>2}/{len(prompts):<2} {row['mean_layers']:7.2f} {kv} {hc} "
              f"{row['seconds_median']:8.2f} {row['x_hf']:6.2f} {row['x_hf_min']:5.2f}")
    if skipped:
        print(f"AdaInfer skipped: {skipped}")
    bad = [name for name, ok in deterministic.items() if not ok]
    if bad:
        print(f"warning: tokens differed between repeats for {bad}")

    versions = {}
    for dist in ("torch", "transformers", "economize", "adainfer-hf", "numpy", "scikit-learn"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    result = {
        "benchmark": "peer_economize", "model": args.model, "model_dir": scrub_path(path), "model_type": model_type,
        "num_layers": num_layers,
        "settings": {"prompts": len(prompts), "max_new_tokens": n_new, "repeats": args.repeats,
                     "threads": args.threads, "thresholds": thresholds, "min_layer": args.min_layer,
                     "prompt_threshold": prompt_threshold, "batch_size": 1, "dtype": "float32", "greedy": True,
                     "eos_stops": False, "seed": args.seed},
        "adainfer_skipped": skipped, "prompts": [{"name": n, "text": t} for n, t in prompts],
        "versions": versions, "platform": platform.platform(), "python": platform.python_version(),
        "dense_tokens": ref, "results": rows,
    }
    from adainfer_hf import ExitClassifier

    configs = classifier_configs(args.exit_classifier, [ExitClassifier.from_pretrained(spec.partition("=")[2])
                                                        for spec in args.exit_classifier])
    save_result(args, args.model, "peer_economize", result, argv, classifiers=configs)


if __name__ == "__main__":
    main()
