"""Training configuration: how an exit classifier is trained, calibrated and scheduled, as one composed object.

[`TrainingConfig`] holds the estimator settings and four sub-configs, each validated when it is built (a bad value
raises `ValueError` naming it and what was expected, before any model runs):

```python
from adainfer_hf import CalibrationConfig, GateConfig, TrainingConfig, train_and_calibrate

config = TrainingConfig(method="logistic", calibration=CalibrationConfig(target_agreement=0.95),
                        gate=GateConfig(kind="linear"))
classifier, train_table, calibration_table = train_and_calibrate(model, tokenizer, prompts, config)
classifier.calibration["training_config"] == config.to_dict()  # saved with the artifact
```

`to_dict` / `from_dict` round-trip exactly (`TrainingConfig.from_dict(c.to_dict()) == c`) through JSON; unknown keys
are refused by name, so a misspelt setting never trains silently with its default. The configs are frozen: derive
a variant with `dataclasses.replace`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields

from ..cache.exact import CACHE_MODES
from ..policy.base import check_vocabulary_or_raise
from ..policy.features import FEATURES
from .calibrate import KNOBS
from .table import LABEL_KINDS

__all__ = [
    "CHECK_PHASES",
    "GATES",
    "TRAIN_METHODS",
    "CalibrationConfig",
    "DraftingConfig",
    "GateConfig",
    "GenerationCalibrationConfig",
    "ScheduleConfig",
    "TrainingConfig",
]

TRAIN_METHODS = ("svm", "linear_svm", "logistic", "crf", "gap_rule", "gate_only")
GATES = (None, "linear")  # what may stand in front of the checks (None: every check computes the head)
CHECK_PHASES = ("both", "prefill", "decode")
TRAINING_CHECK_DTYPES = (None, "bfloat16", "float16")  # None: the model's own head


def _set(obj, name: str, value) -> None:
    object.__setattr__(obj, name, value)  # normalising a field of a frozen dataclass in __post_init__


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int_at_least(who: str, value, low: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not _is_int(value) or value < low:
        raise ValueError(f"{who} must be an int >= {low}{' or None' if optional else ''}; got {value!r}.")


def _fraction(who: str, value, closed_high: bool = False) -> None:
    if not _is_number(value) or not (0.0 < value < 1.0 or (closed_high and value == 1.0)):
        raise ValueError(f"{who} must lie in (0, 1{']' if closed_high else ')'}; got {value!r}.")


def _one_of(who: str, value, allowed: Sequence) -> None:
    if value not in allowed:
        raise ValueError(f"{who}={value!r} is not supported; expected one of {list(allowed)}.")


def _cost(who: str, value, allowed: tuple):
    """A cost in decoder layers (a finite number >= 0, as a float) or one of the `allowed` specs."""
    if value in allowed and not isinstance(value, (int, float)):
        return value
    if not _is_number(value) or value < 0:
        specs = " or ".join(repr(a) for a in allowed)
        raise ValueError(f"{who} must be a number of layers >= 0 or {specs}; got {value!r}.")
    return float(value)


class _DictMixin:
    """`to_dict` / `from_dict` of a (possibly nested) config dataclass; unknown keys are refused by name."""

    _NESTED: dict = {}  # field name -> the sub-config class it holds

    def to_dict(self) -> dict:
        """The config as plain JSON-safe Python (tuples as lists, sub-configs as dicts)."""
        return _plain(asdict(self))

    @classmethod
    def from_dict(cls, data: dict):
        """The config a `to_dict` wrote; `ValueError` naming any key this config does not have."""
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__}.from_dict expects a dict; got {type(data).__name__}.")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"{cls.__name__} has no field(s) {unknown}; expected keys among {known}.")
        kwargs = {k: cls._NESTED[k].from_dict(v) if k in cls._NESTED and v is not None else v
                  for k, v in data.items()}
        return cls(**kwargs)


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class CalibrationConfig(_DictMixin):
    """How Learn-then-Test calibrates the trained rule (`calibrate.calibrate`).

    Args:
        target_agreement (`float`, *optional*, defaults to 0.99): the certified share of prompts (or, on generation
            tables, of a generation's tokens) whose early answer equals the dense one; in (0, 1).
        delta (`float`, *optional*, defaults to 0.1): allowed failure probability of the guarantee; in (0, 1).
        calibration_fraction (`float`, *optional*, defaults to 0.5): share of the prompts' examples held out for
            calibration by `train_and_calibrate` (examples, not prompts: one question lands on one side only).
        knob (`str`, *optional*): what calibration tunes, the classifier's threshold (`"classifier"`) or the gate's
            thresholds (`"gate"`, which needs a gate). None: `"classifier"`, or `"gate"` for `method="gate_only"`.
        min_layers (`tuple[int, ...]`, *optional*): candidate `min_layer` values (each costs a Bonferroni factor);
            None: up to 8 evenly spaced layers.
    """

    target_agreement: float = 0.99
    delta: float = 0.1
    calibration_fraction: float = 0.5
    knob: str | None = None
    min_layers: tuple[int, ...] | None = None

    def __post_init__(self):
        _fraction("target_agreement", self.target_agreement)
        _fraction("delta", self.delta)
        _fraction("calibration_fraction", self.calibration_fraction)
        _one_of("knob", self.knob, (None, *KNOBS))
        if self.min_layers is not None:
            if isinstance(self.min_layers, (str, bytes)) or not isinstance(self.min_layers, Sequence) or not all(
                    _is_int(m) and m >= 1 for m in self.min_layers) or not self.min_layers:
                raise ValueError(f"min_layers must be a non-empty sequence of ints >= 1 or None; got "
                                 f"{self.min_layers!r}.")
            _set(self, "min_layers", tuple(self.min_layers))


@dataclass(frozen=True)
class GateConfig(_DictMixin):
    """The gate in front of every check (`policy.gate.LinearGate`).

    Args:
        kind (`str`, *optional*): `"linear"` fits a linear probe per checked layer on the training table's hidden
            states, so a check computes the LM head only where the probe passes; None (default): no gate
            (`method="gate_only"` always has one).
        recall (`float`, *optional*, defaults to 0.99): share of the training rows whose lens agrees that the probe
            passes; in (0, 1].
        cost (`float` or `"auto"`, *optional*, defaults to `"auto"`): the gate's cost per check in decoder layers
            for the schedule; "auto" measures it on the model's device.
    """

    kind: str | None = None
    recall: float = 0.99
    cost: float | str = "auto"

    def __post_init__(self):
        _one_of("gate kind", self.kind, GATES)
        _fraction("gate recall", self.recall, closed_high=True)
        _set(self, "cost", _cost("gate cost", self.cost, ("auto",)))


@dataclass(frozen=True)
class ScheduleConfig(_DictMixin):
    """What a check is and what it costs: the check schedule is chosen from these (`schedule.schedule_classifier`).

    Args:
        check_cost (`float`, `"auto"` or `None`, *optional*, defaults to `"auto"`): one check's cost in decoder
            layers; "auto" measures it on the model's device; None checks every layer from `min_layer` (no
            schedule, as the paper does).
        check_phase (`str`, *optional*, defaults to `"both"`): "both" chooses a schedule for prompts and one for
            generated tokens (`decode_check_layers`) from the two measured costs; "prefill" or "decode" one schedule
            for all steps from that phase's cost.
        check_length (`int`, *optional*): prompt length a check is measured at; None: the prompts' median length
            (`train_and_calibrate`) or 256 (`train_on_tables`).
        check_dtype (`str`, *optional*): run the checks' LM head in "bfloat16" or "float16" (cheaper on an fp32
            model); features are collected, calibrated and costed with the same head. None: the model's own dtype
            (`train_on_tables`: the tables' check dtype, which a set value must equal).
        check_vocabulary (`int` or `tuple[int, ...]`, *optional*): checks score a shortlist of token ids: the ids,
            or how many (>= 2) to take from the training table's dense tokens (`vocabulary.choose_check_vocabulary`).
            None: the whole vocabulary.
    """

    check_cost: float | str | None = "auto"
    check_phase: str = "both"
    check_length: int | None = None
    check_dtype: str | None = None
    check_vocabulary: int | tuple[int, ...] | None = None

    def __post_init__(self):
        if self.check_cost is not None:
            _set(self, "check_cost", _cost("check_cost", self.check_cost, ("auto",)))
        _one_of("check_phase", self.check_phase, CHECK_PHASES)
        _int_at_least("check_length", self.check_length, 1, optional=True)
        _one_of("check_dtype", self.check_dtype, TRAINING_CHECK_DTYPES)
        vocabulary = self.check_vocabulary
        if isinstance(vocabulary, bool) or isinstance(vocabulary, int) and vocabulary < 2:
            raise ValueError(f"check_vocabulary must be an int >= 2, a sequence of token ids or None; got "
                             f"{vocabulary!r}.")
        if vocabulary is not None and not _is_int(vocabulary):
            _set(self, "check_vocabulary", check_vocabulary_or_raise(vocabulary))


@dataclass(frozen=True)
class GenerationCalibrationConfig(_DictMixin):
    """What the classifier is calibrated for: the prompt's next token (default), generated tokens, or free-running
    generations (`collect_generation.collect_generation_features`, `free_running.calibrate_free_running`).

    Args:
        generation_tokens (`int`, *optional*): train and calibrate on the first `generation_tokens` tokens the dense
            model generates per prompt (a classifier for `generate`; calibration then bounds the share of a
            generation's tokens that agree). None: the prompt's next token only, as in the paper.
        first_layer (`int`, *optional*, defaults to 1): with `generation_tokens`, record layers `first_layer..L-1`
            only (each recorded layer computes the LM head for every token).
        free_running_tokens (`int`, *optional*): certify free-running generations of this many tokens instead
            (candidates from the training table, tested by generating on the calibration prompts).
        exit_cache (`str`, *optional*, defaults to `"propagate"`): the KV-cache option those generations use.
    """

    generation_tokens: int | None = None
    first_layer: int = 1
    free_running_tokens: int | None = None
    exit_cache: str = "propagate"

    def __post_init__(self):
        _int_at_least("generation_tokens", self.generation_tokens, 1, optional=True)
        _int_at_least("first_layer", self.first_layer, 1)
        _int_at_least("free_running_tokens", self.free_running_tokens, 1, optional=True)
        _one_of("exit_cache", self.exit_cache, CACHE_MODES)
        if self.first_layer != 1 and self.generation_tokens is None:
            raise ValueError(f"first_layer={self.first_layer} selects the layers generation_tokens records; set "
                             "generation_tokens as well (prompt tables always record every layer).")


def _int_tuple(who: str, value, low: int, allow_none: bool = False) -> tuple:
    """A non-empty sequence of distinct ints >= `low` (None allowed as an element with `allow_none`), as a tuple."""
    ok = not isinstance(value, (str, bytes)) and isinstance(value, Sequence) and len(value) > 0 and all(
        (allow_none and v is None) or (_is_int(v) and v >= low) for v in value)
    if not ok or len(set(value)) != len(value):
        extra = " or None" if allow_none else ""
        raise ValueError(f"{who} must be a non-empty sequence of distinct ints >= {low}{extra}; got {value!r}.")
    return tuple(value)


@dataclass(frozen=True)
class DraftingConfig(_DictMixin):
    """Training for lossless `generate` (`training.drafting`): the rule that maximises the predicted decode speed
    under a cost model measured on the device, instead of a certified agreement.

    Args:
        max_draft_tokens (`tuple[int, ...]`, *optional*, defaults to `(1, 2, 3, 4, 6, 8)`): candidate draft caps.
        vocabulary_sizes (`tuple[int | None, ...]`, *optional*, defaults to `(None,)`): candidate shortlist sizes of
            the checks (each >= 2; None: the whole vocabulary).
        check_layers (`tuple[int, ...]`, *optional*): candidate check layers; None: up to `max_layers` spread over
            the recorded layers.
        max_layers (`int`, *optional*, defaults to 12), thresholds (`int`, *optional*, defaults to 8),
            two_checks (`int`, *optional*, defaults to 3): candidate layers, thresholds per layer, and how many of
            the best one-check rules get a second check tried.
        margin (`float`, *optional*, defaults to 0.02): the chosen rule must be predicted faster than stock by this
            share on the held-out prompts, else the schedule is empty (generate runs the stock path).
        holdout_fraction (`float`, *optional*, defaults to 0.25): share of the prompts' examples held out to
            predict the chosen rule's speed on unseen prompts; in (0, 1).
        cost_cache_length (`int`, *optional*, defaults to 128), cost_repeats (`int`, *optional*, defaults to 9):
            the cost model's cache length and alternating rounds (`cost_model.measure_cost_model`).
    """

    max_draft_tokens: tuple[int, ...] = (1, 2, 3, 4, 6, 8)
    vocabulary_sizes: tuple[int | None, ...] = (None,)
    check_layers: tuple[int, ...] | None = None
    max_layers: int = 12
    thresholds: int = 8
    two_checks: int = 3
    margin: float = 0.02
    holdout_fraction: float = 0.25
    cost_cache_length: int = 128
    cost_repeats: int = 9

    def __post_init__(self):
        _set(self, "max_draft_tokens", _int_tuple("max_draft_tokens", self.max_draft_tokens, 1))
        _set(self, "vocabulary_sizes", _int_tuple("vocabulary_sizes", self.vocabulary_sizes, 2, allow_none=True))
        if self.check_layers is not None:
            _set(self, "check_layers", tuple(sorted(_int_tuple("check_layers", self.check_layers, 1))))
        _int_at_least("max_layers", self.max_layers, 1)
        _int_at_least("thresholds", self.thresholds, 1)
        _int_at_least("two_checks", self.two_checks, 0)
        if not _is_number(self.margin) or not 0.0 <= self.margin < 1.0:
            raise ValueError(f"margin must be a number in [0, 1); got {self.margin!r}.")
        _fraction("holdout_fraction", self.holdout_fraction)
        _int_at_least("cost_cache_length", self.cost_cache_length, 1)
        _int_at_least("cost_repeats", self.cost_repeats, 1)


@dataclass(frozen=True)
class TrainingConfig(_DictMixin):
    """Everything `train_and_calibrate` and `train_on_tables` need besides the model and the data.

    Args:
        method (`str`, *optional*, defaults to `"svm"`): the estimator, one of `TRAIN_METHODS` (see
            `training.train`).
        features (`tuple[str, ...]`, *optional*, defaults to `("gap", "top_prob")`): the columns the classifier
            reads (and collection records), from `policy.features.FEATURES`.
        label (`str`, *optional*, defaults to `"final"`): training target, `"final"` (agree with the dense model)
            or `"gold"`.
        max_rows (`int`, *optional*, defaults to 20000): cap on training rows, drawn stratified by class.
        seed (`int`, *optional*, defaults to 0): seed of the train/calibration split, the subsample and the
            estimators.
        batch_size (`int`, *optional*, defaults to 8): prompts per forward pass when collecting (and generating).
        hidden_states (`bool`, *optional*, defaults to False): keep the last-token hidden states in the collected
            tables (recorded anyway when a gate or a check vocabulary needs them).
        calibration ([`CalibrationConfig`]), gate ([`GateConfig`]), schedule ([`ScheduleConfig`]), generation
            ([`GenerationCalibrationConfig`]): the sub-configs, each with its defaults.
        drafting ([`DraftingConfig`], *optional*): train for lossless `generate` instead (the drafting objective:
            needs `generation.generation_tokens`; calibration and the schedule settings are then not used). None
            (default): an exit classifier calibrated for agreement.
    """

    method: str = "svm"
    features: tuple[str, ...] = ("gap", "top_prob")
    label: str = "final"
    max_rows: int = 20000
    seed: int = 0
    batch_size: int = 8
    hidden_states: bool = False
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    generation: GenerationCalibrationConfig = field(default_factory=GenerationCalibrationConfig)
    drafting: DraftingConfig | None = None

    _NESTED = {"calibration": CalibrationConfig, "gate": GateConfig, "schedule": ScheduleConfig,
               "generation": GenerationCalibrationConfig, "drafting": DraftingConfig}

    def __post_init__(self):
        _one_of("method", self.method, TRAIN_METHODS)
        features = (self.features,) if isinstance(self.features, str) else self.features
        if not isinstance(features, Sequence) or not features or any(f not in FEATURES for f in features):
            raise ValueError(f"features must be a non-empty sequence of names from {list(FEATURES)}; got "
                             f"{self.features!r}.")
        _set(self, "features", tuple(features))
        if self.method in ("gap_rule", "gate_only") and "gap" not in self.features:
            raise ValueError(f"method={self.method!r} reads the 'gap' feature; features={list(self.features)} lack it.")
        _one_of("label", self.label, LABEL_KINDS)
        _int_at_least("max_rows", self.max_rows, 2)
        _int_at_least("seed", self.seed, 0)
        _int_at_least("batch_size", self.batch_size, 1)
        if not isinstance(self.hidden_states, bool):
            raise ValueError(f"hidden_states must be a bool; got {self.hidden_states!r}.")
        for name, kind in self._NESTED.items():
            value = getattr(self, name)
            if not isinstance(value, kind) and not (name == "drafting" and value is None):
                raise ValueError(f"{name} must be a {kind.__name__}; got {type(value).__name__} {value!r:.80} "
                                 "(TrainingConfig.from_dict builds one from a dict).")
        if self.drafting is not None:
            self._check_drafting()
        if self.calibration.knob == "gate" and self.gate.kind is None and self.method != "gate_only":
            raise ValueError("knob='gate' calibrates the gate's thresholds, but the classifier has no gate; train it "
                             "with gate='linear' (GateConfig(kind='linear')) or calibrate with knob='classifier'.")

    def _check_drafting(self) -> None:
        """What the drafting objective cannot run with, named."""
        if self.generation.generation_tokens is None:
            raise ValueError("drafting trains on generated tokens: set generation.generation_tokens (CLI: "
                             "--generation-tokens N; --lossless defaults it).")
        if self.generation.free_running_tokens is not None:
            raise ValueError(f"drafting chooses its rule by predicted speed; free_running_tokens="
                             f"{self.generation.free_running_tokens} certifies agreement instead. Leave it unset.")
        if self.gate.kind is not None or self.method == "gate_only":
            raise ValueError("drafting does not search gate offsets yet; train without a gate (gate=None, a method "
                             "other than 'gate_only').")
