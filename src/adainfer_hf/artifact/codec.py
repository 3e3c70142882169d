"""The pickle-free estimator encoding: [`safe_encode`] / [`safe_load`] store the estimators this package produces
(linear models, `GapThresholdRule`, `AlwaysExit`, `SVC`, `StandardScaler` pipelines) as safetensors plus a JSON
header, rebuilding only an allow-list of classes.

Loading is strict: every tensor of the file and every key of the header must be one the class reads (an unknown
tensor such as `__class__`, an unknown parameter or scalar is refused), the parameters pass scikit-learn's own
constraints, and the fitted state is checked field by field (`artifact.validation`), naming the file and the field.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import numpy as np
import safetensors.numpy
from safetensors import safe_open
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC

from ..compat import SVC_FITTED_ARRAYS, SVC_FITTED_SCALARS
from ..estimators.rules import AlwaysExit, GapThresholdRule
from .constants import CLASSIFIER_SAFE_NAME
from .validation import InvalidField, check_fitted_state, check_probe, probe_rows

__all__ = ["SAFE_FORMAT", "qualified_name", "safe_encode", "safe_load"]

SAFE_FORMAT = "adainfer-sklearn-v1"  # name of the pickle-free estimator encoding
_METADATA_KEY = "adainfer_hf"  # the one metadata key of the file: the JSON header


def qualified_name(obj: Any) -> str:
    """`module.QualName` of `obj`'s class (the config's `estimator_class`, and messages)."""
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


# ---------------------------------------------------------------------- pickle-free encoding
class _NotEncodable(Exception):
    pass


def _safe_registry() -> dict:
    """Classes the safetensors encoding can rebuild, with the fitted state `predict`/`decision_function` read.

    Only these classes are ever instantiated from a safetensors file, and only these attributes are set: the
    file holds arrays and JSON scalars, never code or class paths.
    """
    linear = (("coef_", "intercept_", "classes_"), ("n_features_in_",))
    return {
        "LinearSVC": (LinearSVC, *linear),
        "LogisticRegression": (LogisticRegression, *linear),
        "SGDClassifier": (SGDClassifier, *linear),
        "GapThresholdRule": (GapThresholdRule, *linear),
        "AlwaysExit": (AlwaysExit, ("classes_",), ("n_features_in_",)),  # `coef_`, `intercept_` are derived
        "StandardScaler": (
            StandardScaler,
            ("mean_", "var_", "scale_"),
            ("n_features_in_", "n_samples_seen_"),
        ),
        "SVC": (SVC, SVC_FITTED_ARRAYS, SVC_FITTED_SCALARS),
    }


def _json_value(value):
    """A JSON-safe copy of a parameter or scalar attribute, or `_NotEncodable`."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {"tuple": [_json_value(v) for v in value]}
    if isinstance(value, dict) and all(isinstance(k, (int, str, np.integer)) for k in value):
        return {"dict": [[_json_value(k), _json_value(v)] for k, v in value.items()]}
    raise _NotEncodable(f"value {value!r} of type {type(value).__name__}")


def _from_json_value(value):
    if isinstance(value, dict) and set(value) == {"tuple"}:
        return tuple(_from_json_value(v) for v in value["tuple"])
    if isinstance(value, dict) and set(value) == {"dict"}:
        return {k: _from_json_value(v) for k, v in value["dict"]}
    return value


def _encode_into(est, prefix: str, tensors: dict) -> dict:
    if type(est) is Pipeline:
        steps = []
        for i, (name, step) in enumerate(est.steps):
            if i < len(est.steps) - 1 and type(step) is not StandardScaler:
                raise _NotEncodable(f"pipeline step {name!r} ({type(step).__name__})")
            steps.append([name, _encode_into(step, f"{prefix}steps.{i}.", tensors)])
        return {"class": "Pipeline", "steps": steps}
    name = type(est).__name__
    entry = _safe_registry().get(name)
    if entry is None or type(est) is not entry[0]:
        raise _NotEncodable(f"estimator class {qualified_name(est)}")
    cls, arrays, scalars = entry
    defaults = cls().get_params(deep=False)
    params = {}
    for key, value in est.get_params(deep=False).items():
        if key not in defaults or not _equal(value, defaults[key]):
            params[key] = _json_value(value)
    spec = {"class": name, "params": params, "none": [], "scalars": {}}
    for attr in arrays:
        value = getattr(est, attr)
        if value is None:
            spec["none"].append(attr)
        elif isinstance(value, np.ndarray) and value.dtype != object:
            tensors[prefix + attr] = np.ascontiguousarray(value)
        else:
            raise _NotEncodable(f"{name}.{attr} of type {type(value).__name__}")
    # (a scalar some scikit-learn releases do not have, e.g. SVC's `_effective_probability` before 1.5, is left out)
    spec["scalars"] = {attr: _json_value(getattr(est, attr)) for attr in scalars if hasattr(est, attr)}
    return spec


def _keys(value, allowed: set, field: str, what: str = "key") -> None:
    """Refuses a header object that is not a dict, or that holds a key the decoder does not read."""
    if not isinstance(value, dict):
        raise InvalidField(f"{field} must be an object; got {type(value).__name__}")
    unknown = sorted(set(value) - allowed, key=str)
    if unknown:
        raise InvalidField(f"{field} holds unknown {what}(s) {unknown}; expected some of {sorted(allowed)}")


def _decode_from(spec, prefix: str, tensors: dict, used: set):
    """The estimator `spec` describes; every tensor it reads is added to `used`."""
    where = f"{prefix}estimator" if not prefix else prefix.rstrip(".")
    if isinstance(spec, dict) and spec.get("class") == "Pipeline":
        _keys(spec, {"class", "steps"}, where)
        raw = spec.get("steps")
        if not isinstance(raw, list) or not raw or not all(
                isinstance(s, list) and len(s) == 2 and isinstance(s[0], str) for s in raw):
            raise InvalidField(f"{prefix}steps must be a non-empty list of [name, estimator] pairs")
        names = [name for name, _ in raw]
        if len(set(names)) != len(names) or any("__" in name for name in names):
            raise InvalidField(f"{prefix}steps has duplicate names or names with '__': {names}")
        steps = [(name, _decode_from(s, f"{prefix}steps.{i}.", tensors, used)) for i, (name, s) in enumerate(raw)]
        if any(type(step) is not StandardScaler for _, step in steps[:-1]):
            raise InvalidField(f"{prefix}steps: only StandardScaler steps may come before the classifier")
        widths = [int(step.n_features_in_) for _, step in steps]  # each checked when it was decoded
        if len(set(widths)) > 1:  # a StandardScaler keeps the width, so every step reads the same columns
            raise InvalidField(f"{prefix}steps: n_features_in_ differ between steps ({widths})")
        return Pipeline(steps)
    _keys(spec, {"class", "params", "none", "scalars"}, where)
    entry = _safe_registry().get(spec.get("class"))
    if entry is None:
        raise InvalidField(f"{prefix}class: unsupported estimator class {spec.get('class')!r}; this encoding "
                           f"rebuilds only {sorted([*_safe_registry(), 'Pipeline'])}")
    cls, arrays, scalars = entry
    params, none, values = spec.get("params", {}), spec.get("none", []), spec.get("scalars", {})
    _keys(params, set(cls().get_params(deep=False)), f"{prefix}params", "parameter")
    _keys(values, set(scalars), f"{prefix}scalars", "scalar")
    if not isinstance(none, list) or not set(none) <= set(arrays):
        raise InvalidField(f"{prefix}none={none!r} must list fitted arrays of {spec['class']} ({list(arrays)})")
    est = cls(**{k: _from_json_value(v) for k, v in params.items()})
    for attr in arrays:
        if attr in none:
            setattr(est, attr, None)
        elif prefix + attr in tensors:
            setattr(est, attr, tensors[prefix + attr])
            used.add(prefix + attr)
        else:
            raise InvalidField(f"{prefix}{attr} is missing")
    for attr, value in values.items():
        setattr(est, attr, _from_json_value(value))
    check_fitted_state(spec["class"], est, prefix)
    return est


def _equal(a, b) -> bool:
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:
        return False


def _same_decisions(a, b) -> bool:
    X = probe_rows(int(a.n_features_in_))
    for method in ("decision_function", "predict", "predict_proba"):
        if hasattr(a, method) != hasattr(b, method):
            return False
        if hasattr(a, method) and not np.array_equal(getattr(a, method)(X), getattr(b, method)(X)):
            return False
    return True


def safe_encode(est) -> bytes | None:
    """The safetensors bytes of `est`, verified by rebuilding it; `None` (with a warning) when not encodable."""
    tensors: dict = {}
    try:
        spec = _encode_into(est, "", tensors)
        # One metadata key: safetensors orders several keys arbitrarily, and the file should be byte-stable.
        header = json.dumps({"format": SAFE_FORMAT, "estimator": spec}, sort_keys=True)
        blob = safetensors.numpy.save(tensors, metadata={_METADATA_KEY: header})
        if not _same_decisions(est, _decode(json.loads(header), safetensors.numpy.load(blob))):
            raise _NotEncodable("the rebuilt estimator does not reproduce the original's decisions")
    except Exception as err:  # any failure only costs the optional safe file; joblib is still written
        warnings.warn(
            f"No {CLASSIFIER_SAFE_NAME} for {type(est).__name__} ({err}); only the joblib pickle is saved, so "
            "loading it from the Hub will require trust_remote_classifier=True.",
            UserWarning,
            stacklevel=3,
        )
        return None
    return blob


def _decode(header: dict, tensors: dict):
    """The estimator of a file's header and tensors; a tensor no field reads is refused."""
    _keys(header, {"format", "estimator"}, "the header")
    used: set = set()
    est = _decode_from(header.get("estimator"), "", tensors, used)
    unknown = sorted(set(tensors) - used)
    if unknown:
        raise InvalidField(f"unknown tensor(s) {unknown}: no field of the estimator reads them")
    return est


def safe_load(path: str):
    """The estimator stored in the safetensors file at `path` by [`safe_encode`], validated field by field.

    Raises:
        `ValueError`: naming `path` and the field (an unknown tensor, header key or parameter, a parameter of the
            wrong type, an array of the wrong shape or dtype, an index out of range), or what could not be read.
    """
    try:
        with safe_open(path, framework="np") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        header = json.loads(metadata.get(_METADATA_KEY, "{}"))
    except Exception as err:
        raise ValueError(f"Could not read the safetensors file {path!r}: {err}") from err
    if not isinstance(header, dict) or header.get("format") != SAFE_FORMAT:
        found = header.get("format") if isinstance(header, dict) else header
        raise ValueError(f"{path!r} has encoding {found!r}; this adainfer-hf reads {SAFE_FORMAT!r}.")
    try:
        if set(metadata) != {_METADATA_KEY}:
            raise InvalidField(f"unknown metadata key(s) {sorted(set(metadata) - {_METADATA_KEY})}")
        est = _decode(header, tensors)
        check_probe(est, int(est.n_features_in_))
    except InvalidField as err:
        raise ValueError(f"{path!r} holds an invalid estimator encoding: {err}.") from err
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(
            f"{path!r} holds an invalid estimator encoding ({type(err).__name__}: {err})."
        ) from err
    return est
