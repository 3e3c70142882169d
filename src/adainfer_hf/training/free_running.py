"""Calibrating exits on what `generate` produces: free-running generations compared with the dense model's.

Teacher-forced calibration (`collect_generation_features` + `calibrate`) certifies each token given the dense
model's prefix. In a free-running generation one changed token changes the prefix of every later one, so the text
can drift much further from dense than that per-token bound says (on the real models in the README: per-token
agreement 0.95-0.98 in calibration, 0.34-0.66 of the positions of 64-token generations). This module certifies
what users see instead:

* the loss of one generation is the share of its `new_tokens` tokens from the first one that differs from the
  dense model's greedy continuation on (0: identical; 1: the first token already differs);
* candidate rules, ordered from the most to the least conservative before any calibration prompt is seen
  (`candidate_ladder`: the classifier calibrated teacher-forced on another table, and the same rule made stricter
  and stricter until it exits on a few confident tokens only), are tested in that order by generating with each
  (fixed-sequence Learn-then-Test: Hoeffding-Bentkus p-value of H0 "expected loss > 1 - target" over the
  generations, each test at level `delta`, stopping at the first that fails);
* the result is the last candidate that passed, or a classifier that never exits (empty schedules: the stock
  code path) when the first one fails.

So with probability at least `1 - delta` over the calibration prompts, the expected share of a generation that
equals dense before its first change is at least the target, for prompts like them and the same `new_tokens`,
cache option and batch size.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..artifact.config import jsonable
from ..cache.exact import CACHE_MODES
from ..policy.classifier import ExitClassifier
from ..utils.distributed import shard_results
from ..utils.stats import hb_p_value, hb_upper_bound
from ..utils.tokenizers import left_padding
from .calibrate import best_unit_scores, calibrate, simulate_exits
from .table import FeatureTable

__all__ = ["FreeRunning", "calibrate_free_running", "candidate_ladder", "prefix_losses"]


@dataclass(frozen=True)
class FreeRunning:
    """What free-running calibration generates on (`train.train_on_tables(..., free_running=FreeRunning(...))`).

    Args:
        tokenizer: the model's tokenizer.
        prompts (`Sequence[str | data.Prompt]`): calibration prompts, disjoint from the training table's.
        new_tokens (`int`, *optional*, defaults to 32), exit_cache (`str`, *optional*, defaults to `"propagate"`),
        batch_size (`int`, *optional*, defaults to 8): see [`calibrate_free_running`].
        levels (`int`, *optional*, defaults to 6): candidates of the ladder at most (see [`candidate_ladder`]).
        distributed (`bool`, *optional*, defaults to `False`): share the generations over the processes of an
            initialized `torch.distributed` group (see [`calibrate_free_running`]); every process must then use it.

    The dense model's continuations of `prompts` are generated once per model ([`FreeRunning.reference`]), so one
    `FreeRunning` shared by several `train_on_tables` calls (rules, targets) generates the reference once.
    """

    tokenizer: Any
    prompts: Sequence
    new_tokens: int = 32
    exit_cache: str = "propagate"
    batch_size: int = 8
    levels: int = 6
    distributed: bool = False
    _references: Any = field(default_factory=weakref.WeakKeyDictionary, init=False, repr=False, compare=False)

    def __post_init__(self):  # refuse a bad setting before any collection or training starts
        _check_settings("FreeRunning ", self.new_tokens, self.batch_size, self.exit_cache, levels=self.levels)
        if not self.prompts:
            raise ValueError("FreeRunning got no prompts.")

    def reference(self, model) -> torch.Tensor:
        """The dense model's greedy continuations `[len(prompts), new_tokens]` of `prompts` on `model`,
        generated on the first call for that model (batched by `batch_size`) and kept while the model lives."""
        if model not in self._references:
            texts = [getattr(p, "text", p) for p in self.prompts]
            self._references[model] = _continuations(model, self.tokenizer, texts, self.new_tokens,
                                                      self.batch_size, None, self.exit_cache, self.distributed)[0]
        return self._references[model]


def _check_counts(who: str, **counts) -> None:
    """Each of `counts` must be an int >= 1 (`who` prefixes the messages)."""
    for name, value in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{who}{name} must be an int >= 1; got {value!r}.")


def _check_settings(who: str, new_tokens, batch_size, exit_cache, **counts) -> None:
    """The generation settings both entry points take (`who` prefixes the messages)."""
    _check_counts(who, new_tokens=new_tokens, batch_size=batch_size, **counts)
    if exit_cache not in CACHE_MODES:
        raise ValueError(f"{who}exit_cache={exit_cache!r} is not supported; expected one of {list(CACHE_MODES)}.")


def candidate_ladder(classifier: ExitClassifier, table: FeatureTable, target_agreement: float, levels: int = 6,
                     delta: float = 0.1, knob: str = "classifier", min_layers=None,
                     finish=None) -> list[ExitClassifier]:
    """Candidates for [`calibrate_free_running`], from the most to the least conservative.

    The least conservative is `classifier` calibrated teacher-forced on `table` at the per-token target
    (`calibrate.calibrate`, which certifies it per token). The `levels - 1` others are the same rule with its knob
    (the classifier's threshold, or the gate's offset with `knob="gate"`) raised until it exits on about
    `1/2, 1/4, ..., 1/2**(levels - 1)` of the tokens it exits on in `table`: on few training generations a per-token
    guarantee cannot certify any exit at a stricter target, while these rungs still exit on a few confident
    tokens, and the free-running test is what certifies whichever is chosen. Rungs that would exit on no token or
    repeat the previous one are left out, so the ladder can be shorter than `levels`; it is `[calibrated]` when
    the calibrated rule never exits.

    `table` must not hold the prompts the candidates are then tested on (the order has to be fixed before they are
    seen); the classifier's training table is the natural choice. `knob` and `min_layers` are `calibrate`'s;
    `finish(clf)`, if given, is applied to each candidate (e.g. choosing its check schedules).
    """
    _check_counts("", levels=levels)
    if not 0.0 < target_agreement < 1.0:
        raise ValueError(f"target_agreement must lie in (0, 1); got {target_agreement!r}.")
    base = calibrate(classifier, table, target_agreement=target_agreement, delta=delta, knob=knob,
                     min_layers=min_layers)
    rungs = [base]
    if not base.calibration["never_exit"]:
        rungs = [*_stricter(classifier, base, table, knob, levels), base]
    return rungs if finish is None else [finish(c) for c in rungs]


def _stricter(classifier: ExitClassifier, base: ExitClassifier, table: FeatureTable, knob: str,
              levels: int) -> list[ExitClassifier]:
    """`base` with its knob raised so that it exits on about 1/2**k of its exiting units, k = levels-1 .. 1."""
    best = best_unit_scores(classifier, base, table, knob)
    cal = base.calibration
    base_value = cal["threshold"] if knob == "classifier" else cal["gate_offset"]
    ranked = np.sort(best[best >= base_value])[::-1]
    out, previous = [], None
    for k in range(levels - 1, 0, -1):
        count = int(round(ranked.size / 2 ** k))
        if count < 1 or count == previous or not np.isfinite(ranked[count - 1]):
            continue  # (an infinite score: a layer without a probe, where no offset makes the rule stricter)
        previous, value = count, float(ranked[count - 1])
        rung = base.replace(threshold=value) if knob == "classifier" else base.replace(
            gate=classifier.gate.shifted(value))
        exit_layer, summary = simulate_exits(rung, table)
        figures = {key: v for key, v in summary.items() if key != "per_task"}
        early = int((exit_layer < summary["num_layers"]).sum())
        errors = int(round((1.0 - summary["agreement"]) * summary["n"]))
        record = {**cal, **figures, "early_exits": early, "errors": errors, "risk_upper_bound": None,
                  ("threshold" if knob == "classifier" else "gate_offset"): value,
                  "ladder": {"rung": len(out) + 1, "of_calibrated_exits": 2.0 ** -k, "knob_value": value,
                             "calibrated_knob_value": base_value, "certified_per_token": False}}
        record["conclusion"] = (
            f"Ladder rung: the calibrated rule with its {knob} knob raised from {base_value:.4g} to {value:.4g}, "
            f"exiting on {early} of the {ranked.size} tokens it exits on in the table ({summary['mean_exit_layer']:.2f}"
            f" layers per token, agreement {summary['agreement']:.1%}); not certified per token, only by the "
            "free-running test.")
        out.append(rung.replace(calibration=jsonable(record)))
    return out


def prefix_losses(reference: torch.Tensor, generated: torch.Tensor) -> np.ndarray:
    """Per row, the share of the generated tokens from the first that differs from `reference` on ([B, N] each)."""
    if reference.shape != generated.shape:
        raise ValueError(f"reference {tuple(reference.shape)} and generated {tuple(generated.shape)} tokens differ "
                         "in shape.")
    same = (reference.cpu() == generated.cpu()).long()
    prefix = same.cumprod(-1).sum(-1)
    return (1.0 - prefix.double() / reference.shape[-1]).numpy()


def _never_exits(clf: ExitClassifier, num_layers: int) -> bool:
    return not clf.layers_to_check(num_layers) and not clf.layers_to_check(num_layers, decode=True)


def _continuations(model, tokenizer, texts, new_tokens, batch_size, policy, exit_cache, distributed=False):
    """Greedy continuations `[P, new_tokens]` of `texts` (batched, left-padded) and the mean layers a generated
    token ran; `policy=None` is the dense model. With `distributed` the batches are shared over the processes and
    every process gets all the results (the same batches as one process, so the same tokens)."""
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
               pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True,
               exit_policy=policy)  # None: dense, even when the model carries a classifier
    if policy is not None:
        gen.update(exit_cache=exit_cache)

    def run(batch):
        enc = tokenizer(batch, return_tensors="pt", padding=True).to(model.device)
        out = model.generate(**enc, **gen)
        return out.sequences[:, enc["input_ids"].shape[1]:].cpu(), out.exit_layers.float().reshape(-1).cpu()

    batches = [texts[i:i + batch_size] for i in range(0, len(texts), batch_size)]
    with left_padding(tokenizer), torch.no_grad():
        results = [r for _, r in shard_results(run, batches, distributed=distributed, everywhere=True)]
    return torch.cat([t for t, _ in results]), float(torch.cat([layers for _, layers in results]).mean())


def _check_args(model, tokenizer, texts, candidates, target_agreement, delta, new_tokens, exit_cache, batch_size):
    if not hasattr(model, "set_exit_classifier"):
        raise TypeError(f"calibrate_free_running needs an AdaInfer model class; got {type(model).__name__}.")
    if not texts:
        raise ValueError("calibrate_free_running got no prompts.")
    if not candidates or not all(isinstance(c, ExitClassifier) for c in candidates):
        raise ValueError(f"candidates must be a non-empty sequence of ExitClassifier; got {candidates!r}.")
    for name, value in (("target_agreement", target_agreement), ("delta", delta)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} must lie in (0, 1); got {value!r}.")
    _check_settings("", new_tokens, batch_size, exit_cache)
    if tokenizer.pad_token_id is None and len(texts) > 1 and batch_size > 1:
        raise ValueError("the tokenizer has no pad token, which batched generation needs; set "
                         "tokenizer.pad_token (e.g. to its eos token) or pass batch_size=1.")


def calibrate_free_running(model, tokenizer, prompts, candidates: Sequence[ExitClassifier],
                           target_agreement: float = 0.9, delta: float = 0.1, new_tokens: int = 32,
                           exit_cache: str = "propagate", batch_size: int = 8,
                           reference: torch.Tensor | None = None, distributed: bool = False) -> ExitClassifier:
    """Chooses the least conservative of `candidates` whose free-running generations stay equal to dense for at
    least `target_agreement` of their tokens, in expectation, with confidence `1 - delta` (see the module
    docstring).

    Args:
        model: an AdaInfer model; tokenizer: its tokenizer.
        prompts (`Sequence[str | data.Prompt]`): calibration prompts (texts or `Prompt`s), not used to build
            `candidates`.
        candidates (`Sequence[ExitClassifier]`): ordered from the most to the least conservative (e.g.
            [`candidate_ladder`]).
        target_agreement (`float`, *optional*, defaults to 0.9): the certified expected share of a generation's
            tokens before its first difference from dense.
        delta (`float`, *optional*, defaults to 0.1): allowed failure probability of the guarantee.
        new_tokens (`int`, *optional*, defaults to 32): tokens generated per prompt (EOS does not stop early).
        exit_cache (`str`, *optional*, defaults to `"propagate"`): the cache option generation will use.
        batch_size (`int`, *optional*, defaults to 8): prompts per `generate` call.
        reference (`torch.Tensor`, *optional*): the dense model's greedy continuations `[len(prompts),
            new_tokens]` of these prompts at this `batch_size`, if already generated ([`FreeRunning.reference`]);
            generated here otherwise.
        distributed (`bool`, *optional*, defaults to `False`): under `accelerate launch` (an initialized
            `torch.distributed` group), every process calls this with the same arguments and generates its share
            of the batches; the tokens are gathered on every process, so each scores every generation and all
            agree on the tests and the choice (the one-process result: the batches are the same).

    Returns:
        [`ExitClassifier`]: the chosen candidate, bound to `model`, with `calibration["free_running"]` (each test's
        mean loss, p-value and layers per token) and a conclusion; if the first candidate fails, that candidate
        with empty schedules (it never exits).
    """
    texts = [getattr(p, "text", p) for p in prompts]
    candidates = list(candidates)
    _check_args(model, tokenizer, texts, candidates, target_agreement, delta, new_tokens, exit_cache, batch_size)
    L, n, alpha = model.config.num_hidden_layers, len(texts), 1.0 - target_agreement
    if reference is None:
        reference, _ = _continuations(model, tokenizer, texts, new_tokens, batch_size, None, exit_cache, distributed)
    elif tuple(reference.shape) != (n, new_tokens):
        raise ValueError(f"reference has shape {tuple(reference.shape)}; expected ({n}, {new_tokens}): the dense "
                         "continuations of the prompts, new_tokens each.")
    tests, chosen = [], None
    for i, clf in enumerate(candidates):
        clf = candidates[i] = clf.bind(model)
        if _never_exits(clf, L):
            losses, layers = np.zeros(n), float(L)  # the stock code path: the dense tokens themselves
        else:
            generated, layers = _continuations(model, tokenizer, texts, new_tokens, batch_size, clf, exit_cache,
                                               distributed)
            losses = prefix_losses(reference, generated)
        p = hb_p_value(float(losses.mean()), n, alpha)
        tests.append({"candidate": i, "mean_loss": float(losses.mean()), "p_value": p, "passed": p <= delta,
                      "loss_upper_bound": hb_upper_bound(float(losses.mean()), n, delta), "mean_layers": layers})
        if p > delta:
            break
        chosen = i
    return _result(candidates, chosen, tests, model, dict(
        target_agreement=target_agreement, delta=delta, new_tokens=new_tokens, exit_cache=exit_cache,
        batch_size=batch_size, n_generations=n, loss="share of a generation's tokens from its first difference "
        "from the dense greedy continuation on", procedure="fixed-sequence Learn-then-Test over the candidates, "
        "Hoeffding-Bentkus p-values over generations"))


def _result(candidates, chosen, tests, model, figures) -> ExitClassifier:
    """The chosen candidate (or the first one with empty schedules) with the free-running figures recorded."""
    target, n = figures["target_agreement"], figures["n_generations"]
    figures = {**figures, "tests": tests, "chosen": chosen}
    if chosen is None:
        clf = candidates[0].replace(check_layers=[], decode_check_layers=None)
        first = tests[0]
        conclusion = (f"Free-running: even the most conservative candidate changed {first['mean_loss']:.1%} of "
                      f"its generations' tokens on average (from the first difference on; {n} generations of "
                      f"{figures['new_tokens']} tokens), more than certifiable for target {target:.1%}, so the "
                      "calibrated classifier never exits.")
    elif _never_exits(candidates[chosen], model.config.num_hidden_layers) and tests[-1]["passed"]:
        clf = candidates[chosen]
        conclusion = "Free-running: no candidate exits (each one's schedules are empty), so the classifier never exits."
    elif _never_exits(candidates[chosen], model.config.num_hidden_layers):
        clf, failed = candidates[chosen], tests[-1]
        conclusion = (f"Free-running: the candidates that pass never exit; the first that exits (candidate "
                      f"{failed['candidate'] + 1} of {len(candidates)}, {failed['mean_layers']:.2f} layers per "
                      f"token) changed {failed['mean_loss']:.1%} of its generations' tokens on average ({n} "
                      f"generations of {figures['new_tokens']} tokens), more than certifiable for target "
                      f"{target:.1%}, so the calibrated classifier never exits.")
    else:
        clf, test = candidates[chosen], tests[chosen]
        conclusion = (f"Free-running: {n} generations of {figures['new_tokens']} tokens ({figures['exit_cache']} "
                      f"cache) kept {1 - test['mean_loss']:.1%} of their tokens before the first difference from "
                      f"dense on average (certified >= {1 - test['loss_upper_bound']:.1%}, target {target:.1%}), "
                      f"after {test['mean_layers']:.2f} of {model.config.num_hidden_layers} layers per token; "
                      f"candidate {chosen + 1} of {len(candidates)}.")
    calibration = dict(clf.calibration) if isinstance(clf.calibration, dict) else {}
    calibration["teacher_forced_conclusion"] = calibration.get("conclusion")
    calibration.update(free_running=figures, conclusion=conclusion)
    return clf.replace(calibration=calibration).bind(model)
