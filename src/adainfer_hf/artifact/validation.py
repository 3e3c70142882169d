"""Load-time checks of an artifact's contents, so that a crafted or damaged file fails when it is loaded, with a
`ValueError` naming the field, instead of later inside numpy, scikit-learn or libsvm.

- `check_config_types`: the JSON types of `exit_classifier_config.json`'s fields, and the LM-head fingerprint;
- `check_layer_fields`, `check_fingerprint`: the values of a config's layer fields and fingerprint (run by
  `ExitClassifier` on every config it holds, loaded or not);
- `check_fitted_state`: the fitted arrays of an estimator rebuilt from the safetensors encoding, against each other
  and `n_features_in_` (shapes, dtypes libsvm needs, finiteness), then one call on probe rows.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "InvalidField",
    "check_config_types",
    "check_fingerprint",
    "check_fitted_state",
    "check_layer_fields",
    "check_probe",
    "fingerprint_problem",
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
    _array(est, "coef_", prefix, shape=(1, n), kind="f")
    _array(est, "intercept_", prefix, shape=(1,), kind="f")
    _array(est, "classes_", prefix, shape=(2,))
    index = getattr(est, "feature_index", 0)  # GapThresholdRule reads a column by index
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < n:
        raise InvalidField(f"{prefix}params.feature_index={index!r} must be an int in [0, {n - 1}] for {n} features")


def _check_scaler(est, prefix: str, n: int) -> None:
    for attr in ("mean_", "var_", "scale_"):
        value = _array(est, attr, prefix, shape=(n,), kind="f", optional=True)
        if attr == "scale_" and value is not None and not (value != 0).all():
            raise InvalidField(f"{prefix}scale_ holds zeros")


def _check_svc(est, prefix: str, n: int) -> None:
    if getattr(est, "kernel", None) == "precomputed":
        raise InvalidField(f"{prefix}params.kernel='precomputed' cannot score feature rows")
    if getattr(est, "_sparse", False) is not False:
        raise InvalidField(f"{prefix}_sparse={est._sparse!r}; the encoding holds dense support vectors only")
    # libsvm reads these through typed buffers and trusts their sizes: each must agree with the others.
    vectors = _array(est, "support_vectors_", prefix, shape=(None, n), dtype=np.float64)
    n_sv = vectors.shape[0]
    _array(est, "support_", prefix, shape=(n_sv,), dtype=np.int32)
    counts = _array(est, "_n_support", prefix, shape=(2,), dtype=np.int32)
    if (counts < 0).any() or int(counts.sum()) != n_sv:
        raise InvalidField(f"{prefix}_n_support={counts.tolist()} must be >= 0 and sum to the {n_sv} support vectors")
    for attr in ("dual_coef_", "_dual_coef_"):
        _array(est, attr, prefix, shape=(1, n_sv), dtype=np.float64)
    for attr in ("intercept_", "_intercept_"):
        _array(est, attr, prefix, shape=(1,), dtype=np.float64)
    for attr in ("_probA", "_probB"):
        value = _array(est, attr, prefix, shape=(None,), dtype=np.float64)
        if value.shape[0] not in (0, 1):
            raise InvalidField(f"{prefix}{attr} has shape {value.shape}; expected (0,) or (1,)")
    _array(est, "classes_", prefix, shape=(2,))
    _array(est, "class_weight_", prefix, shape=(2,), dtype=np.float64)
    shape_fit = getattr(est, "shape_fit_", None)
    if not isinstance(shape_fit, tuple) or len(shape_fit) != 2 or shape_fit[1] != n:
        raise InvalidField(f"{prefix}shape_fit_={shape_fit!r} must be (n_samples, {n})")
    gamma = getattr(est, "_gamma", None)
    if not _is_number(gamma) or not math.isfinite(gamma):
        raise InvalidField(f"{prefix}_gamma={gamma!r} must be a finite number")


_CHECKS = {
    "LinearSVC": _check_linear,
    "LogisticRegression": _check_linear,
    "SGDClassifier": _check_linear,
    "GapThresholdRule": _check_linear,
    "StandardScaler": _check_scaler,
    "SVC": _check_svc,
}


def check_fitted_state(name: str, est, prefix: str = "") -> int:
    """Checks one rebuilt estimator of class `name` (a `_safe_registry` key); returns its `n_features_in_`.

    Raises:
        `InvalidField`: naming the field (with `prefix`, e.g. `steps.0.mean_`) and what was expected.
    """
    n = _n_features(est, prefix)
    _CHECKS[name](est, prefix, n)
    return n


def check_probe(est, n_features: int, n_rows: int = 4) -> None:
    """Calls the rebuilt estimator once on fixed rows: anything its fitted state still breaks fails here."""
    X = np.random.default_rng(0).normal(size=(n_rows, n_features))
    for method in ("decision_function", "predict"):
        if not hasattr(est, method):
            continue
        try:
            out = np.asarray(getattr(est, method)(X))
        except Exception as err:  # whatever numpy / scikit-learn raise on an inconsistent state
            raise InvalidField(
                f"the rebuilt {type(est).__name__} fails in {method} ({type(err).__name__}: {err})"
            ) from err
        if out.shape != (n_rows,):
            raise InvalidField(f"{type(est).__name__}.{method} returns shape {out.shape}; expected ({n_rows},)")
