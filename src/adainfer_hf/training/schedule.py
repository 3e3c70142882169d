"""Which layers to check: a schedule that minimises expected cost (layers run + checks) under the quality target.

A check (final norm + LM head + top-2 on the last token) is not free: on SmolLM2 it costs 1.7 decoder layers at
prefill length 64 and 6.5 in single-token decode. Checking after every layer, as the paper does, can cost more than
early exit saves. Given, for calibration prompts, where the classifier would fire and where exiting would agree
with the dense model, `choose_schedule` picks the cheapest schedule among a family (a first checked layer and a
stride, single checks, and "no checks at all") whose agreement with dense holds with confidence 1 - delta.

With a gate in front of the checks (`ExitClassifier.gate`) a check costs the gate plus, where the gate passes, the
head: `gate_cost + P(pass) * check_cost` per running row, read per prompt and layer from the calibration table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..utils.stats import risk_upper_bound
from .calibrate import gate_passes
from .check_cost import measure_check_cost, measure_gate_cost

__all__ = [
    "ScheduleChoice",
    "choose_schedule",
    "resolve_check_cost",
    "resolve_check_costs",
    "resolve_gate_costs",
    "schedule_classifier",
    "schedule_cost",
]


@dataclass
class ScheduleChoice:
    """The chosen schedule and what it achieved on the calibration prompts.

    Attributes:
        check_layers (`tuple[int, ...]`): 1-based layers after which to check; empty = never check (never exit).
        relative_cost (`float`): expected cost relative to the dense model (1.0 = as dense).
        mean_layers (`float`): mean layers run per prompt.
        agreement (`float`): empirical agreement with dense on the calibration prompts.
        risk_bound (`float`): upper confidence bound (1 - delta) on the disagreement rate.
        check_cost (`float`): cost of one check's head in decoder layers, as used.
        gate_cost (`float`): cost of the gate in front of a check, in decoder layers (0: no gate).
        candidates (`int`): schedules considered (the Bonferroni factor).
    """

    check_layers: tuple[int, ...]
    relative_cost: float
    mean_layers: float
    agreement: float
    risk_bound: float
    check_cost: float
    candidates: int
    table: list = field(default_factory=list)
    gate_cost: float = 0.0

    def as_dict(self) -> dict:
        """Plain-Python summary for the artifact's `calibration` record."""
        return {"check_layers": list(self.check_layers), "relative_cost": self.relative_cost,
                "mean_layers": self.mean_layers, "agreement": self.agreement, "risk_bound": self.risk_bound,
                "check_cost_layers": self.check_cost, "gate_cost_layers": self.gate_cost,
                "candidates": self.candidates}


def schedule_cost(fires: np.ndarray, agrees: np.ndarray, check_layers, check_cost: float,
                  passes: np.ndarray | None = None, gate_cost: float = 0.0):
    """Exit layers, per-prompt cost (in layers) and agreement of one schedule.

    Args:
        fires (`np.ndarray`): bool [n_prompts, L]; column l-1 = the classifier fires after layer l.
        agrees (`np.ndarray`): bool [n_prompts, L]; column l-1 = layer l's top-1 equals the dense top-1.
        check_layers (`Sequence[int]`): 1-based checked layers.
        check_cost (`float`): one check's cost in decoder layers (it includes the LM head, so a fired check's
            logits are the output and the final head is saved).
        passes (`np.ndarray`, *optional*): bool [n_prompts, L]; where a gate lets the check compute the head
            (`fires` must already be False where it does not). None: no gate, every check computes the head.
        gate_cost (`float`, *optional*, defaults to 0): the gate's cost per check, in decoder layers.
    """
    n, L = fires.shape
    exits = np.full(n, L)
    cost = np.zeros(n)
    running = np.ones(n, dtype=bool)
    for k in sorted(check_layers):
        heads = running if passes is None else running & passes[:, k - 1]
        cost += gate_cost * running + check_cost * heads
        fired = running & fires[:, k - 1]
        exits[fired] = k
        running &= ~fired
    # Rows that never fired pay the dense model's own final head (one check's worth) on top of L layers.
    cost += exits + check_cost * running
    agree = agrees[np.arange(n), exits - 1]
    return exits, cost, agree


def choose_schedule(fires: np.ndarray, agrees: np.ndarray, check_cost: float, target_agreement: float = 0.99,
                    delta: float = 0.1, min_layer: int = 1, strides=(1, 2, 3, 4, 6, 8),
                    max_starts: int = 8, passes: np.ndarray | None = None,
                    gate_cost: float = 0.0, groups: np.ndarray | None = None) -> ScheduleChoice:
    """The cheapest schedule whose agreement with dense is >= target with confidence 1 - delta.

    Candidates: "no checks" (always allowed: it is the dense model), single checks, and (first layer, stride)
    ladders with first layers spread over where the classifier starts firing. Each candidate's disagreement is
    bounded with an exact binomial bound at delta / (number of candidates) (Bonferroni), so the guarantee holds for
    the selected one. `passes` and `gate_cost` describe a gate in front of the checks (see [`schedule_cost`]).
    `groups` (int `[n_prompts]`, optional) names the i.i.d. draws when the rows are tokens of generated sequences:
    the bound is then Hoeffding-Bentkus on the per-sequence disagreement shares (`utils.stats.risk_upper_bound`).
    """
    n, L = fires.shape
    first_fire = np.where(fires[:, min_layer - 1:L - 1].any(1), fires[:, min_layer - 1:L - 1].argmax(1) + min_layer, L)
    fired_at = first_fire[first_fire < L]
    if fired_at.size:
        starts = sorted({int(v) for v in np.quantile(fired_at, np.linspace(0, 1, max_starts))} | {min_layer})
    else:
        starts = []
    candidates = [()]
    for s in starts:
        if s < min_layer or s >= L:
            continue
        candidates.append((s,))
        for stride in strides:
            ladder = tuple(range(s, L, stride))
            if len(ladder) > 1 and ladder not in candidates:
                candidates.append(ladder)
    dense_cost = L + check_cost
    level = delta / len(candidates)
    best, table = None, []
    for cand in candidates:
        exits, cost, agree = schedule_cost(fires, agrees, cand, check_cost, passes, gate_cost)
        bound = risk_upper_bound(~agree, groups, level) if cand else 0.0
        row = ScheduleChoice(tuple(cand), float(cost.mean() / dense_cost), float(exits.mean()),
                             float(agree.mean()), bound, check_cost, len(candidates), gate_cost=gate_cost)
        table.append(row.as_dict())
        if bound <= 1 - target_agreement and (best is None or row.relative_cost < best.relative_cost):
            best = row
    best.table = table
    return best


def schedule_classifier(clf, table, check_cost: float, target_agreement: float | None = None,
                        delta: float | None = None, decode_check_cost: float | None = None,
                        gate_cost: float = 0.0, decode_gate_cost: float | None = None):
    """Sets `clf.check_layers` (and `clf.decode_check_layers`) to the cheapest certified schedules, in place.

    Args:
        clf (`ExitClassifier`): a calibrated classifier (its `min_layer`/`threshold` decide where it fires).
        table (`FeatureTable`): the calibration table it was calibrated on.
        check_cost (`float`): one check's cost in decoder layers on the target device (`measure_check_cost`); with
            `decode_check_cost`, the cost in a prompt forward.
        target_agreement, delta: default to the figures `calibrate` recorded.
        decode_check_cost (`float`, *optional*): one check's cost in a cached single-token step. When given, a
            second schedule is chosen for those steps (`decode_check_layers`): on the decode steps of a generation
            table (`collect_generation_features`; its first tokens choose `check_layers`), or on the same
            calibration prompts (their exits standing in for those of generated tokens); otherwise decode steps
            use `check_layers`.
        gate_cost (`float`, *optional*, defaults to 0), decode_gate_cost (`float`, *optional*): the cost of the
            classifier's gate per check in prompts and in decode steps (default: `gate_cost`), in decoder layers;
            where the gate passes is read from the table (`calibrate.gate_passes`).

    Returns:
        `ScheduleChoice` of `check_layers`, also stored in `clf.calibration["schedule"]` (the decode one in
        `["decode_schedule"]`). A classifier calibrated to never exit (`check_layers=()`) is left as it is.
    """
    if clf.check_layers == ():
        return None
    cal = clf.calibration or {}
    target = target_agreement if target_agreement is not None else cal.get("target_agreement", 0.99)
    delta = delta if delta is not None else cal.get("delta", 0.1)
    L = int(np.unique(table.num_layers)[0])
    fires = np.zeros((table.num_prompts, L), dtype=bool)
    agrees = np.ones((table.num_prompts, L), dtype=bool)
    passed = gate_passes(clf, table)
    fired = clf.exit_mask(table.columns(clf.features).astype(np.float64)) & (table.layer >= clf.min_layer) & passed
    fires[table.prompt_id, table.layer - 1] = fired
    agrees[table.prompt_id, table.layer - 1] = table.labels("final")
    passes = None
    if clf.gate is not None:
        passes = np.ones((table.num_prompts, L), dtype=bool)
        passes[table.prompt_id, table.layer - 1] = passed
    else:
        gate_cost = decode_gate_cost = 0.0
    # A generation table holds both phases: its first tokens choose the prompt schedule, its decode steps (with
    # their sequences as the draws) the decode one; a single schedule for every step is chosen on all its tokens.
    # A first-token table's prompts stand in for both.
    every = np.ones(table.num_prompts, dtype=bool)
    phases = {"prefill": every, "decode": every}
    groups = table.sequence if table.is_generation else None
    if groups is not None and decode_check_cost is not None:
        phases = {"prefill": table.step == 0, "decode": table.step > 0}
    procedure = "exact binomial bound, Bonferroni over the candidates"

    def grouped(rows):  # None where every unit is its own sequence (the exact binomial applies)
        return None if groups is None or np.unique(groups[rows]).size == rows.sum() else groups[rows]

    draws = {phase: grouped(rows) for phase, rows in phases.items()}

    def choose(phase, cost, g_cost):
        rows = phases[phase]
        return choose_schedule(fires[rows], agrees[rows], cost, target, delta, min_layer=clf.min_layer,
                               passes=None if passes is None else passes[rows], gate_cost=g_cost,
                               groups=draws[phase])

    def described(choice, phase):
        how = procedure if draws[phase] is None else (
            "Hoeffding-Bentkus bound on per-sequence disagreement shares, Bonferroni over the candidates")
        return {**choice.as_dict(), "delta": delta, "procedure": how}

    choice = choose("prefill", check_cost, gate_cost)
    record = {**cal, "schedule": described(choice, "prefill")}
    record.pop("decode_schedule", None)
    decode_layers = None
    if decode_check_cost is not None:
        decode = choose("decode", decode_check_cost, gate_cost if decode_gate_cost is None else decode_gate_cost)
        decode_layers = decode.check_layers
        record["decode_schedule"] = described(decode, "decode")
    # In place, as documented, and validated like `ExitClassifier.replace`.
    clf._set(check_layers=choice.check_layers, decode_check_layers=decode_layers, calibration=record)
    return choice


def resolve_check_costs(model, spec, seq_len: int = 256, phase: str = "both", check_dtype: str | None = None,
                        check_vocabulary=None) -> tuple[float | None, float | None]:
    """(cost of `check_layers`' checks, cost of decode checks or None) for `schedule_classifier`.

    `phase="both"` with `spec="auto"` measures a check in a `seq_len`-token prompt and in a single-token step, so
    prompts and generated tokens get their own schedules; "prefill" or "decode" (or a numeric `spec`) give one
    cost and one schedule for every step.
    """
    if phase not in ("both", "prefill", "decode"):
        raise ValueError(f"phase must be 'both', 'prefill' or 'decode'; got {phase!r}.")
    if phase == "both" and spec == "auto":
        return (resolve_check_cost(model, spec, seq_len, "prefill", check_dtype, check_vocabulary),
                resolve_check_cost(model, spec, seq_len, "decode", check_dtype, check_vocabulary))
    phase = "prefill" if phase == "both" else phase
    return resolve_check_cost(model, spec, seq_len, phase, check_dtype, check_vocabulary), None


def resolve_gate_costs(model, gate, spec, seq_len: int = 256, phase: str = "both") -> tuple[float, float | None]:
    """(gate cost in prompts, gate cost in decode steps or None) for `schedule_classifier`, like
    [`resolve_check_costs`]: `spec` is "auto" (measured now) or a number of layers; no gate costs 0."""
    if gate is None:
        return 0.0, None
    if spec != "auto":
        return _layers(spec, "gate cost", "a number of layers or 'auto'"), None
    if phase == "both":
        return (measure_gate_cost(model, gate, seq_len, phase="prefill"),
                measure_gate_cost(model, gate, seq_len, phase="decode"))
    return measure_gate_cost(model, gate, seq_len, phase=phase), None


def resolve_check_cost(model, spec, seq_len: int = 256, phase: str = "prefill", check_dtype: str | None = None,
                       check_vocabulary=None) -> float | None:
    """A check cost from a user's spec: a number (layers), "auto" (measured now on the model's device at
    `seq_len`/`phase`, with the head in `check_dtype` over `check_vocabulary`), or None/"none" (no scheduling:
    check every layer from `min_layer`)."""
    if spec is None or spec == "none":
        return None
    if spec == "auto":
        return measure_check_cost(model, seq_len=seq_len, phase=phase, check_dtype=check_dtype,
                                  check_vocabulary=check_vocabulary)
    return _layers(spec, "check cost", "a number of layers, 'auto' or 'none'")


def _layers(spec, what: str, expected: str) -> float:
    """`spec` as a number of layers >= 0; `ValueError` naming `what` and the value otherwise."""
    try:
        value = float(spec)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be {expected}; got {spec!r}.") from None
    if not value >= 0:
        raise ValueError(f"{what} must be >= 0 layers; got {spec!r}.")
    return value
