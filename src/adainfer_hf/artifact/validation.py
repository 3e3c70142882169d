"""Load-time checks of an artifact's contents, so that a crafted or damaged file fails when it is loaded, with a
`ValueError` naming the field, instead of later inside numpy, scikit-learn or libsvm.

- `check_config_types`: the JSON types of `exit_classifier_config.json`'s fields, and the LM-head fingerprint;
- `check_layer_fields`, `check_fingerprint`: the values of a config's layer fields and fingerprint (run by
  `ExitClassifier` on every config it holds, loaded or not);
- `check_fitted_state`: the constructor parameters of an estimator rebuilt from the safetensors encoding (scikit-learn's
  own constraints), and every fitted array and scalar against each other and `n_features_in_` (shapes, dtypes libsvm
  needs, finiteness, index ranges);
- `probe_rows` / `check_probe`: the fixed rows every probe of an estimator uses, and one call on them, so that an
  estimator that cannot score rows of its declared width fails when it is loaded or wrapped, not at the first forward.
"""

from __future__ import annotations

import math

import numpy as np

from ..compat import validate_estimator_params

__all__ = [
    "InvalidField",
    "check_config_types",
    "check_fingerprint",
    "check_fitted_state",
    "check_layer_fields",
    "check_probe",
    "fingerprint_problem",
    "probe_rows",
]

_NONE = type(None)
# JSON types of the config fields (ExitClassifierConfig; the fingerprint has its own check); values and ranges are
# ExitClassifier._validate's job.
_CONFIG_TYPES = {
    "estimator_class": ((str, _NONE), "a string or null"),
    "features": ((list,), "a list of feature names"),
    "threshold": ((int, float, _NONE), "a number or null"),
    "min_layer": ((int,), "an int"),
    "check_layers": ((list, _NONE), "a list of ints or null"),
    "decode_check_layers": ((list, _NONE), "a list of ints or null"),
    "check_dtype": ((str, _NONE), "a string or null"),
    "check_vocabulary": ((list, _NONE), "a list of token ids or null"),
    "label": ((str,), "a string"),
    "base_model_name_or_path": ((str, _NONE), "a string or null"),
    "base_model_revision": ((str, _NONE), "a string or null"),
    "num_layers": ((int, _NONE), "an int or null"),
    "calibration": ((dict, _NONE), "an object or null"),
    "gate_fingerprint": ((str, _NONE), "a string or null"),
    "drafting": ((bool,), "true or false"),
    "versions": ((dict,), "an object"),
    "safe_format": ((str, _NONE), "a string or null"),
    "format_version": ((int,), "an int"),
}


class InvalidField(ValueError):
    """A field of an artifact file that is missing, of the wrong type or inconsistent with another."""


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def fingerprint_problem(value) -> str | None:
    """What is wrong with an `lm_head_fingerprint` (see `architectures.lm_head_fingerprint`), or `None`."""
    if not isinstance(value, dict):
        return f"must be an object with 'shape' and 'sample'; got {type(value).__name__} {value!r:.60}"
    shape, sample, digest = value.get("shape"), value.get("sample"), value.get("sha256")
    if not isinstance(shape, list) or not shape or not all(
        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape
    ):
        return f"['shape'] must be a non-empty list of positive ints; got {shape!r:.60}"
    if not isinstance(sample, list):
        return f"['sample'] must be a list of numbers; got {type(sample).__name__} {sample!r:.60}"
    for i, v in enumerate(sample):
        if not _is_number(v) or not math.isfinite(v):
            return f"['sample'][{i}] must be a finite number; got {v!r:.60}"
    if digest is not None and not isinstance(digest, str):
        return f"['sha256'] must be a string; got {digest!r:.60}"
    return None


def check_fingerprint(value) -> None:
    """Raises `ValueError` when `value` (an `lm_head_fingerprint`, or `None`) is malformed."""
    problem = None if value is None else fingerprint_problem(value)
    if problem is not None:
        raise ValueError(f"lm_head_fingerprint{'' if problem[0] == '[' else ' '}{problem}.")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_layer_fields(config) -> None:
    """Raises `ValueError` when `num_layers`, `min_layer`, `check_layers` or `decode_check_layers` of `config` (an
    `ExitClassifierConfig`) is out of range or malformed."""
    if config.num_layers is not None and (not _is_int(config.num_layers) or config.num_layers < 2):
        raise ValueError(f"num_layers must be an int >= 2 or None; got {config.num_layers!r}.")
    top = None if config.num_layers is None else config.num_layers - 1
    allowed = f"[1, {top}]" if top is not None else "[1, num_layers - 1]"
    if not _is_int(config.min_layer) or config.min_layer < 1 or (top is not None and config.min_layer > top):
        raise ValueError(f"min_layer={config.min_layer!r} is out of range; expected an int in {allowed}.")
    for name in ("check_layers", "decode_check_layers"):
        value = getattr(config, name)
        if value is None:
            continue
        layers = list(value)  # `()` is valid: never check, never exit (see calibrate and schedule)
        bad = [k for k in layers if not _is_int(k) or k < 1 or (top is not None and k > top)]
        if bad or layers != sorted(set(layers)):
            raise ValueError(
                f"{name}={layers!r} must be a sorted list of unique ints in {allowed}"
                + (f"; offending value(s): {bad}." if bad else ".")
            )


def check_config_types(data: dict, source: str) -> None:
    """Raises `ValueError` naming `source` and the field when a known config field has the wrong JSON type."""
    for name, (types, expected) in _CONFIG_TYPES.items():
        if name not in data:
            continue
        value = data[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ValueError(f"{source}: {name} must be {expected}; got {value!r:.80}.")
    fingerprint = data.get("lm_head_fingerprint")
    problem = None if fingerprint is None else fingerprint_problem(fingerprint)
    if problem is not None:
        raise ValueError(f"{source}: lm_head_fingerprint{'' if problem[0] == '[' else ' '}{problem}.")


# ---------------------------------------------------------------------- fitted estimator state
def _array(est, attr: str, prefix: str, shape=None, kind: str = "fiu", dtype=None, optional: bool = False):
    """`est.attr`, checked: a numeric ndarray of `shape` (None entries: any), `dtype` or dtype kind, finite."""
    value = getattr(est, attr, None)
    field = prefix + attr
    if value is None:
        if optional:
            return None
        raise InvalidField(f"{field} is missing")
    if not isinstance(value, np.ndarray) or value.dtype.kind not in kind:
        raise InvalidField(f"{field} must be a numeric array; got {type(value).__name__} {getattr(value, 'dtype', '')}")
    if dtype is not None and value.dtype != dtype:
        raise InvalidField(f"{field} has dtype {value.dtype}; expected {np.dtype(dtype)}")
    if shape is not None and (value.ndim != len(shape) or any(
        want is not None and got != want for got, want in zip(value.shape, shape, strict=True)
    )):
        want = "(" + ", ".join("n" if w is None else str(w) for w in shape) + ("," if len(shape) == 1 else "") + ")"
        raise InvalidField(f"{field} has shape {value.shape}; expected {want}")
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        raise InvalidField(f"{field} holds non-finite values")
    return value


def _n_features(est, prefix: str) -> int:
    n = getattr(est, "n_features_in_", None)
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise InvalidField(f"{prefix}n_features_in_={n!r} must be an int >= 1")
    return int(n)


def _check_linear(est, prefix: str, n: int) -> None:
    coef = _array(est, "coef_", prefix, shape=(1, n), kind="f")
    intercept = _array(est, "intercept_", prefix, shape=(1,), kind="f")
    _array(est, "classes_", prefix, shape=(2,))
    if type(est).__name__ != "GapThresholdRule":
        return
    # The rule reads its column and threshold, the device path its `coef_` and `intercept_`: they must agree.
    index = est.feature_index
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < n:
        raise InvalidField(f"{prefix}params.feature_index={index!r} must be an int in [0, {n - 1}] for {n} features")
    _check_classes(est, prefix)
    one_hot = np.zeros((1, n))
    one_hot[0, index] = 1.0
    if not np.array_equal(coef, one_hot) or float(intercept[0]) != -float(est.threshold):
        raise InvalidField(f"{prefix}coef_ / intercept_ must be the one-hot column {index} and -threshold "
                           f"({-float(est.threshold)!r}); got {coef.tolist()} / {intercept.tolist()}")


def _check_classes(est, prefix: str) -> None:
    classes = _array(est, "classes_", prefix, shape=(2,), kind="iu")
    if classes.tolist() != [0, 1]:
        raise InvalidField(f"{prefix}classes_={classes.tolist()} must be [0, 1]")


def _check_always(est, prefix: str, n: int) -> None:
    _check_classes(est, prefix)  # `coef_` and `intercept_` are derived from `n_features_in_`: nothing stored


def _check_scaler(est, prefix: str, n: int) -> None:
    for attr in ("mean_", "var_", "scale_"):
        value = _array(est, attr, prefix, shape=(n,), kind="f", optional=not (attr == "mean_" and est.with_mean
                                                                              or attr == "scale_" and est.with_std))
        if attr == "scale_" and value is not None and not (value > 0).all():
            raise InvalidField(f"{prefix}scale_ must be > 0")
        if attr == "var_" and value is not None and not (value >= 0).all():
            raise InvalidField(f"{prefix}var_ must be >= 0")
    seen = getattr(est, "n_samples_seen_", None)  # an int, or a float on newer scikit-learn
    if isinstance(seen, np.ndarray):
        _array(est, "n_samples_seen_", prefix, shape=(n,), kind="iu")
    elif not _is_number(seen) or not math.isfinite(seen) or seen < 1:
        raise InvalidField(f"{prefix}n_samples_seen_={seen!r} must be a number >= 1")


def _check_svc(est, prefix: str, n: int) -> None:
    if getattr(est, "kernel", None) == "precomputed":
        raise InvalidField(f"{prefix}params.kernel='precomputed' cannot score feature rows")
    if getattr(est, "_sparse", False) is not False:
        raise InvalidField(f"{prefix}_sparse={est._sparse!r}; the encoding holds dense support vectors only")
    # libsvm reads these through typed buffers and trusts their sizes: each must agree with the others.
    vectors = _array(est, "support_vectors_", prefix, shape=(None, n), dtype=np.float64)
    n_sv = vectors.shape[0]
    shape_fit = getattr(est, "shape_fit_", None)
    if (not isinstance(shape_fit, tuple) or len(shape_fit) != 2 or not all(_is_int(d) for d in shape_fit)
            or shape_fit[1] != n or not 1 <= n_sv <= shape_fit[0]):
        raise InvalidField(f"{prefix}shape_fit_={shape_fit!r} must be (n_samples, {n}) with n_samples >= the {n_sv} "
                           "support vectors")
    support = _array(est, "support_", prefix, shape=(n_sv,), dtype=np.int32)
    if n_sv and not (0 <= int(support.min()) and int(support.max()) < shape_fit[0]):
        raise InvalidField(f"{prefix}support_ holds indices outside [0, {shape_fit[0] - 1}] (shape_fit_[0] = "
                           f"{shape_fit[0]} training rows): min {int(support.min())}, max {int(support.max())}")
    counts = _array(est, "_n_support", prefix, shape=(2,), dtype=np.int32)
    if (counts < 0).any() or int(counts.sum()) != n_sv:
        raise InvalidField(f"{prefix}_n_support={counts.tolist()} must be >= 0 and sum to the {n_sv} support vectors")
    # libsvm scores with the private copies, the device path (`policy.scoring`) with the public ones: for two
    # classes scikit-learn stores the public ones negated.
    for public, private, shape in (("dual_coef_", "_dual_coef_", (1, n_sv)), ("intercept_", "_intercept_", (1,))):
        pair = [_array(est, attr, prefix, shape=shape, dtype=np.float64) for attr in (public, private)]
        if not np.array_equal(pair[0], -pair[1]):
            raise InvalidField(f"{prefix}{public} must be -{private} (a binary SVC stores both)")
    probability = getattr(est, "_effective_probability", False)
    if not isinstance(probability, bool):
        raise InvalidField(f"{prefix}_effective_probability={probability!r} must be a bool")
    for attr in ("_probA", "_probB"):
        value = _array(est, attr, prefix, shape=(None,), dtype=np.float64)
        if value.shape[0] not in (0, 1) or (probability and value.shape[0] != 1):
            raise InvalidField(f"{prefix}{attr} has shape {value.shape}; expected (0,) or (1,)"
                               + (", (1,) with probability estimates" if probability else ""))
    _array(est, "classes_", prefix, shape=(2,))
    weights = _array(est, "class_weight_", prefix, shape=(2,), dtype=np.float64)
    if not (weights >= 0).all():
        raise InvalidField(f"{prefix}class_weight_={weights.tolist()} must be >= 0")
    for attr in ("_num_iter", "n_iter_"):
        iterations = _array(est, attr, prefix, shape=(1,), kind="iu", optional=attr == "n_iter_")
        if iterations is not None and int(iterations[0]) < 0:
            raise InvalidField(f"{prefix}{attr}={iterations.tolist()} must be >= 0")
    status = getattr(est, "fit_status_", None)
    if not _is_int(status) or status != 0:
        raise InvalidField(f"{prefix}fit_status_={status!r} must be 0 (a completed fit)")
    gamma = getattr(est, "_gamma", None)
    if not _is_number(gamma) or not math.isfinite(gamma) or gamma <= 0:
        raise InvalidField(f"{prefix}_gamma={gamma!r} must be a finite number > 0")


_CHECKS = {
    "LinearSVC": _check_linear,
    "LogisticRegression": _check_linear,
    "SGDClassifier": _check_linear,
    "GapThresholdRule": _check_linear,
    "AlwaysExit": _check_always,
    "StandardScaler": _check_scaler,
    "SVC": _check_svc,
}


def check_fitted_state(name: str, est, prefix: str = "") -> int:
    """Checks one rebuilt estimator of class `name` (a `_safe_registry` key); returns its `n_features_in_`.

    Its constructor parameters go through scikit-learn's own constraints (a `C` that is a dict, a `kernel` that is
    not one of the kernels), then each fitted array and scalar is checked against the others.

    Raises:
        `InvalidField`: naming the field (with `prefix`, e.g. `steps.0.mean_`) and what was expected.
    """
    try:
        validate_estimator_params(est)
    except (TypeError, ValueError) as err:  # scikit-learn's InvalidParameterError is both
        raise InvalidField(f"{prefix}params: {err}") from None
    n = _n_features(est, prefix)
    _CHECKS[name](est, prefix, n)
    return n


def probe_rows(n_features: int, n_rows: int = 64) -> np.ndarray:
    """The fixed rows every probe of an estimator uses (standard normal, seed 0, float64 `[n_rows, n_features]`):
    checking a rebuilt or rewritten estimator against the original, and [`check_probe`]."""
    return np.random.default_rng(0).normal(size=(n_rows, n_features))


def check_probe(est, n_features: int, n_rows: int = 4) -> None:
    """Calls `est`'s `decision_function` and `predict` once on [`probe_rows`] of width `n_features`: an estimator
    that cannot score such rows (an inconsistent rebuilt state, or one that reads more columns than it is given)
    fails here, naming it and the width, instead of at the first forward.

    Raises:
        `InvalidField`: naming the estimator, the method, the feature count and the error.
    """
    X = probe_rows(n_features, n_rows)
    for method in ("decision_function", "predict"):
        if not hasattr(est, method):
            continue
        try:
            out = np.asarray(getattr(est, method)(X))
        except Exception as err:  # whatever numpy / scikit-learn / the estimator raise
            raise InvalidField(
                f"{type(est).__name__}.{method} fails on rows of {n_features} feature(s) "
                f"({type(err).__name__}: {err})"
            ) from err
        if out.shape != (n_rows,):
            raise InvalidField(f"{type(est).__name__}.{method} returns shape {out.shape} for {n_rows} rows of "
                               f"{n_features} feature(s); expected ({n_rows},)")
