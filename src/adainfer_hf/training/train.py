"""Training exit classifiers on a [`~adainfer_hf.collect.FeatureTable`].

Every method returns an [`~adainfer_hf.classifier.ExitClassifier`] (not yet bound to a model, not yet
calibrated):

| method | estimator | on-device decision |
|---|---|---|
| `"svm"` (the paper's) | `Pipeline(StandardScaler, SVC(kernel="rbf"))` | no (scikit-learn on the CPU) |
| `"linear_svm"` | `LinearSVC` with the scaler folded into `coef_`/`intercept_` | yes (one matmul) |
| `"logistic"` | `LogisticRegression`, scaler folded the same way | yes |
| `"crf"` | [`CRFExitEstimator`] over each prompt's layer sequence (`pip install adainfer-hf[crf]`) | no, see below |
| `"gap_rule"` | `rules.GapThresholdRule(threshold=0.8)`, nothing learned | yes |
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_array, check_is_fitted

from ..policy.classifier import ExitClassifier
from .collect import LABEL_KINDS, FeatureTable

__all__ = [
    "METHODS",
    "CRFExitEstimator",
    "fold_scaler",
    "table_sequences",
    "train_and_calibrate",
    "train_exit_classifier",
]

METHODS = ("svm", "linear_svm", "logistic", "crf", "gap_rule")


def _stratified_rows(y: np.ndarray, max_rows: int, seed: int) -> np.ndarray:
    """Row indices: all rows, or a class-stratified random subset of `max_rows`."""
    n = y.shape[0]
    if n <= max_rows:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    picked = []
    for cls in np.unique(y):
        idx = np.flatnonzero(y == cls)
        k = max(1, round(max_rows * idx.size / n))  # keep every class, even a rare one
        picked.append(rng.choice(idx, size=min(k, idx.size), replace=False))
    return np.sort(np.concatenate(picked))


def fold_scaler(pipeline, linear_cls):
    """Rewrites a fitted `Pipeline(StandardScaler, linear model)` as one `linear_cls` on the raw features.

    `w . (x - mean) / scale + b == (w / scale) . x + (b - w . mean / scale)`, so the artifact is a plain linear model
    (`coef_`, `intercept_`) that `ExitClassifier` evaluates as one matmul on the features' device.
    """
    scaler, model = pipeline.steps[0][1], pipeline.steps[-1][1]
    coef = model.coef_ / scaler.scale_
    folded = linear_cls(**model.get_params())
    folded.coef_ = coef.astype(np.float64)
    folded.intercept_ = (model.intercept_ - coef @ scaler.mean_).astype(np.float64)
    folded.classes_ = model.classes_
    folded.n_features_in_ = coef.shape[1]
    return folded


class CRFExitEstimator(ClassifierMixin, BaseEstimator):
    """A linear-chain CRF over the layer sequence of each prompt (labels: 1 = "the top-1 is already right").

    The CRF scores a whole sequence of layers, so its decisions are meaningful per *sequence*:
    [`~CRFExitEstimator.predict_sequences`] (Viterbi) and [`~CRFExitEstimator.causal_scores`] (P(label 1 at layer
    k | layers 1..k), the score a live policy could use) take a list of `[num_layers, F]` arrays. The row-wise
    `predict`/`predict_proba` that `ExitClassifier.decide` calls treat every row as a sequence of length one: they
    exist for API compatibility and are NOT what calibration measured. Live CRF decisions need the decoder loop to
    hand the policy each row's feature history (see the project notes on a stateful policy).

    Args:
        c1 (`float`, *optional*, defaults to 0.05), c2 (`float`, *optional*, defaults to 0.05): L1 / L2 penalties.
        max_iterations (`int`, *optional*, defaults to 100): L-BFGS iterations.
        feature_names (`Sequence[str]`, *optional*): column names, used in the CRF's feature keys.
    """

    def __init__(self, c1: float = 0.05, c2: float = 0.05, max_iterations: int = 100, feature_names=None):
        self.c1 = c1
        self.c2 = c2
        self.max_iterations = max_iterations
        self.feature_names = feature_names

    @staticmethod
    def _crfsuite():
        try:
            import sklearn_crfsuite
        except ImportError as err:
            raise ImportError("method='crf' needs sklearn-crfsuite: `pip install adainfer-hf[crf]`.") from err
        return sklearn_crfsuite

    def _names(self, width: int) -> list[str]:
        return list(self.feature_names) if self.feature_names is not None else [f"f{i}" for i in range(width)]

    def _to_dicts(self, seq: np.ndarray) -> list[dict]:
        # The raw value is a linear term; a coarse bin adds the non-linearity a linear CRF otherwise lacks.
        names = self._names(seq.shape[1])
        return [
            {
                "bias": 1.0,
                **{n: float(v) for n, v in zip(names, row, strict=True)},
                **{
                    f"{n}@{int(round(np.clip(v, -1.0, 1.0) * 5))}": 1.0
                    for n, v in zip(names, row, strict=True)
                },
            }
            for row in seq
        ]

    def fit(self, sequences: Sequence[np.ndarray], labels: Sequence[np.ndarray]):
        """Fits on a list of `[T_i, F]` feature sequences and their `[T_i]` 0/1 label sequences."""
        seqs = [check_array(s) for s in sequences]
        if not seqs:
            raise ValueError("CRFExitEstimator.fit got no sequences.")
        crf = self._crfsuite().CRF(
            algorithm="lbfgs",
            c1=self.c1,
            c2=self.c2,
            max_iterations=self.max_iterations,
            all_possible_transitions=True,
        )
        crf.fit([self._to_dicts(s) for s in seqs], [[str(int(v)) for v in y] for y in labels])
        self.crf_ = crf
        self.n_features_in_ = seqs[0].shape[1]
        self.classes_ = np.array([0, 1])
        return self

    def _marginal_one(self, seq_dicts: list[dict]) -> np.ndarray:
        return np.array([m.get("1", 0.0) for m in self.crf_.predict_marginals_single(seq_dicts)])

    def predict_sequences(self, sequences: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Viterbi labels (int `[T_i]`) of each whole sequence."""
        check_is_fitted(self)
        return [
            np.array([int(t) for t in self.crf_.predict_single(self._to_dicts(check_array(s)))])
            for s in sequences
        ]

    def causal_scores(self, sequences: Sequence[np.ndarray]) -> list[np.ndarray]:
        """P(label 1 at position k | positions 1..k) for every k: what a layer-by-layer policy can know."""
        check_is_fitted(self)
        out = []
        for s in sequences:
            dicts = self._to_dicts(check_array(s))
            out.append(np.array([self._marginal_one(dicts[: k + 1])[-1] for k in range(len(dicts))]))
        return out

    def extend_history(self, history: list, row: np.ndarray) -> float:
        """Appends one layer's features `row` [F] to a sequence `history` (a list, initially empty, kept by the
        caller) and returns P(label 1 at this layer | the layers so far): `causal_scores`, one layer at a time."""
        check_is_fitted(self)
        history.extend(self._to_dicts(np.asarray(row, dtype=np.float64).reshape(1, -1)))
        return float(self._marginal_one(history)[-1])

    def predict_proba(self, X) -> np.ndarray:
        """Row-wise P(exit), each row taken as a length-1 sequence (see the class docstring)."""
        check_is_fitted(self)
        X = check_array(X, ensure_min_samples=0)
        p = np.array([self._marginal_one(self._to_dicts(row[None]))[0] for row in X])
        return np.stack([1.0 - p, p], axis=1) if p.size else np.zeros((0, 2))

    def predict(self, X) -> np.ndarray:
        """Row-wise labels, each row taken as a length-1 sequence (see the class docstring)."""
        return (self.predict_proba(X)[:, 1] > 0.5).astype(int)


def table_sequences(table: FeatureTable, features: Sequence[str], label: str | None = None):
    """Per-prompt `[L-1, F]` feature sequences (layer order) and, with `label`, their label sequences."""
    X = table.columns(features)
    y = table.labels(label) if label else None
    order = np.lexsort((table.layer, table.prompt_id))
    bounds = np.searchsorted(table.prompt_id[order], np.arange(table.num_prompts + 1))
    seqs = [X[order[a:b]] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    labs = None if y is None else [y[order[a:b]] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return seqs, labs


def train_exit_classifier(
    table: FeatureTable,
    method: str = "svm",
    features: Sequence[str] = ("gap", "top_prob"),
    label: str = "final",
    class_weight: str | dict | None = "balanced",
    max_rows: int = 20000,
    seed: int = 0,
) -> ExitClassifier:
    """Trains an exit classifier on a feature table.

    Args:
        table ([`~adainfer_hf.collect.FeatureTable`]): training rows (one per prompt and layer).
        method (`str`, *optional*, defaults to `"svm"`): one of `METHODS` (see the module docstring).
        features (`Sequence[str]`, *optional*, defaults to `("gap", "top_prob")`): columns the classifier reads.
        label (`str`, *optional*, defaults to `"final"`): `"final"` (agree with the dense model) or `"gold"`.
        class_weight (`str`, `dict` or `None`, *optional*, defaults to `"balanced"`): early layers are mostly
            label 0, so classes are reweighted (ignored by `"crf"` and `"gap_rule"`).
        max_rows (`int`, *optional*, defaults to 20000): cap on training rows, drawn stratified by class (for
            `"crf"`: whole prompts, `max_rows // (L-1)` of them).
        seed (`int`, *optional*, defaults to 0): seed of the subsample and of the estimators.

    Returns:
        [`~adainfer_hf.classifier.ExitClassifier`]: `threshold=None`, `min_layer=1`; call
        `calibrate.calibrate` to choose both, then `bind(model)`.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC, LinearSVC

    if method not in METHODS:
        raise ValueError(f"method={method!r} is not supported; expected one of {list(METHODS)}.")
    if label not in LABEL_KINDS:
        raise ValueError(f"label={label!r} is not supported; expected one of {list(LABEL_KINDS)}.")
    if not isinstance(max_rows, int) or max_rows < 2:
        raise ValueError(f"max_rows must be an int >= 2; got {max_rows!r}.")
    features = (features,) if isinstance(features, str) else tuple(features)
    X_all, y_all = table.columns(features).astype(np.float64), table.labels(label)
    info = {
        "method": method,
        "label": label,
        "rows": int(len(table)),
        "prompts": table.num_prompts,
        "positive_rate": float(y_all.mean()) if y_all.size else 0.0,
    }

    if method == "gap_rule":
        from ..estimators.rules import GapThresholdRule

        if "gap" not in features:
            raise ValueError(f"method='gap_rule' reads the 'gap' feature; features={list(features)} lack it.")
        estimator = GapThresholdRule(feature_index=features.index("gap"), threshold=0.8).fit(X_all[:1])
    elif method == "crf":
        seqs, labs = table_sequences(table, features, label)
        L = int(table.num_layers.max()) if table.num_prompts else 2
        n_prompts = max(1, max_rows // max(1, L - 1))
        if len(seqs) > n_prompts:
            keep = np.sort(np.random.default_rng(seed).choice(len(seqs), size=n_prompts, replace=False))
            seqs, labs = [seqs[i] for i in keep], [labs[i] for i in keep]
        estimator = CRFExitEstimator(feature_names=list(features)).fit(seqs, labs)
        info["rows_used"] = int(sum(len(s) for s in seqs))
    else:
        rows = _stratified_rows(y_all, max_rows, seed)
        X, y = X_all[rows], y_all[rows]
        counts = np.bincount(y, minlength=2)
        if counts.min() == 0:
            raise ValueError(
                f"label={label!r} has a single class in the training rows (counts [no-exit, exit] = "
                f"{counts.tolist()}); collect more or more varied prompts, or use method='gap_rule'."
            )
        if method == "svm":
            estimator = make_pipeline(
                StandardScaler(),
                SVC(kernel="rbf", class_weight=class_weight, cache_size=500, random_state=seed),
            ).fit(X, y)
        elif method == "linear_svm":
            pipe = make_pipeline(
                StandardScaler(), LinearSVC(class_weight=class_weight, max_iter=20000, random_state=seed)
            ).fit(X, y)
            estimator = fold_scaler(pipe, LinearSVC)
        else:  # logistic
            pipe = make_pipeline(
                StandardScaler(),
                LogisticRegression(class_weight=class_weight, max_iter=2000, random_state=seed),
            ).fit(X, y)
            estimator = fold_scaler(pipe, LogisticRegression)
        info["rows_used"] = int(rows.size)
    # A table collected with a half-precision check head trains a classifier that checks the same way.
    return ExitClassifier(estimator, features=features, label=label, calibration={"training": info},
                          check_dtype=table.meta.get("check_dtype"))


def train_and_calibrate(
    model,
    tokenizer,
    prompts,
    method: str = "svm",
    features: Sequence[str] = ("gap", "top_prob"),
    label: str = "final",
    target_agreement: float = 0.99,
    delta: float = 0.1,
    calibration_fraction: float = 0.5,
    min_layers: Sequence[int] | None = None,
    max_rows: int = 20000,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
    check_cost: float | str | None = "auto",
    check_phase: str = "both",
    check_length: int | None = None,
    check_dtype: str | None = None,
):
    """The whole recipe: collect features, split prompts, train, calibrate on the held-out part, choose the check
    schedule, bind to `model`.

    Prompts are split by example (task and example index), so the same question asked with different numbers of
    shots lands on one side only: the calibration prompts are disjoint from the training ones.

    Args:
        model, tokenizer: an AdaInfer model (see `collect.load_adainfer_model`) and its tokenizer.
        prompts (`Sequence[data.Prompt]`): all prompts; `calibration_fraction` of their examples calibrate.
        method, features, label, max_rows, seed: see [`train_exit_classifier`].
        target_agreement, delta, min_layers: see `calibrate.calibrate`.
        calibration_fraction (`float`, *optional*, defaults to 0.5): share of examples held out for calibration.
        batch_size (`int`, *optional*, defaults to 8), progress (`bool`, *optional*, defaults to `True`): see
            `collect.collect_features`.
        check_cost (`float`, `"auto"` or `None`, *optional*, defaults to `"auto"`): one check's cost in decoder
            layers for `schedule.schedule_classifier`; "auto" measures it on the model's device at the prompts'
            median length and for one token; None checks every layer.
        check_phase (`str`, *optional*, defaults to `"both"`): "both" chooses one schedule for prompts and one for
            generated tokens (`decode_check_layers`) from the two measured costs; "prefill" or "decode" chooses one
            schedule for all steps from that phase's cost.
        check_length (`int`, *optional*): prompt length at which a check is measured (default: the prompts'
            median length).
        check_dtype (`str`, *optional*): run the checks' LM head in "bfloat16" or "float16" (cheaper on an fp32
            model); features are collected, calibrated and costed with the same head, and the artifact keeps it.

    Returns:
        `(classifier, train_table, calibration_table)`: the calibrated, bound [`ExitClassifier`] and both tables.
    """
    from ..data.prompts import split_examples
    from .collect import collect_features

    if not 0.0 < calibration_fraction < 1.0:
        raise ValueError(f"calibration_fraction must lie in (0, 1); got {calibration_fraction!r}.")
    prompts = list(prompts)
    keys = sorted({(p.task, p.index) for p in prompts})
    if len(keys) < 2:
        raise ValueError(
            f"Need prompts for at least 2 distinct examples to split train/calibration; got {len(keys)}."
        )
    train_keys = split_examples(keys, [1.0 - calibration_fraction], seed=seed)[0]
    train_keys = set(train_keys)
    is_train = np.array([(p.task, p.index) in train_keys for p in prompts])
    if is_train.all() or not is_train.any():
        raise ValueError(
            f"calibration_fraction={calibration_fraction} leaves one side of the split empty "
            f"({len(keys)} examples)."
        )
    table = collect_features(model, tokenizer, prompts, features=tuple(features), batch_size=batch_size,
                             progress=progress, check_dtype=check_dtype)
    train_table = table.select_prompts(np.flatnonzero(is_train))
    calib_table = table.select_prompts(np.flatnonzero(~is_train))
    if check_length is None:
        check_length = int(np.median([len(tokenizer(p.text).input_ids) for p in prompts]))
    clf = train_on_tables(
        model, train_table, calib_table, method=method, features=features, label=label, max_rows=max_rows,
        seed=seed, target_agreement=target_agreement, delta=delta, min_layers=min_layers, check_cost=check_cost,
        check_phase=check_phase, check_length=check_length)
    return clf, train_table, calib_table


def train_on_tables(
    model,
    train_table: FeatureTable,
    calib_table: FeatureTable,
    method: str = "svm",
    features: Sequence[str] = ("gap", "top_prob"),
    label: str = "final",
    max_rows: int = 20000,
    seed: int = 0,
    target_agreement: float = 0.99,
    delta: float = 0.1,
    min_layers: Sequence[int] | None = None,
    check_cost: float | str | None = "auto",
    check_phase: str = "both",
    check_length: int = 256,
):
    """Train on `train_table`, calibrate on `calib_table`, choose the check schedules, bind to `model`.

    The tables' `check_dtype` (see `collect.collect_features`) carries into the classifier and the measured check
    cost. Arguments as in [`train_and_calibrate`]; `check_length` is the prompt length a check is measured at.

    Returns:
        The calibrated, scheduled, bound [`ExitClassifier`].
    """
    from .calibrate import calibrate
    from .schedule import resolve_check_costs, schedule_classifier

    clf = train_exit_classifier(
        train_table, method=method, features=features, label=label, max_rows=max_rows, seed=seed
    )
    clf = calibrate(clf, calib_table, target_agreement=target_agreement, delta=delta, min_layers=min_layers)
    cost, decode_cost = resolve_check_costs(model, check_cost, seq_len=check_length, phase=check_phase,
                                            check_dtype=clf.check_dtype)
    if cost is not None:
        schedule_classifier(clf, calib_table, cost, decode_check_cost=decode_cost)
    return clf.bind(model)
