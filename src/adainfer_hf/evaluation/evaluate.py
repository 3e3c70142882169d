"""Paper-style evaluation: accuracy, layers, FLOPs and wall-clock of early exit against dense and the baselines.

Methods (`EVAL_METHODS`, built by `baselines.prepare_baselines`), all run for real on the same prompts and batches:

- `dense`: full depth. `adainfer`: the given `ExitClassifier`. `gap`: the paper's rule "exit once `gap > 0.8`"
  (`rules.GapThresholdRule` in an `ExitClassifier`).
- `crf`: a CRF over the layer sequence decided *live*: [`LiveCRFPolicy`] keeps each row's feature history in the
  decoder loop's per-forward state and fires on P(exit at k | layers 1..k), the score calibration used.
- `shortgpt`: the model without its lowest-Block-Influence layers (`shortgpt.prune_layers`: they are not run).
- `oracle`: each prompt exits at the earliest layer whose logit-lens top-1 equals the dense top-1 and stays so to
  the last layer (read off a dense all-layers pass), run through `ScriptedExit` so its wall-clock is real.

Per task x shots x method: top-1 accuracy (first token == the gold answer's first token, as the paper scores),
exact match of a greedy generation (every step with the method, up to a newline or `max_new_tokens`), mean and
variance of the first token's exit layer, pruning ratio, the paper's FLOPs ratio, and wall-clock seconds of the
first-token forward of the same batches for the method and for dense, measured interleaved in one run (the order of
dense and the methods rotates from batch to batch so warm-up and drift are shared).

Everything is accumulated as sums ([`evaluate_prompts`] returns a JSON-able *shard*), so shards of several
processes merge exactly (`report.merge_shards`); `report.finalize_results` turns sums into `results.json` records.
Generalization studies (intra-task, inter-task, leave-one-task-out, inter-model) are in `adainfer_hf.study`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..architectures.registry import spec_for
from ..policy.base import ScriptedExit
from ..training.calibrate import simulate_exits
from ..training.collect import collect_features
from ..utils.tokenizers import left_padding
from .baselines import (
    CURVE_FEATURES,
    EVAL_METHODS,
    SWEEP_TARGETS,
    Baselines,
    LiveCRFPolicy,
    gap_rule_classifier,
    lens_top_tokens,
    oracle_exit_layers,
    prepare_baselines,
)
from .report import finalize_results

__all__ = [  # the baselines' names are re-exported: `from adainfer_hf.evaluate import prepare_baselines` works
    "EVAL_METHODS", "SWEEP_TARGETS", "Baselines", "LiveCRFPolicy", "evaluate", "evaluate_prompts", "flops_ratio",
    "gap_rule_classifier", "lens_top_tokens", "oracle_exit_layers", "prepare_baselines",
]
_SUMS = ("n", "correct", "agree", "em", "em_n", "layers", "layers_sq", "flops", "flops_checks", "checks", "seconds",
         "dense_seconds")


# ---------------------------------------------------------------------------------------------------- formulas
def flops_ratio(layers_run, num_layers: int, hidden_size: int, seq_len, vocab_size: int, heads=1) -> np.ndarray:
    """The paper's FLOPs ratio `(2 l'(6h + s) + V) / (2 l (6h + s) + V)` per example.

    `2 l (6h + s) + V` is a token's forward FLOPs divided by `2h` (`24 l h^2 + 4 l s h` in the layers plus `2 h V`
    in the LM head). With `heads` > 1 the numerator counts `heads` LM-head evaluations instead of one: the cost of
    the logit-lens checks an early-exit classifier makes, which the paper's formula leaves out.

    Args:
        layers_run (array-like): decoder layers run `l'` per example. num_layers (`int`): `l = L`.
        hidden_size (`int`): `h`. seq_len (array-like): `s` per example. vocab_size (`int`): `V`.
        heads (array-like, *optional*, defaults to 1): LM-head evaluations per example.
    """
    lr, s = np.asarray(layers_run, dtype=np.float64), np.asarray(seq_len, dtype=np.float64)
    per_layer = 2.0 * (6.0 * hidden_size + s)
    return (lr * per_layer + vocab_size * np.asarray(heads, np.float64)) / (num_layers * per_layer + vocab_size)


# ---------------------------------------------------------------------------------------------------- running
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _NewlineStop:
    """Generation stopping criterion: a row is done once it emitted a token whose text holds a newline."""

    def __init__(self, tokenizer, vocab_size: int):
        n = max(vocab_size, len(tokenizer))
        texts = tokenizer.batch_decode([[i] for i in range(n)])
        self.has_newline = torch.tensor(["\n" in t for t in texts], dtype=torch.bool)

    def __call__(self, input_ids, scores, **kwargs):
        last = input_ids[:, -1].cpu().clamp(0, self.has_newline.numel() - 1)
        return self.has_newline[last].to(input_ids.device)


def _heads(policy, exit_layers: np.ndarray, L: int) -> np.ndarray:
    """LM-head evaluations per row: the policy's checks up to its exit, plus the final head when it did not exit."""
    checks = np.asarray(policy.layers_to_check(L) if policy is not None else [], dtype=np.int64)
    n_checks = (checks[None, :] <= np.minimum(exit_layers, L - 1)[:, None]).sum(1) if checks.size else 0
    return n_checks + (exit_layers >= L)


def _new_sums(L: int) -> dict:
    return {**dict.fromkeys(_SUMS, 0.0), "hist": [0] * (L + 1)}


def evaluate_prompts(model, tokenizer, prompts, baselines: Baselines, methods: Sequence[str] = EVAL_METHODS,
                     batch_size: int = 8, max_new_tokens: int = 8, timing_repeats: int = 1,
                     progress: bool = True) -> dict:
    """Evaluates `prompts` with every method; returns a shard of sums (see `report.merge_shards`).

    Prompts are grouped by (task, shots); within a group, batches of similar length run every method and dense
    back to back (order rotating per batch); each timed forward is repeated `timing_repeats` times and the fastest
    counts. Oracle layers, logit-lens curves and the calibration sweep come from one all-layers pass per group
    (`collect.collect_features`).
    """
    if not isinstance(timing_repeats, int) or timing_repeats < 1:
        raise ValueError(f"timing_repeats must be an int >= 1; got {timing_repeats!r}.")
    methods = [m for m in EVAL_METHODS if m in methods]
    L, cfg = spec_for(model).num_layers(model), model.config
    device = next(model.parameters()).device
    shard = {"num_layers": L, "groups": {}, "curves": {}, "sweep": {}}
    groups: dict[tuple[str, int], list] = {}
    for p in prompts:
        groups.setdefault((p.task, int(p.shots)), []).append(p)
    stop = _NewlineStop(tokenizer, cfg.vocab_size) if max_new_tokens > 0 else None
    feats = tuple(dict.fromkeys((*CURVE_FEATURES, *[f for _, c in baselines.sweep for f in c.features])))
    rotation = 0
    with left_padding(tokenizer):
        for (task, shots), group in groups.items():
            gkey = f"{task}\t{shots}"
            table = collect_features(model, tokenizer, group, features=feats, batch_size=batch_size, progress=False)
            _add_curves(shard["curves"], gkey, table, L)
            oracle = oracle_exit_layers(table)
            lengths = np.array([len(tokenizer(p.text)["input_ids"]) for p in group])
            for target, clf in baselines.sweep:
                exit_layer, _ = simulate_exits(clf, table)
                _add_sweep(shard["sweep"], f"{gkey}\t{target}", clf, table, exit_layer, lengths, cfg, L)
            sums = {m: shard["groups"].setdefault(f"{gkey}\t{m}", _new_sums(L)) for m in methods}
            order = np.argsort(lengths, kind="stable")
            batches = [order[i:i + batch_size] for i in range(0, len(group), batch_size)]
            for b, idx in enumerate(tqdm(batches, desc=f"{task} {shots}-shot", disable=not progress)):
                # The run order rotates with a counter over all batches (not per group, which may have only one
                # or two batches), so every method runs in every position about equally often.
                _run_batch(model, tokenizer, [group[i] for i in idx], table.gold_token[idx], oracle[idx], baselines,
                           methods, sums, b, rotation, device, stop, max_new_tokens, L, timing_repeats)
                rotation += 1
    return shard


def _run_batch(model, tokenizer, prompts, gold, oracle, baselines, methods, sums, b, rotation, device, stop,
               max_new, L, repeats):
    cfg = model.config
    enc = {k: v.to(device) for k, v in tokenizer([p.text for p in prompts], return_tensors="pt",
                                                 padding=True).items()}
    seq_len = enc["attention_mask"].sum(1).cpu().numpy()

    def runner(m):
        if m == "shortgpt":
            return baselines.pruned, None
        if m == "oracle":
            return model, ScriptedExit([int(k) for k in oracle])
        return model, baselines.policies.get(m)

    runs = ["dense"] + [m for m in methods if m != "dense"]
    runs = runs[rotation % len(runs):] + runs[:rotation % len(runs)]  # no method always runs first
    tokens, layers, secs = {}, {}, {}
    with torch.no_grad():
        if b == 0:
            model(**enc, use_cache=False, logits_to_keep=1, exit_policy=None)  # warm-up, untimed
        for m in runs:
            net, policy = runner(m)
            secs[m] = float("inf")
            for _ in range(repeats):  # the fastest of `repeats` runs: robust to other processes' bursts
                _sync(device)
                t0 = time.perf_counter()
                out = net(**enc, use_cache=False, logits_to_keep=1, exit_policy=policy)
                _sync(device)
                secs[m] = min(secs[m], time.perf_counter() - t0)
            tokens[m] = out.logits[:, -1].argmax(-1).cpu().numpy()
            layers[m] = out.exit_layers.cpu().numpy().astype(np.int64)
        answers = None
        if max_new > 0:
            answers = {}
            for m in ["dense"] + [m for m in runs if m != "dense"]:
                net, policy = runner(m)
                if m == "oracle" or (policy is not None and policy.check_layers == ()):
                    # The oracle exits only where its token is dense's, and a policy that checks no layer runs
                    # exactly the dense computation: both generate dense's answer by construction.
                    answers[m] = answers["dense"]
                    continue
                gen = net.generate(**enc, exit_policy=policy, max_new_tokens=max_new, do_sample=False,
                                   stopping_criteria=[stop], pad_token_id=tokenizer.pad_token_id)
                texts = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                answers[m] = [t.split("\n")[0].strip() for t in texts]
    for m in methods:
        s, lay = sums[m], layers[m]
        policy = None if m in ("dense", "shortgpt") else runner(m)[1]
        heads = _heads(policy, lay, L) if m != "shortgpt" else np.ones_like(lay)
        s["n"] += len(prompts)
        s["correct"] += int((tokens[m] == gold).sum())
        s["agree"] += int((tokens[m] == tokens["dense"]).sum()) if "dense" in tokens else 0
        s["layers"] += float(lay.sum())
        s["layers_sq"] += float((lay.astype(np.float64) ** 2).sum())
        s["flops"] += float(flops_ratio(lay, L, cfg.hidden_size, seq_len, cfg.vocab_size).sum())
        s["flops_checks"] += float(flops_ratio(lay, L, cfg.hidden_size, seq_len, cfg.vocab_size, heads).sum())
        s["checks"] += float((heads - (lay >= L)).sum()) if m != "shortgpt" else 0.0
        s["seconds"] += secs[m]
        s["dense_seconds"] += secs["dense"]
        for k in lay.tolist():
            s["hist"][k] += 1
        if answers is not None and answers.get(m) is not None:
            s["em"] += sum(a == p.answer.strip() for a, p in zip(answers[m], prompts, strict=True))
            s["em_n"] += len(prompts)


def _add_curves(curves: dict, key: str, table, L: int) -> None:
    """Per-layer sums of one group: logit-lens accuracy / agreement with dense, mean gap and top_prob."""
    top = lens_top_tokens(table)
    c = curves.setdefault(key, {"n": 0, "lens_correct": [0] * L, "lens_agree": [0] * L,
                                "gap": [0.0] * (L - 1), "top_prob": [0.0] * (L - 1)})
    c["n"] += table.num_prompts
    for name, target in (("lens_correct", table.gold_token), ("lens_agree", table.final_token)):
        c[name] = (np.asarray(c[name]) + (top == target[:, None]).sum(0)).tolist()
    for name in CURVE_FEATURES:
        col = np.zeros(L - 1)
        np.add.at(col, table.layer - 1, table.columns([name])[:, 0].astype(np.float64))
        c[name] = (np.asarray(c[name]) + col).tolist()


def _add_sweep(sweep: dict, key: str, clf, table, exit_layer, lengths, cfg, L) -> None:
    token = lens_top_tokens(table)[np.arange(table.num_prompts), exit_layer - 1]
    s = sweep.setdefault(key, {"n": 0, "correct": 0, "agree": 0, "layers": 0.0, "flops": 0.0,
                               "_threshold": clf.threshold, "_min_layer": clf.min_layer,
                               "_never_exit": clf.check_layers == ()})
    s["n"] += table.num_prompts
    s["correct"] += int((token == table.gold_token).sum())
    s["agree"] += int((token == table.final_token).sum())
    s["layers"] += float(exit_layer.sum())
    s["flops"] += float(flops_ratio(exit_layer, L, cfg.hidden_size, lengths, cfg.vocab_size).sum())


def evaluate(model, tokenizer, prompts, calibration_prompts=(), methods: Sequence[str] = EVAL_METHODS,
             exit_classifier=None, crf_classifier=None, shortgpt_layers: int | None = None, batch_size: int = 8,
             max_new_tokens: int = 8, sweep_targets: Sequence[float] = SWEEP_TARGETS, seed: int = 0,
             progress: bool = True) -> dict:
    """Evaluates every method on `prompts` in one process and returns the `results.json` dictionary.

    Args:
        model, tokenizer: an AdaInfer model (`models.loading.load_adainfer_model`) and its tokenizer.
        prompts (`Sequence[data.Prompt]`): evaluated prompts (all tasks and shots).
        calibration_prompts (`Sequence[data.Prompt]`): held-out prompts of other examples, for the CRF, the
            calibration sweep and ShortGPT's Block Influence (see [`prepare_baselines`]).
        methods, exit_classifier, crf_classifier, shortgpt_layers, sweep_targets, seed: see [`prepare_baselines`].
        batch_size (`int`, *optional*, defaults to 8): prompts per forward pass.
        max_new_tokens (`int`, *optional*, defaults to 8): generation length for exact match (0: no generation).
        progress (`bool`, *optional*, defaults to `True`): progress bars.

    Returns:
        `dict`: `{"model", "num_layers", "methods", "results": [...], "summary": [...], "layer_curves": [...],
        "calibration_sweep": [...]}`, see `report.finalize_results`.
    """
    baselines = prepare_baselines(model, tokenizer, calibration_prompts, methods=methods,
                                  exit_classifier=exit_classifier, crf_classifier=crf_classifier,
                                  shortgpt_layers=shortgpt_layers, sweep_targets=sweep_targets, seed=seed,
                                  batch_size=batch_size, progress=progress)
    shard = evaluate_prompts(model, tokenizer, prompts, baselines, methods=methods, batch_size=batch_size,
                             max_new_tokens=max_new_tokens, progress=progress)
    name = getattr(model.config, "_name_or_path", None) or None
    return finalize_results(shard, model_name=name, methods_info=baselines.info)
