"""Calibrating an exit classifier to a quality target, with a finite-sample guarantee.

The quality of early exit is its *agreement* with the dense model: the share of prompts whose exit-layer top-1
equals the full-depth top-1. [`calibrate`] picks the firing rule (`min_layer`, `threshold` on
`ExitClassifier.score`) on a calibration [`~adainfer_hf.collect.FeatureTable`] of prompts disjoint from the
training ones, by Learn-then-Test (Angelopoulos et al., 2021): for each candidate, H0 "risk > 1 - target" is
tested with the exact binomial tail p-value; thresholds are tested in a fixed sequence from the most
conservative (highest) to the most lenient, stopping at the first non-rejection; a Bonferroni correction
covers the `min_layer` grid. Among the accepted candidates the one with the fewest expected layers wins. With
probability at least `1 - delta` (over the draw of calibration prompts) the chosen rule's agreement on new
prompts from the same distribution is at least `target_agreement`.

A classifier with a gate (`ExitClassifier.gate`) is calibrated as it runs: a row the gate stops computes no
features and cannot fire, so its score is -inf (the table must hold the hidden states the gate reads).

A generation table (`collect_generation_features`: one unit per generated token, `FeatureTable.is_generation`)
is calibrated with sequences as the independent draws: each sequence's loss is the share of its tokens whose exit
token differs from the dense one, and the p-values are Hoeffding-Bentkus ones on the mean of those losses; the
guarantee is then on the expected share of a generation's tokens that agree with the dense model's next token
(given the same prefix).

When no candidate is accepted -- e.g. a model whose early layers put a confident blank token on top -- the
result exits never (`check_layers=()`): the honest answer, rather than a classifier that breaks the outputs.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from ..artifact.config import jsonable
from ..policy.classifier import ExitClassifier
from ..utils.stats import risk_p_value, risk_upper_bound
from .draws import calibration_draws_needed
from .table import FeatureTable, table_sequences

__all__ = ["KNOBS", "calibrate", "exit_scores", "gate_passes", "simulate_exits", "summarize_exits"]

MAX_THRESHOLDS = 200  # size of the threshold grid (score quantiles)
MAX_MIN_LAYERS = 8  # default size of the min_layer grid (each one costs a Bonferroni factor)
KNOBS = ("classifier", "gate")  # what the calibrated threshold applies to


def gate_passes(clf: ExitClassifier, table: FeatureTable) -> np.ndarray:
    """Bool `[N]`: where `clf`'s gate lets a row's check compute the head (all True without a gate)."""
    if clf.gate is None:
        return np.ones(len(table), dtype=bool)
    if table.hidden is None:
        raise ValueError("The classifier has a gate, which reads hidden states, but this table has none; collect it "
                         "with collect_features(..., hidden_states=True) (CLI: --tables-out).")
    return clf.gate.passes_table(table.hidden, table.layer)


def exit_scores(clf: ExitClassifier, table: FeatureTable) -> np.ndarray:
    """`clf`'s exit score for every row of `table` (float64 `[N]`).

    For a CRF estimator this is the causal sequence score P(exit at k | layers 1..k) of each prompt's layer
    sequence; for everything else `clf.score` on the rows' features. Rows a gate stops score -inf.
    """
    if clf.gate is not None:
        scores = np.full(len(table), -np.inf)
        passed = gate_passes(clf, table)
        if passed.any():
            scores[passed] = clf.score(table.columns(clf.features)[passed].astype(np.float64))
        return scores
    X = table.columns(clf.features).astype(np.float64)
    if hasattr(clf.estimator, "causal_scores"):
        seqs, _ = table_sequences(table, clf.features)
        out = np.empty(len(table))
        order = np.lexsort((table.layer, table.prompt_id))
        out[order] = np.concatenate(clf.estimator.causal_scores(seqs)) if seqs else []
        return out
    return clf.score(X)


def _grid(table: FeatureTable, values: np.ndarray, fill: float) -> np.ndarray:
    """Per-row `values` as a `[P, L-1]` matrix indexed by (prompt, layer - 1)."""
    L = _num_layers(table)
    out = np.full((table.num_prompts, L - 1), fill, dtype=np.float64)
    out[table.prompt_id, table.layer - 1] = values
    return out


def _num_layers(table: FeatureTable) -> int:
    layers = np.unique(table.num_layers)
    if layers.size != 1:
        raise ValueError(f"The table mixes models with layer counts {layers.tolist()}; expected one model.")
    return int(layers[0])


def summarize_exits(table: FeatureTable, exit_layer: np.ndarray) -> dict:
    """Agreement with dense, gold accuracy and layer use of given per-prompt exit layers.

    Args:
        table ([`FeatureTable`]): the prompts.
        exit_layer (`np.ndarray` int `[P]`): 1-based exit layer of each prompt (`L` = dense).

    Returns:
        `dict` with `n`, `agreement`, `mean_exit_layer`, `num_layers`, `pruning_ratio` and, when the table has
        gold tokens, `gold_accuracy_dense` / `gold_accuracy_exit`; plus the same per task under `per_task`.
    """
    L = _num_layers(table)
    exit_layer = np.asarray(exit_layer, dtype=np.int64)
    top = _grid(table, table.top_token.astype(np.float64), -1).astype(np.int64)
    early = exit_layer < L
    exit_token = table.final_token.copy()
    exit_token[early] = top[np.flatnonzero(early), exit_layer[early] - 1]

    def figures(mask):
        n = int(mask.sum())
        d = {
            "n": n,
            "agreement": float((exit_token[mask] == table.final_token[mask]).mean()) if n else float("nan"),
            "mean_exit_layer": float(exit_layer[mask].mean()) if n else float("nan"),
            "num_layers": L,
        }
        d["pruning_ratio"] = 1.0 - d["mean_exit_layer"] / L if n else float("nan")
        if table.has_gold and n:
            d["gold_accuracy_dense"] = float((table.final_token[mask] == table.gold_token[mask]).mean())
            d["gold_accuracy_exit"] = float((exit_token[mask] == table.gold_token[mask]).mean())
        return d

    summary = figures(np.ones(table.num_prompts, dtype=bool))
    summary["per_task"] = {str(t): figures(table.task == t) for t in np.unique(table.task)}
    return summary


def simulate_exits(clf: ExitClassifier, table: FeatureTable) -> tuple[np.ndarray, dict]:
    """Replays `clf`'s live rule (schedule, `min_layer`, threshold) on a collected table, without the model.

    The table's rows hold exactly the features the decoder loop computes, so for row-wise estimators this equals
    running the model with `clf` (up to float rounding at the threshold).

    Returns:
        `(exit_layer, summary)`: int `[P]` exit layers and [`summarize_exits`]'s figures.
    """
    L = _num_layers(table)
    fired = np.zeros(len(table), dtype=bool)
    if hasattr(clf.estimator, "causal_scores") and clf.threshold is not None:
        fired = exit_scores(clf, table) >= clf.threshold
    elif len(table):
        fired = clf.exit_mask(table.columns(clf.features).astype(np.float64)) & gate_passes(clf, table)
    checked = np.isin(table.layer, clf.layers_to_check(L))
    exit_layer = _first_exit(_grid(table, (fired & checked).astype(np.float64), 0.0) > 0, L)
    return exit_layer, summarize_exits(table, exit_layer)


def _threshold_grid(masked: np.ndarray, thresholds, score_kind: str) -> np.ndarray:
    """Candidate thresholds, most conservative (highest) first: the given ones, or quantiles of the scores the
    rule can see (those at layers >= min_layer)."""
    if thresholds is None:
        uniq = np.unique(masked[np.isfinite(masked)])
        thresholds = (
            np.quantile(uniq, np.linspace(0.0, 1.0, MAX_THRESHOLDS)) if uniq.size > MAX_THRESHOLDS else uniq
        )
    grid = np.asarray(thresholds, dtype=np.float64)
    grid = grid[np.isfinite(grid)]
    if score_kind == "probability":
        grid = np.clip(grid, 0.0, 1.0)
    return np.unique(grid)[::-1]


def _first_exit(fire: np.ndarray, L: int) -> np.ndarray:
    """1-based first True layer along the last axis of `fire` [..., L-1], or L where none."""
    any_fire = fire.any(-1)
    return np.where(any_fire, fire.argmax(-1) + 1, L)


def calibrate(
    clf: ExitClassifier,
    table: FeatureTable,
    target_agreement: float = 0.99,
    delta: float = 0.1,
    min_layers: Sequence[int] | None = None,
    thresholds: Sequence[float] | None = None,
    knob: str = "classifier",
) -> ExitClassifier:
    """Chooses `min_layer` and `threshold` so that agreement with the dense model is at least `target_agreement`
    with probability `1 - delta`, using as few layers as possible.

    Args:
        clf ([`ExitClassifier`]): a trained classifier (its own threshold and min_layer are ignored).
        table ([`FeatureTable`]): calibration prompts, disjoint from the training ones.
        target_agreement (`float`, *optional*, defaults to 0.99): required share of prompts whose exit-layer top-1
            equals the dense top-1.
        delta (`float`, *optional*, defaults to 0.1): allowed probability that the guarantee fails.
        min_layers (`Sequence[int]`, *optional*): candidate `min_layer` values (Bonferroni over them); defaults to
            up to 8 evenly spaced layers in `[first recorded layer, L-1]`.
        thresholds (`Sequence[float]`, *optional*): candidate thresholds. Defaults to up to 200 quantiles of the
            table's scores at layers >= each `min_layer`; a grid fixed before seeing the data makes the guarantee
            exact rather than approximate.
        knob (`str`, *optional*, defaults to `"classifier"`): what the calibrated threshold is. `"classifier"`:
            the classifier's score threshold (with a gate, the gate stays as trained). `"gate"` (needs a gate):
            the classifier keeps its own decision (`predict`, or its threshold if set) and the gate's thresholds
            are all raised by the calibrated offset (`LinearGate.shifted`): the probe on the hidden state becomes
            the exit rule's knob, with the paper's classifier as a veto where the head is computed (and a stricter
            gate computes the head less often).

    Returns:
        [`ExitClassifier`]: a new classifier with the chosen `min_layer`/`threshold` -- or `check_layers=()` (never
        exit) when no candidate passes -- and `calibration` holding the achieved figures.
    """
    _check_calibration_args(clf, table, target_agreement, delta, knob)
    L = _num_layers(table)
    min_layers = _min_layer_grid(table, min_layers)
    delta_each = delta / len(min_layers)

    scores = exit_scores(clf, table) if knob == "classifier" else _gate_knob_scores(clf, table)
    S = _grid(table, scores, -np.inf)  # [P, L-1]
    kind = clf.score_kind if knob == "classifier" else "decision"
    best, n_tested = _learn_then_test(table, S, kind, min_layers, thresholds, 1.0 - target_agreement, delta_each)
    figures = {
        "target_agreement": target_agreement,
        "delta": delta,
        "n_prompts": table.num_prompts,
        "procedure": "learn-then-test, fixed-sequence over thresholds, Bonferroni over min_layer",
        "p_value": "exact binomial tail",
        "min_layer_grid": min_layers,
        "n_tests": n_tested,
        "score": "crf_causal_sequence" if hasattr(clf.estimator, "causal_scores") else clf.score_kind,
        "knob": knob,
    }
    if knob == "gate":
        figures["score"] = "gate margin (probe score - threshold) where the classifier fires at its own decision"
    if isinstance(clf.calibration, dict) and "training" in clf.calibration:
        figures["training"] = clf.calibration["training"]
    if best is None:
        changes = dict(min_layer=1, check_layers=[], decode_check_layers=None)
        errors, chosen = 0, {"never_exit": True, "min_layer": None, "threshold": None}
        exit_layer = np.full(table.num_prompts, L)
    else:
        _, m, t, errors = best
        knobbed = dict(threshold=t) if knob == "classifier" else dict(gate=clf.gate.shifted(t))
        changes = dict(**knobbed, min_layer=m, check_layers=None, decode_check_layers=None)
        chosen = {"never_exit": False, "min_layer": m, "threshold": knobbed.get("threshold", clf.threshold)}
        if knob == "gate":
            chosen["gate_offset"] = t
        exit_layer = _first_exit(_from_layer(S, m) >= t, L)
        if hasattr(clf.estimator, "causal_scores"):
            warnings.warn(
                "A CRF was calibrated on causal sequence scores; live decisions through ExitClassifier.decide "
                "see one layer at a time and do not reproduce them.",
                UserWarning,
                stacklevel=2,
            )
    figures.update(_outcome(table, exit_layer, chosen, errors, target_agreement, delta, delta_each))
    return clf.replace(**changes, calibration=jsonable(figures))


def _check_calibration_args(clf, table: FeatureTable, target_agreement: float, delta: float, knob: str) -> None:
    if not 0.0 < target_agreement < 1.0:
        raise ValueError(f"target_agreement must lie in (0, 1); got {target_agreement!r}.")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1); got {delta!r}.")
    if table.num_prompts == 0:
        raise ValueError("calibrate needs a table with at least one prompt.")
    if knob not in KNOBS:
        raise ValueError(f"knob={knob!r} is not supported; expected one of {list(KNOBS)}.")
    if knob == "gate" and clf.gate is None:
        raise ValueError("knob='gate' calibrates the gate's thresholds, but the classifier has no gate; train it "
                         "with gate='linear' or calibrate with knob='classifier'.")


def _min_layer_grid(table: FeatureTable, min_layers) -> list[int]:
    """The candidate `min_layer` values: the given ones (checked), or up to `MAX_MIN_LAYERS` evenly spaced layers
    from the table's first recorded layer (a generation table may start above layer 1) to `L - 1`."""
    L = _num_layers(table)
    if min_layers is None:
        first = int(table.layer.min()) if len(table) else 1
        min_layers = np.unique(np.linspace(first, L - 1, min(MAX_MIN_LAYERS, L - first)).round().astype(int))
    min_layers = sorted({int(m) for m in min_layers})
    if not min_layers or min_layers[0] < 1 or min_layers[-1] > L - 1:
        raise ValueError(f"min_layers={min_layers!r} must be a non-empty list of layers in [1, {L - 1}].")
    return min_layers


def _gate_knob_scores(clf: ExitClassifier, table: FeatureTable) -> np.ndarray:
    """Per row: the gate's margin where the classifier, at its own decision, fires; -inf where it does not (so
    `margin >= c` is the composed rule with the gate shifted by `c`)."""
    if table.hidden is None:
        raise ValueError("knob='gate' reads hidden states, but this table has none; collect it with "
                         "hidden_states=True (CLI: --tables-out).")
    fires = clf.exit_mask(table.columns(clf.features).astype(np.float64))
    return np.where(fires, clf.gate.margins(table.hidden, table.layer), -np.inf)


def best_unit_scores(classifier: ExitClassifier, calibrated: ExitClassifier, table: FeatureTable,
                     knob: str = "classifier") -> np.ndarray:
    """Per unit of `table` (a prompt, or a generated token), the highest value of `calibrated`'s knob score at
    the layers where it may fire (from its `min_layer`): the classifier's exit score, or with `knob="gate"` the
    uncalibrated `classifier`'s gate margin where its classifier fires. Raising the knob to a unit's value keeps
    that unit exiting."""
    scores = exit_scores(calibrated, table) if knob == "classifier" else _gate_knob_scores(classifier, table)
    return _from_layer(_grid(table, scores, -np.inf), calibrated.min_layer).max(1)


def _from_layer(S: np.ndarray, min_layer: int) -> np.ndarray:
    """The score grid with the layers before `min_layer` masked out (they never fire)."""
    masked = S.copy()
    masked[:, : min_layer - 1] = -np.inf
    return masked


def _learn_then_test(table: FeatureTable, S: np.ndarray, score_kind: str, min_layers, thresholds, alpha: float,
                     delta_each: float):
    """Learn-then-Test over the (min_layer, threshold) grid: `(best, n_tested)`, with `best` the accepted candidate
    with the fewest mean layers as `(mean exit layer, min_layer, threshold, errors)`, or None."""
    L = _num_layers(table)
    agree = _grid(table, table.labels("final").astype(np.float64), 1.0) > 0
    groups = _draws(table)
    best = None  # stays None unless some prompt exits early
    n_tested = 0
    for m in min_layers:
        masked = _from_layer(S, m)
        for t in _threshold_grid(masked, thresholds, score_kind):
            n_tested += 1
            exit_layer = _first_exit(masked >= t, L)
            wrong = _disagreements(agree, exit_layer)
            errors = int(wrong.sum())
            if risk_p_value(wrong, groups, alpha) > delta_each:
                break  # fixed-sequence testing: the first non-rejection ends this min_layer's sequence
            mean_layer = float(exit_layer.mean())
            # A rule that exits nowhere would only add checks: "never" (no checks at all) is better.
            if mean_layer < L and (best is None or mean_layer < best[0]):
                best = (mean_layer, m, float(t), errors)
    return best, n_tested


def _disagreements(agree: np.ndarray, exit_layer: np.ndarray) -> np.ndarray:
    """Bool `[P]`: the units whose exit layer's top-1 differs from the dense one (`agree`: the `[P, L-1]` label
    grid; exit layer `L` is the dense output and always agrees)."""
    L = agree.shape[1] + 1
    early = exit_layer < L
    return early & ~agree[np.arange(agree.shape[0]), np.where(early, exit_layer, 1) - 1]


def _draws(table: FeatureTable) -> np.ndarray | None:
    """The i.i.d. draws of a table's units: None when each unit is one (a first-token table), else the units'
    sequence ids (a generation table)."""
    return table.sequence if table.is_generation else None


def _outcome(table: FeatureTable, exit_layer, chosen: dict, errors: int, target: float, delta: float,
             delta_each: float) -> dict:
    """The figures of the chosen rule: what it achieved on the calibration prompts and what that says."""
    L = _num_layers(table)
    n = table.num_sequences
    summary = summarize_exits(table, exit_layer)
    figures = dict(chosen)
    figures.update({k: v for k, v in summary.items() if k != "per_task"})
    figures["errors"] = errors
    figures["early_exits"] = int((exit_layer < L).sum())
    # Descriptive only (it ignores the selection); the guarantee is LTT's: risk <= 1 - target w.p. >= 1 - delta.
    wrong = _disagreements(_grid(table, table.labels("final").astype(np.float64), 1.0) > 0, exit_layer)
    figures["risk_upper_bound"] = risk_upper_bound(wrong, _draws(table), delta)
    if table.is_generation:
        figures["n_sequences"] = n
        figures["p_value"] = "Hoeffding-Bentkus on per-sequence disagreement shares"
    # Fewest prompts with which even zero errors would pass one test: below it, "never" says nothing about the model.
    figures["min_prompts_for_target"] = calibration_draws_needed(target, delta_each)
    figures["conclusion"] = _conclusion(
        chosen, summary, target, n, figures["min_prompts_for_target"], figures["early_exits"],
        table.num_prompts if table.is_generation else None,
    )
    return figures


def _conclusion(chosen: dict, summary: dict, target: float, n: int, n_needed: int, early: int,
                tokens: int | None = None) -> str:
    L = summary["num_layers"]
    what = "prompts" if tokens is None else "generations"
    if chosen["never_exit"] and n < n_needed:
        return (
            f"{n} calibration {what} cannot certify {target:.1%} agreement (at least {n_needed} are needed even "
            "with zero disagreements), so the calibrated classifier never exits; calibrate on more prompts or "
            "lower the target."
        )
    if chosen["never_exit"]:
        return (
            f"No exit rule could be shown to keep {target:.1%} agreement with the dense model on the calibration "
            "prompts: where the classifier is confident, the early layers' top-1 is not the final answer (this "
            "model settles its answers only in its last layers), so the calibrated classifier never exits."
        )
    if tokens is not None:
        return (
            f"Exits early on {early} of {tokens} tokens of {n} calibration generations (from layer "
            f"{chosen['min_layer']} on), after {summary['mean_exit_layer']:.2f} of {L} layers per token on average, "
            f"agreeing with the dense model's token on {summary['agreement']:.1%} of them (target {target:.1%})."
        )
    return (
        f"Exits early on {early} of {n} calibration prompts (from layer {chosen['min_layer']} on), after "
        f"{summary['mean_exit_layer']:.2f} of {L} layers on average, agreeing with the dense model on "
        f"{summary['agreement']:.1%} of them (target {target:.1%})."
    )

