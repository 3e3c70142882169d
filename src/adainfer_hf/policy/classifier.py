"""The exit-classifier artifact: a typed config plus a fitted scikit-learn estimator.

An [`ExitClassifier`] lives beside a base model, like a PEFT adapter: it records which features it reads, when it
may fire, and which model it was trained on (name, revision, layer count, LM-head fingerprint), and it implements
the [`~adainfer_hf.policy.ExitPolicy`] contract the decoder loop calls after each checked layer.

On disk an artifact is a directory with the config as sorted JSON, the estimator pickled with joblib, a pickle-free
safetensors encoding for the estimators this package produces, and a manifest of the sha256 of each, written last and
checked on load (file names: `artifact.constants`).

Pickles execute code when loaded, so a downloaded artifact is read from its safetensors file, and a download that
only has the joblib file is refused unless the caller passes `trust_remote_classifier=True`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import torch
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

from ..architectures.head import fingerprints_match, head_of
from ..artifact.codec import qualified_name
from ..artifact.config import POLICY_FIELDS, ExitClassifierConfig
from ..artifact.constants import CLASSIFIER_GATE_NAME
from ..artifact.hub import ArtifactMixin
from ..artifact.validation import InvalidField, check_fingerprint, check_layer_fields, check_probe
from ..estimators.rules import AlwaysExit, GapThresholdRule
from .base import ExitPolicy, check_dtype_or_raise, check_vocabulary_or_raise
from .features import FEATURES
from .gate import LinearGate
from .nonfinite import NonFiniteRows
from .scoring import device_scorer, logit, score_kind

__all__ = ["ExitClassifier", "ExitClassifierConfig"]

_LABELS = ("final", "gold")
_NONNEGATIVE_FEATURES = ("gap", "top_prob")  # probabilities and their differences: never below 0


class ExitClassifier(ArtifactMixin, ExitPolicy):
    """A fitted exit classifier with its metadata: the AdaInfer stopping signal as a shareable artifact.

    It reads the per-layer features named in `features` (see `adainfer_hf.policy.features.FEATURES`) and decides, for
    each active row, whether to stop after the current layer. Linear estimators (anything with a single-row
    `coef_` and `intercept_`, including `StandardScaler` pipelines and [`~adainfer_hf.estimators.rules.GapThresholdRule`])
    and binary RBF-kernel `SVC`s (behind `StandardScaler` steps or not) are evaluated on the features' device with
    torch, without a host synchronisation (`policy.scoring`); other estimators (other kernels, CRF wrappers, ...)
    run through scikit-learn on the CPU.

    The classifier holds one [`ExitClassifierConfig`]: each keyword argument below is a field of it, readable as a
    property (`clf.threshold`, ...) and changed only through [`~ExitClassifier.replace`], which validates.
    A model keeps its default policy in `model.exit_classifier` (any [`ExitPolicy`], an `ExitClassifier` or not);
    `model(..., exit_policy=...)` / `generate(..., exit_policy=...)` override it for one call (`None`: dense).

    Args:
        estimator (fitted scikit-learn classifier):
            Binary classifier whose positive class `1` means "exit".
        features (`Sequence[str]`, *optional*, defaults to `("gap", "top_prob")`):
            Feature names, in the column order the estimator was trained on.
        threshold (`float`, *optional*):
            `None` fires where `estimator.predict(X) == 1`. Otherwise fires where `score(X) >= threshold`; the
            score is the decision function, or the probability of class 1 for logistic regression (then the
            threshold must lie in (0, 1)). See [`~ExitClassifier.score_kind`].
        min_layer (`int`, *optional*, defaults to 1):
            First 1-based layer after which the classifier may fire.
        check_layers (`Sequence[int]`, *optional*):
            Explicit sorted 1-based layers to check; `None` checks every layer from `min_layer` to `L - 1`.
        decode_check_layers (`Sequence[int]`, *optional*):
            The schedule of cached single-token steps (decode), where a check costs more layers than in a prompt;
            `None` uses `check_layers` there too.
        check_vocabulary (`Sequence[int]`, *optional*):
            Token ids the checks score (stored sorted); `None` = the whole vocabulary. A check then runs only
            these rows of the LM head, and a row that exits gets their logits as its next-token logits (every
            other token `-inf`). Train and calibrate on tables restricted the same way
            (`training.vocabulary.restrict_table`, `training.ScheduleConfig(check_vocabulary=...)`).
        label (`str`, *optional*, defaults to `"final"`):
            What the estimator was trained to predict: `"final"` (the layer's top-1 equals the final layer's) or
            `"gold"` (it equals the gold answer).
        base_model_name_or_path (`str`, *optional*), base_model_revision (`str`, *optional*):
            The base model the classifier was trained on; filled by [`~ExitClassifier.bind`].
        num_layers (`int`, *optional*):
            The base model's decoder layer count; checked by [`~ExitClassifier.validate_for`].
        lm_head_fingerprint (`dict`, *optional*):
            `ExitHead.fingerprint()` of the base model; checked by [`~ExitClassifier.validate_for`].
        calibration (`dict`, *optional*):
            Free-form figures achieved at calibration time (saved in the config).
        config ([`ExitClassifierConfig`], *optional*):
            Start from this config (e.g. one read from disk); the keyword arguments above override its fields.
        gate ([`~adainfer_hf.policy.gate.LinearGate`], *optional*):
            A cheap probe in front of each check: where it does not pass, the check computes no LM head and the
            row goes on. Its fingerprint is recorded in the config (`gate_fingerprint`) and its arrays are saved
            in `exit_gate.safetensors`. Only features that do not read the previous layer's lens can be gated
            (`policy.gate.GATEABLE_FEATURES`). Calibrate with the gate in place: the guarantee covers what runs.

    Example:

    ```python
    >>> from adainfer_hf import ExitClassifier, GapThresholdRule
    >>> clf = ExitClassifier(GapThresholdRule(threshold=0.8).fit([[0.0, 0.0]]))
    >>> clf.save_pretrained("gap-rule")
    >>> ExitClassifier.from_pretrained("gap-rule")
    ExitClassifier(GapThresholdRule, features=('gap', 'top_prob'), threshold=None, min_layer=1, ...)
    ```
    """

    def __init__(self, estimator, *, config: ExitClassifierConfig | None = None, gate: LinearGate | None = None,
                 **fields):
        unknown = sorted(set(fields) - set(POLICY_FIELDS))
        if unknown:
            raise TypeError(
                f"ExitClassifier() got unexpected keyword argument(s) {unknown}; expected fields of "
                f"ExitClassifierConfig: {list(POLICY_FIELDS)}."
            )
        if "gate_fingerprint" in fields:
            raise TypeError("gate_fingerprint is set from the gate: pass gate=LinearGate(...) (or gate=None).")
        if gate is not None and not isinstance(gate, LinearGate):
            raise TypeError(f"gate must be a LinearGate or None; got {type(gate).__name__}.")
        self.estimator = estimator
        self._gate = gate
        self._nonfinite = NonFiniteRows(f"ExitClassifier({type(estimator).__name__})")  # warns once per instance
        config = config or ExitClassifierConfig()
        if gate is not None or config.gate_fingerprint is None:
            fields["gate_fingerprint"] = None if gate is None else gate.fingerprint()
        self._config = _normalized(dataclasses.replace(config, **fields))
        self._validate()

    @property
    def gate(self) -> LinearGate | None:
        """The [`~adainfer_hf.policy.gate.LinearGate`] in front of each check, or None (read-only; see `replace`)."""
        return self._gate

    def _set(self, **changes) -> None:
        """Changes config fields in place, validated as [`~ExitClassifier.replace`] validates (a failed change
        leaves the classifier as it was). Only for [`~ExitClassifier.bind`] and
        `training.schedule.schedule_classifier`, which document that they complete the classifier they get."""
        old = self._config
        self._config = _normalized(dataclasses.replace(old, **changes))
        try:
            self._validate()
        except Exception:
            self._config = old
            raise

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        """Check every parameter against the estimator and each other; the one place that raises on bad values."""
        est = self.estimator
        self._score_kind = score_kind(est)
        _check_estimator(est, self.features)

        check_layer_fields(self._config)
        self._validate_gate()
        if self.label not in _LABELS:
            raise ValueError(f"label={self.label!r} is not supported; expected one of {list(_LABELS)}.")
        check_dtype_or_raise(self.check_dtype)
        check_fingerprint(self.lm_head_fingerprint)
        width = (self.lm_head_fingerprint or {}).get("shape", [None])[0]
        self._config = dataclasses.replace(self._config,
                                           check_vocabulary=check_vocabulary_or_raise(self.check_vocabulary, width))

        if self.threshold is not None:
            if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float, np.number)):
                raise ValueError(f"threshold must be a number or None; got {self.threshold!r}.")
            self._config = dataclasses.replace(self._config, threshold=float(self.threshold))
            if not math.isfinite(self.threshold):
                raise ValueError(f"threshold must be finite; got {self.threshold!r}.")
            if self.score_kind == "probability" and not 0.0 <= self.threshold <= 1.0:
                raise ValueError(f"threshold={self.threshold} is a probability for {type(est).__name__}; "
                                 "expected 0 <= t <= 1.")
        # The on-device fast path: a linear margin or an RBF SVM's decision function, else None (scikit-learn).
        self._scorer = device_scorer(est, self.score_kind)
        self._warned: set = set()

    def exits_where_gate_passes(self) -> bool:
        """True for a gated rule that fires on every finite row (`method="gate_only"`: an
        [`~adainfer_hf.estimators.rules.AlwaysExit`]): its checks exit exactly where the gate passes, so the loop skips their lens (see `ExitPolicy.exits_where_gate_passes`).
        The gate never passes a row whose hidden state is not finite."""
        return self._gate is not None and _fires_on_every_row(self.estimator, self.features, self.threshold)

    def _validate_gate(self) -> None:
        fingerprint = self._config.gate_fingerprint
        if self._gate is None:
            if fingerprint is not None:
                raise ValueError(f"gate_fingerprint={fingerprint!r} names a gate, but no gate was given.")
            return
        if fingerprint != self._gate.fingerprint():
            raise ValueError(f"gate_fingerprint={fingerprint!r} does not match the gate's arrays "
                             f"({self._gate.fingerprint()!r}); the gate file was changed or belongs to another "
                             "classifier.")
        self._gate.check_for(self.features, self.num_layers)

    @property
    def score_kind(self) -> str:
        """What [`~ExitClassifier.score`] returns and `threshold` compares against: `"probability"` (P(exit), for
        logistic regression and estimators without a decision function), `"decision"` (the signed margin) or
        `"label"` (the 0/1 prediction)."""
        return self._score_kind

    # ------------------------------------------------------------------ decisions
    def score(self, X) -> np.ndarray:
        """Exit score per row (higher = more confident the row may exit); see [`~ExitClassifier.score_kind`].

        Args:
            X (array-like of shape `(n_rows, len(features))`): feature matrix.

        Returns:
            `np.ndarray` of shape `(n_rows,)`, float64.
        """
        kind = self.score_kind
        if kind == "decision":
            return np.asarray(self.estimator.decision_function(X), dtype=np.float64).reshape(-1)
        if kind == "probability":
            return np.asarray(self.estimator.predict_proba(X), dtype=np.float64)[:, 1]
        return np.asarray(self.estimator.predict(X), dtype=np.float64).reshape(-1)

    def exit_mask(self, X) -> np.ndarray:
        """Host-side decision: `True` where a row exits (`predict == 1`, or `score >= threshold` if set).

        Args:
            X (array-like of shape `(n_rows, len(features))`): feature matrix.

        Returns:
            `np.ndarray` of bools, shape `(n_rows,)`; False for rows with a non-finite feature (warned once).
        """
        X, finite = self._nonfinite.host(X)
        if self.threshold is not None:
            return (self.score(X) >= self.threshold) & finite
        predicted = np.asarray(self.estimator.predict(X)).reshape(-1)
        if predicted.dtype.kind not in "biuf":  # "yes" == 1 is False: string labels would never fire
            raise ValueError(f"estimator {type(self.estimator).__name__} predicted {sorted(set(predicted.tolist()))!r}; "
                             "labels must be 0/1 or bool (1 = exit).")
        return (predicted == 1) & finite

    def decide(self, features: torch.Tensor, layer: int, rows: torch.Tensor, state=None) -> torch.Tensor:
        """The decoder loop's hook (see `ExitPolicy.decide`): a BoolTensor `[n_rows]` on `features.device`
        (row-wise: `state` is unused).

        Linear estimators and RBF-kernel SVMs are evaluated on the features' device with no host synchronisation
        (`policy.scoring`); others copy the features to the CPU once and call scikit-learn. A row with a
        non-finite feature (nan/inf) never exits at that layer, whatever the estimator; the classifier warns once
        (`RuntimeWarning`).
        """
        if features.dim() != 2 or features.shape[1] != len(self.features):
            raise ValueError(f"decide() expects features of shape [n_rows, {len(self.features)}] for "
                             f"{list(self.features)}; got {tuple(features.shape)}.")
        if self._scorer is not None:
            finite = self._nonfinite.finite_rows(features)
            margin = self._scorer.margin(features)
            # `threshold` may be changed after construction (calibration sweeps it), so the cut is not cached.
            if self.threshold is None:
                return (margin > 0) & finite  # exactly `predict`: class 1 where the margin is > 0
            if self.score_kind == "probability":
                return (margin >= logit(self.threshold)) & finite  # P >= t  <=>  logit >= logit(t), on device
            return (margin >= self.threshold) & finite
        if features.shape[0] == 0:
            return torch.zeros(0, dtype=torch.bool, device=features.device)
        X = features.detach().to("cpu", torch.float64).numpy()
        return torch.from_numpy(self.exit_mask(X)).to(features.device)

    # ------------------------------------------------------------------ the base model
    def bind(self, model) -> ExitClassifier:
        """Record `model`'s identity (name, revision, layer count, LM-head fingerprint) where still unset.

        Args:
            model (`PreTrainedModel`): the base model the classifier was trained for.

        Returns:
            `ExitClassifier`: `self`.
        """
        config = getattr(model, "config", None)
        filled = {}
        if self.num_layers is None:
            filled["num_layers"] = head_of(model).spec.num_layers(model)
        if self.lm_head_fingerprint is None:
            filled["lm_head_fingerprint"] = head_of(model).fingerprint()
        if self.base_model_name_or_path is None:
            name = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None)
            filled["base_model_name_or_path"] = name or None
        if self.base_model_revision is None:
            filled["base_model_revision"] = getattr(config, "_commit_hash", None) or None
        self._set(**filled)
        return self

    def validate_for(self, model, ignore_mismatch: bool = False) -> None:
        """Check that `model` is the base model this classifier was trained on.

        Compares the recorded `num_layers` and `lm_head_fingerprint` (when recorded) with the model's.

        Args:
            model (`PreTrainedModel`): the model about to use this classifier.
            ignore_mismatch (`bool`, *optional*, defaults to `False`): warn once instead of raising.

        Raises:
            `ValueError`: naming both values, when they differ and `ignore_mismatch` is False.
        """
        problems = []
        n_model = head_of(model).spec.num_layers(model)
        if self.min_layer >= n_model:  # an unbound classifier would silently never exit
            raise ValueError(f"min_layer={self.min_layer} leaves nothing to check on a model with {n_model} decoder "
                             f"layers (checks run after layers 1..{n_model - 1}); use a min_layer < {n_model}.")
        hidden_size = getattr(getattr(model, "config", None), "hidden_size", None)
        if self._gate is not None and hidden_size is not None and self._gate.hidden_size != hidden_size:
            raise ValueError(f"the gate reads hidden states of size {self._gate.hidden_size}, but the model's "
                             f"hidden_size is {hidden_size}.")
        if self.num_layers is not None and n_model != self.num_layers:
            problems.append(f"num_layers: classifier {self.num_layers} vs model {n_model}")
        if self.lm_head_fingerprint is not None:
            fp = head_of(model).fingerprint()
            if not fingerprints_match(self.lm_head_fingerprint, fp):
                ours = self.lm_head_fingerprint
                problems.append(
                    f"LM-head fingerprint: classifier {ours.get('sha256')} (shape {ours.get('shape')}) vs "
                    f"model {fp.get('sha256')} (shape {fp.get('shape')})"
                )
        if not problems:
            return
        name = getattr(getattr(model, "config", None), "_name_or_path", None)
        message = (
            f"ExitClassifier (trained on {self.base_model_name_or_path!r}) does not match the model "
            f"{name!r}: {'; '.join(problems)}. Its exit decisions are only meaningful for its base model; pass "
            "ignore_mismatch=True to use it anyway."
        )
        if not ignore_mismatch:
            raise ValueError(message)
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, UserWarning, stacklevel=2)

    # ------------------------------------------------------------------ serialisation
    @property
    def config(self) -> ExitClassifierConfig:
        """A copy of this classifier's [`ExitClassifierConfig`] in JSON types, with `estimator_class` filled
        (versions are filled at save time)."""
        c = self._config
        return dataclasses.replace(
            c,
            estimator_class=qualified_name(self.estimator),
            features=list(c.features),
            min_layer=int(c.min_layer),
            check_layers=None if c.check_layers is None else [int(k) for k in c.check_layers],
            decode_check_layers=None if c.decode_check_layers is None else [int(k) for k in c.decode_check_layers],
            num_layers=None if c.num_layers is None else int(c.num_layers),
            check_vocabulary=None if c.check_vocabulary is None else [int(t) for t in c.check_vocabulary],
        )

    def replace(self, **changes) -> ExitClassifier:
        """A copy with the same estimator (and gate) and the given config fields changed (`threshold=`,
        `check_layers=`, `gate=`, ...), validated as the constructor validates."""
        gate = changes.pop("gate", self._gate)
        config = dataclasses.replace(self._config, gate_fingerprint=None)
        return type(self)(self.estimator, config=dataclasses.replace(config, **changes), gate=gate)

    def _gate_tensors(self):
        """The gate's arrays, saved as `exit_gate.safetensors` (see `artifact.hub.ArtifactMixin`)."""
        return None if self._gate is None else self._gate.to_tensors()

    @classmethod
    def _from_artifact(cls, config: ExitClassifierConfig, estimator, gate_tensors=None) -> ExitClassifier:
        """The classifier of a loaded artifact (see `artifact.hub.ArtifactMixin`); a gate that does not match the
        config's fingerprint is refused."""
        gate = None
        if gate_tensors is not None:
            gate = LinearGate.from_tensors(gate_tensors, source=CLASSIFIER_GATE_NAME)
            if gate.fingerprint() != config.gate_fingerprint:
                raise ValueError(f"{CLASSIFIER_GATE_NAME} has fingerprint {gate.fingerprint()!r} but the config "
                                 f"records gate_fingerprint={config.gate_fingerprint!r}.")
        return cls(estimator, config=config, gate=gate)

    def __repr__(self) -> str:
        base = f", base_model={self.base_model_name_or_path!r}" if self.base_model_name_or_path else ""
        layers = f", num_layers={self.num_layers}" if self.num_layers is not None else ""
        check = f", check_layers={self.check_layers}" if self.check_layers is not None else ""
        if self._gate is not None:
            check += f", gate={self._gate!r}"
        if self.decode_check_layers is not None:
            check += f", decode_check_layers={self.decode_check_layers}"
        return (
            f"{type(self).__name__}({type(self.estimator).__name__}, features={self.features}, "
            f"threshold={self.threshold}, min_layer={self.min_layer}{check}{base}{layers})"
        )


class _ConfigField:
    """A read-only view of one field of an `ExitClassifier`'s config (a change goes through `replace`)."""

    def __init__(self, name: str):
        self.name = name
        self.__doc__ = f"`ExitClassifierConfig.{name}` of this classifier (read-only; see `replace`)."

    def __get__(self, obj, owner=None):
        return self if obj is None else getattr(obj._config, self.name)

    def __set__(self, obj, value):
        raise AttributeError(
            f"{type(obj).__name__}.{self.name} is read-only (the config is the one source of truth); "
            f"use `clf = clf.replace({self.name}=...)`, which validates the change."
        )


for _name in POLICY_FIELDS:  # the config's fields, as read-only properties
    setattr(ExitClassifier, _name, _ConfigField(_name))
del _name


def _normalized(config: ExitClassifierConfig) -> ExitClassifierConfig:
    """The policy fields of `config` in the types the classifier exposes (tuples), save-time fields reset."""
    values = {name: getattr(config, name) for name in POLICY_FIELDS}
    features = values["features"]
    values["features"] = (features,) if isinstance(features, str) else tuple(features)
    for name in ("check_layers", "decode_check_layers", "check_vocabulary"):
        values[name] = None if values[name] is None else tuple(values[name])
    return ExitClassifierConfig(**values)


def _check_estimator(est, features) -> None:
    """Raises `ValueError` when `est` is not a fitted binary scikit-learn classifier of the `features` columns,
    or cannot score rows of that many columns (one probe call: an estimator without `n_features_in_` that reads a
    column it is not given fails here, not at the first forward)."""
    if not hasattr(est, "predict"):
        raise ValueError(f"estimator must be a scikit-learn classifier with `predict`; got {type(est).__name__}.")
    try:
        check_is_fitted(est)
    except NotFittedError as err:
        raise ValueError(f"estimator {type(est).__name__} is not fitted; call `fit` before wrapping it.") from err
    except TypeError as err:
        raise ValueError(f"estimator {est!r} is not a scikit-learn estimator: {err}") from err

    if not features or not all(isinstance(f, str) for f in features):
        raise ValueError(f"features must be a non-empty sequence of names; got {features!r}.")
    unknown = [f for f in features if f not in FEATURES]
    if unknown:
        raise ValueError(f"Unknown feature(s) {unknown}; expected names from {sorted(FEATURES)}.")
    if len(set(features)) != len(features):
        raise ValueError(f"features contains duplicates: {list(features)}.")
    n_in = getattr(est, "n_features_in_", None)
    if n_in is not None and int(n_in) != len(features):
        raise ValueError(f"estimator {type(est).__name__} was fitted on n_features_in_={n_in} columns but "
                         f"features={list(features)} names {len(features)}.")
    classes = getattr(est, "classes_", None)
    if classes is not None and (len(classes) != 2 or classes[1] != 1):
        labels = np.asarray(classes).tolist()
        raise ValueError(f"estimator must be binary with classes [0, 1] (1 = exit); got classes_={labels!r}: "
                         "labels must be 0/1 or bool.")
    try:
        check_probe(est, len(features))
    except InvalidField as err:
        raise ValueError(f"estimator {type(est).__name__} cannot score rows of the {len(features)} feature(s) "
                         f"{list(features)} it would be given: {err}.") from err


def _fires_on_every_row(estimator, features, threshold) -> bool:
    """Whether a classifier fires on every row with finite features: an `AlwaysExit` (margin 1) whose threshold,
    if any, is at most 1, or a `GapThresholdRule` on a feature that is never below 0 whose cut is below 0
    (`x - t > 0` with `threshold` None, else `x - t >= threshold`; how `gate_only` classifiers were saved before
    `AlwaysExit`)."""
    if isinstance(estimator, AlwaysExit):
        return threshold is None or float(threshold) <= AlwaysExit.MARGIN
    if not isinstance(estimator, GapThresholdRule) or features[estimator.feature_index] not in _NONNEGATIVE_FEATURES:
        return False
    cut = float(estimator.threshold) + (0.0 if threshold is None else float(threshold))
    return cut < 0 if threshold is None else cut <= 0
