"""The drafting objective: choose the exit rule that makes lossless `generate` fastest, from a measured cost model.

Lossless generation (`runtime.lossless`) keeps the stock text whatever the rule, so a rule is judged by speed only:
a wrong draft costs the work it wastes, never a token. [`simulate_drafting`] replays the lossless loop on a
generation table (`collect_generation.collect_generation_features`: teacher-forced on the stock model's own greedy
text, one unit per generated token) exactly as `runtime.lossless` runs it:

- the prompt forward runs at full depth and emits the first token;
- every later step feeds one token; while fewer than `min(cap, tokens left - 1)` drafts are in flight the rule's
  checks run (a one- or two-check schedule; the score of the classifier against a threshold, over a shortlist if
  any) and the first that fires makes the step a *draft* (the lens top-1 at that layer), else the step *verifies*;
  with the cap reached the step runs every layer without checks and verifies;
- a verification accepts the drafts while each equals the stock token, emits the stock token at the first wrong
  one (or one more token when all were right) and discards the rest; decoding goes on from there, so on the stock
  text the next table unit is exactly the next position.

Each step is priced by the [`CostModel`] (a draft step's layers with the owed positions it catches up and its
checks; a verification's layers, its checks and the head on P + 1 positions) against `CostModel.stock_step()`.
Greedy counts are the real loop's unless a step after a wrong draft (in flight before its verification) decides
otherwise on the wrong prefix (never with cap 1 or a rule firing wherever it checks; else approximated by the stock
position's). [`choose_drafting_rule`] searches (check layers, threshold, shortlist size, draft cap) on the training
sequences, predicts the chosen rule on held-out ones, and returns an empty schedule (the stock path) where that
prediction does not beat stock by `DraftingConfig.margin`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from ..policy.classifier import ExitClassifier
from .cost_model import CostModel, measure_cost_model
from .table import FeatureTable
from .vocabulary import choose_check_vocabulary, restrict_table

__all__ = ["DraftRule", "DraftSimulation", "choose_drafting_rule", "draft_for_config", "simulate_drafting"]


@dataclasses.dataclass(frozen=True)
class DraftRule:
    """One candidate rule of lossless drafting.

    Args:
        check_layers (`tuple[int, ...]`): the decode steps' checked layers (1-based, sorted; one or two).
        threshold (`float`): a check fires where the classifier's score is `>= threshold`.
        max_draft_tokens (`int`): drafts in a row before a step runs every layer.
        vocabulary_size (`int`, *optional*): the checks' shortlist size; None: the whole vocabulary.
    """

    check_layers: tuple[int, ...]
    threshold: float
    max_draft_tokens: int
    vocabulary_size: int | None = None

    def to_dict(self) -> dict:
        """JSON-safe form."""
        size = None if self.vocabulary_size is None else int(self.vocabulary_size)
        return {"check_layers": [int(k) for k in self.check_layers], "threshold": float(self.threshold),
                "max_draft_tokens": int(self.max_draft_tokens), "vocabulary_size": size}


@dataclasses.dataclass(frozen=True)
class DraftSimulation:
    """What [`simulate_drafting`] predicts for one rule on a table.

    Args:
        drafted, accepted (`np.ndarray` int `[S]`): per sequence (table order), draft tokens and accepted drafts
            (as `generate(lossless=True, return_dict_in_generate=True)` counts them).
        verifications (`np.ndarray` int `[S]`): per sequence, the steps that ran every layer after the prompt.
        decode_tokens (`int`): tokens emitted by decode steps (after each prompt's first token), all sequences.
        seconds (`float`): the predicted seconds of all those decode steps.
        stock_seconds (`float`): the stock decode steps' seconds for the same tokens.
    """

    drafted: np.ndarray
    accepted: np.ndarray
    verifications: np.ndarray
    decode_tokens: int
    seconds: float
    stock_seconds: float

    @property
    def speed(self) -> float:
        """Predicted speed against stock decoding (> 1 is faster)."""
        return self.stock_seconds / self.seconds if self.seconds > 0 else 1.0

    @property
    def acceptance(self) -> float:
        """Share of drafts accepted (0 without drafts)."""
        total = int(self.drafted.sum())
        return float(self.accepted.sum()) / total if total else 0.0

    @property
    def draft_length(self) -> float:
        """Mean tokens emitted per verification step (accepted drafts plus the verified token)."""
        steps = int(self.verifications.sum())
        return self.decode_tokens / steps if steps else 0.0

    def to_dict(self) -> dict:
        """The summary figures (JSON-safe)."""
        return {"predicted_speed": round(self.speed, 4), "acceptance": round(self.acceptance, 4),
                "draft_length": round(self.draft_length, 4), "draft_tokens": int(self.drafted.sum()),
                "accepted_tokens": int(self.accepted.sum()), "decode_tokens": int(self.decode_tokens),
                "sequences": int(self.drafted.size)}


# ---------------------------------------------------------------------------------------------------- tables
@dataclasses.dataclass
class _Grid:
    """A generation table as per-sequence arrays: scores `[U, nL]`, lens top-1 `[U, nL]` and stock token `[U]`,
    units in step order, one list entry per sequence (cut after the first end-of-text token)."""

    first_layer: int
    num_layers: int
    scores: list
    top: list
    final: list


def _grid(table: FeatureTable, scores: np.ndarray, eos_token_ids: Sequence[int] = ()) -> _Grid:
    if not table.is_generation and table.num_prompts > 1:
        raise ValueError("the drafting objective needs a generation table (collect_generation_features): one unit "
                         "per generated token.")
    L = int(table.num_layers.max())
    first = int(table.layer.min())
    n_layers = L - first
    if len(table) != table.num_prompts * n_layers:
        raise ValueError(f"the table has {len(table)} rows for {table.num_prompts} units; expected one row per "
                         f"layer {first}..{L - 1} of each unit.")
    order = np.lexsort((table.layer, table.prompt_id))
    S = np.asarray(scores, dtype=np.float64)[order].reshape(-1, n_layers)
    top = table.top_token[order].reshape(-1, n_layers)
    eos = np.asarray(list(eos_token_ids), dtype=np.int64)
    out = _Grid(first, L, [], [], [])
    for seq in np.unique(table.sequence):
        units = np.flatnonzero(table.sequence == seq)
        units = units[np.argsort(table.step[units], kind="stable")]
        final = table.final_token[units]
        stops = np.flatnonzero(np.isin(final, eos)) if eos.size else ()
        if len(stops):
            units, final = units[:stops[0] + 1], final[:stops[0] + 1]
        out.scores.append(S[units])
        out.top.append(top[units])
        out.final.append(final)
    return out


# ---------------------------------------------------------------------------------------------------- the loop
class _Prices:
    """The cost model's step prices with the per-n tables read once (the simulation calls them per token)."""

    def __init__(self, cost: CostModel, vocabulary_size: int | None, max_positions: int):
        self.L = cost.num_layers
        self.layer = [0.0] + [cost.layer(n) for n in range(1, max_positions + 2)]
        self.head = [0.0] + [cost.head(n) for n in range(1, max_positions + 2)]
        self.check = cost.check(vocabulary_size)
        self.fixed = cost.loop_fixed_seconds
        self.stock = cost.stock_step()
        self._memo: dict = {}  # (depth, frontiers) -> seconds: a search prices the same few patterns many times

    def layers(self, depth: int, frontiers: list) -> float:
        key = (depth, tuple(frontiers))
        total = self._memo.get(key)
        if total is None:
            total = 0.0
            for j in range(1, depth + 1):
                total += self.layer[1 + sum(1 for f in frontiers if f < j)]
            self._memo[key] = total
        return total

    def draft(self, layer: int, checks: int, frontiers: list) -> float:
        return self.fixed + self.layers(layer, frontiers) + checks * self.check

    def verify(self, checks: int, frontiers: list) -> float:
        return self.fixed + self.layers(self.L, frontiers) + checks * self.check + self.head[1 + len(frontiers)]


def _outcomes(grid: _Grid, rule: DraftRule):
    """Per sequence: (exit layer or L, checks run, draft right) per unit under the rule's schedule."""
    cols = [k - grid.first_layer for k in rule.check_layers]
    out = []
    for scores, top, final in zip(grid.scores, grid.top, grid.final, strict=True):
        exit_layer = np.full(final.shape[0], grid.num_layers, dtype=np.int64)
        checks = np.full(final.shape[0], len(cols), dtype=np.int64)
        right = np.zeros(final.shape[0], dtype=bool)
        pending = np.ones(final.shape[0], dtype=bool)
        for i, (k, c) in enumerate(zip(rule.check_layers, cols, strict=True)):
            fires = pending & (scores[:, c] >= rule.threshold)  # NaN never fires (the non-finite screen)
            exit_layer[fires], checks[fires] = k, i + 1
            right[fires] = top[fires, c] == final[fires]
            pending &= ~fires
        out.append((exit_layer.tolist(), checks.tolist(), right.tolist()))
    return out


def _simulate_grid(grid: _Grid, rule: DraftRule, cost: CostModel) -> DraftSimulation:
    prices = _Prices(cost, rule.vocabulary_size, rule.max_draft_tokens)
    L = grid.num_layers
    if cost.num_layers != L:
        raise ValueError(f"the cost model is of a {cost.num_layers}-layer model; the table's has {L}.")
    drafted, accepted, verifications = [], [], []
    seconds, decode_tokens = 0.0, 0
    for exit_layer, checks, right in _outcomes(grid, rule):
        T = len(exit_layer)
        n, drafts, frontiers = 1, [], []  # the prompt forward emitted token 0
        d = a = v = 0
        while n < T:
            cap = min(rule.max_draft_tokens, T - n - 1)
            j = n + len(drafts)  # this step predicts token j
            active = len(drafts) < cap
            if active and exit_layer[j] < L:
                layer = exit_layer[j]
                seconds += prices.draft(layer, checks[j], frontiers)
                frontiers = [max(f, layer) for f in frontiers] + [layer]
                drafts.append(right[j])
                d += 1
                continue
            seconds += prices.verify(checks[j] if active else 0, frontiers)
            good = 0
            while good < len(drafts) and drafts[good]:
                good += 1
            a, v, n = a + good, v + 1, n + good + 1
            drafts, frontiers = [], []
        drafted.append(d)
        accepted.append(a)
        verifications.append(v)
        decode_tokens += T - 1
    return DraftSimulation(np.asarray(drafted), np.asarray(accepted), np.asarray(verifications), decode_tokens,
                           seconds, decode_tokens * prices.stock)


def simulate_drafting(table: FeatureTable, classifier: ExitClassifier, rule: DraftRule, cost: CostModel,
                      eos_token_ids: Sequence[int] = ()) -> DraftSimulation:
    """Predicts lossless greedy `generate` with `rule` on `table`'s stock continuations (see the module docstring).

    Args:
        table ([`FeatureTable`]): a generation table (`collect_generation_features`), restricted to the rule's
            shortlist if it has one (`vocabulary.restrict_table`), so its features and lens top-1 are the checks'.
        classifier ([`ExitClassifier`]): scores the table's rows (`classifier.score`); its own threshold and
            schedule are not read (the rule's are).
        rule ([`DraftRule`]): the schedule, threshold, cap and shortlist size.
        cost ([`CostModel`]): the measured step costs (`cost_model.measure_cost_model`).
        eos_token_ids (`Sequence[int]`, *optional*): a sequence ends at its first such stock token (as generate
            stops there).

    Returns:
        [`DraftSimulation`]: per-sequence draft and accept counts, predicted seconds and speed.
    """
    _check_rule(rule, table)
    return _simulate_grid(_grid(table, _scores(classifier, table), eos_token_ids), rule, cost)


def _scores(classifier: ExitClassifier, table: FeatureTable) -> np.ndarray:
    X = table.columns(classifier.features).astype(np.float64)
    finite = np.isfinite(X).all(axis=1)
    scores = np.full(X.shape[0], np.nan)
    if finite.any():
        scores[finite] = classifier.score(X[finite])
    return scores


def _check_rule(rule: DraftRule, table: FeatureTable) -> None:
    first, L = int(table.layer.min()), int(table.num_layers.max())
    layers = list(rule.check_layers)
    if not layers or layers != sorted(set(layers)) or any(not first <= k < L for k in layers):
        raise ValueError(f"check_layers={layers!r} must be sorted unique layers in [{first}, {L - 1}] (the table's).")
    if isinstance(rule.max_draft_tokens, bool) or not isinstance(rule.max_draft_tokens, int) \
            or rule.max_draft_tokens < 1:
        raise ValueError(f"max_draft_tokens must be an int >= 1; got {rule.max_draft_tokens!r}.")


# ---------------------------------------------------------------------------------------------------- search
def _thresholds(scores: np.ndarray, count: int) -> list[float]:
    """`count` thresholds at spread quantiles of `scores`, each halfway between two distinct values (so no row
    sits on the cut, where the device's float32 decision and the host's float64 score could disagree)."""
    values = np.unique(scores[np.isfinite(scores)])
    if values.size < 2:
        return []
    mids = (values[1:] + values[:-1]) / 2
    picks = np.unique(np.quantile(np.arange(mids.size), np.linspace(0.3, 0.99, count)).round().astype(int))
    return [float(mids[i]) for i in picks]


def _candidate_layers(first: int, L: int, layers, max_layers: int) -> list[int]:
    if layers is not None:
        return [k for k in layers if first <= k < L]
    every = list(range(first, L))
    if len(every) <= max_layers:
        return every
    return sorted({every[int(round(i))] for i in np.linspace(0, len(every) - 1, max_layers)})


def _search(grid, score_rows, cost, size, caps, layers, n_thresholds, two_checks: int):
    """Every single-check rule on the grid, then second checks for the `two_checks` best; rows sorted by speed."""
    rows = []
    for k in layers:
        for t in _thresholds(score_rows[k], n_thresholds):
            for cap in caps:
                rule = DraftRule((k,), t, cap, size)
                rows.append((_simulate_grid(grid, rule, cost), rule))
    rows.sort(key=lambda r: -r[0].speed)
    for _, best in rows[:two_checks]:
        for k in layers:
            if k == best.check_layers[0]:
                continue
            rule = dataclasses.replace(best, check_layers=tuple(sorted((k, best.check_layers[0]))))
            rows.append((_simulate_grid(grid, rule, cost), rule))
    rows.sort(key=lambda r: -r[0].speed)
    return rows


def choose_drafting_rule(model, train_table: FeatureTable, holdout_table: FeatureTable, cost: CostModel,
                         fit, *, max_draft_tokens: Sequence[int] = (1, 2, 3, 4, 6, 8),
                         vocabulary_sizes: Sequence[int | None] = (None,), check_layers: Sequence[int] | None = None,
                         max_layers: int = 12, thresholds: int = 8, two_checks: int = 3, margin: float = 0.02,
                         eos_token_ids: Sequence[int] = ()) -> tuple[ExitClassifier, dict]:
    """The lossless drafting rule with the best predicted speed, as a classifier, and the record of the search.

    Args:
        model: the AdaInfer model the tables were collected on (restricting to a shortlist reruns its head).
        train_table, holdout_table ([`FeatureTable`]): generation tables of disjoint prompts (the first chooses the
            rule and trains the classifier; the second predicts the chosen rule's speed on unseen prompts); with a
            shortlist size they need their hidden states.
        cost ([`CostModel`]): measured on `model` with every shortlist size in `vocabulary_sizes`.
        fit (`Callable[[FeatureTable], ExitClassifier]`): trains the classifier whose score the thresholds cut, on
            a (restricted) training table.
        max_draft_tokens, vocabulary_sizes, check_layers, max_layers, thresholds, two_checks: the search space
            (caps; shortlist sizes, None = the whole vocabulary; candidate layers, None = up to `max_layers` spread
            over the table's layers; thresholds per layer; second checks tried for the best single-check rules).
        margin (`float`, *optional*, defaults to 0.02): the held-out predicted speed must exceed `1 + margin`.
        eos_token_ids: as in [`simulate_drafting`].

    Returns:
        `(classifier, record)`: the classifier with the chosen schedule (prefill and decode), threshold,
        `drafting=True`, and its check vocabulary, or with empty schedules when nothing pays; `record` is
        `calibration["drafting"]`: the chosen rule, `max_draft_tokens`, the held-out and training predictions,
        the best rows of the search and why.
    """
    best = None
    table_rows = []
    for size in vocabulary_sizes:
        train, holdout = _restricted(model, train_table, holdout_table, size)
        clf = fit(train)
        scores = _scores(clf, train)
        grid = _grid(train, scores, eos_token_ids)
        by_layer = {k: scores[train.layer == k] for k in np.unique(train.layer).tolist()}
        layers = _candidate_layers(grid.first_layer, grid.num_layers, check_layers, max_layers)
        rows = _search(grid, by_layer, cost, size, list(max_draft_tokens), layers, thresholds, two_checks)
        if not rows:
            continue
        table_rows += [{**r.to_dict(), **s.to_dict()} for s, r in rows[:5]]
        if best is None or rows[0][0].speed > best[0].speed:
            best = (rows[0][0], rows[0][1], clf, holdout)
    table_rows.sort(key=lambda r: -r["predicted_speed"])
    if best is None:
        raise ValueError("no candidate rule: the classifier's scores take a single value on every candidate layer.")
    train_sim, rule, clf, holdout = best
    held = simulate_drafting(holdout, clf, rule, cost, eos_token_ids)
    pays = held.speed > 1.0 + margin
    why = (f"pays: predicted {held.speed:.3f}x stock on {held.drafted.size} held-out prompts (margin {margin})"
           if pays else f"nothing pays: the best rule is predicted at {held.speed:.3f}x stock on held-out prompts "
           f"({train_sim.speed:.3f}x on the training prompts), not above 1 + margin = {1 + margin}; the schedule is "
           "empty and generate runs the stock path")
    record = {"rule": rule.to_dict(), "max_draft_tokens": int(rule.max_draft_tokens), "pays": bool(pays),
              "why": why, "margin": float(margin), "holdout": held.to_dict(), "train": train_sim.to_dict(),
              "candidates": table_rows[:10]}
    layers = list(rule.check_layers) if pays else []
    chosen = clf.replace(threshold=rule.threshold, min_layer=min(rule.check_layers), check_layers=layers,
                         decode_check_layers=layers, drafting=True)
    return chosen, record


def _restricted(model, train_table, holdout_table, size):
    if size is None:
        return train_table, holdout_table
    ids = choose_check_vocabulary(train_table, int(size), int(model.exit_head.width))
    return restrict_table(model, train_table, ids), restrict_table(model, holdout_table, ids)


def draft_for_config(model, train_table: FeatureTable, holdout_table: FeatureTable, drafting, fit,
                     cost_model: CostModel | None = None) -> ExitClassifier:
    """[`choose_drafting_rule`] with a `config.DraftingConfig`'s settings, the cost model (measured on `model` when
    not given) and the model's end-of-text tokens; the calibration record gains `"drafting"` (the search's record),
    `"cost_model"` (`CostModel.to_dict`, with device, dtype and threads) and `"conclusion"`."""
    if cost_model is None:
        cost_model = measure_cost_model(model, cache_length=drafting.cost_cache_length,
                                        max_positions=max(drafting.max_draft_tokens) + 1,
                                        vocabularies=[s for s in drafting.vocabulary_sizes if s is not None],
                                        repeats=drafting.cost_repeats)
    eos = model.generation_config.eos_token_id
    clf, figures = choose_drafting_rule(
        model, train_table, holdout_table, cost_model, fit, max_draft_tokens=drafting.max_draft_tokens,
        vocabulary_sizes=drafting.vocabulary_sizes, check_layers=drafting.check_layers,
        max_layers=drafting.max_layers, thresholds=drafting.thresholds, two_checks=drafting.two_checks,
        margin=drafting.margin, eos_token_ids=[] if eos is None else [eos] if isinstance(eos, int) else list(eos))
    calibration = {**(clf.calibration if isinstance(clf.calibration, dict) else {}), "drafting": figures,
                   "cost_model": cost_model.to_dict(), "conclusion": figures["why"]}
    return clf.replace(calibration=calibration)
