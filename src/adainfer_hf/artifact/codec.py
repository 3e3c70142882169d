"""How exit estimators are scored fast and stored without pickle.

- The linear fast path: `_linear_form` rewrites linear estimators (and `StandardScaler` pipelines of them) as one
  weight vector and bias, verified numerically, so `ExitClassifier.decide` runs on the device with no sklearn call.
- The pickle-free encoding: `_safe_encode` / `_safe_load` store the estimators this package produces (linear
  models, `GapThresholdRule`, `SVC`, `StandardScaler` pipelines) as safetensors plus a JSON header, rebuilding only
  an allow-list of classes.
"""

from __future__ import annotations

import json
import math
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
from ..estimators.linear import fold_standard_scalers
from ..estimators.rules import GapThresholdRule
from .constants import CLASSIFIER_SAFE_NAME
from .validation import InvalidField, check_fitted_state, check_probe

SAFE_FORMAT = "adainfer-sklearn-v1"  # name of the pickle-free estimator encoding


def _qualified_name(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _logit(p: float) -> float:
    """`log(p / (1 - p))`; `p = 1` maps to the margin where float64 `expit` (scikit-learn's) first rounds to 1."""
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.nextafter(53 * math.log(2.0), math.inf)
    return math.log(p) - math.log1p(-p)


def _score_kind(est) -> str:
    final = est.steps[-1][1] if hasattr(est, "steps") else est
    # Logistic regression is trained to be calibrated, so its threshold is a probability; other margins are not.
    if isinstance(final, LogisticRegression) and hasattr(est, "predict_proba"):
        return "probability"
    if hasattr(est, "decision_function"):
        return "decision"
    if hasattr(est, "predict_proba"):
        return "probability"
    return "label"


def _probe(est, n_rows: int = 64) -> np.ndarray:
    """Fixed random inputs used to check that a rewritten estimator computes exactly what the original does."""
    return np.random.default_rng(0).normal(size=(n_rows, int(est.n_features_in_)))


# ---------------------------------------------------------------------- linear fast path
def _linear_form(est) -> tuple[np.ndarray, float] | None:
    """`(w, b)` with `decision_function(X) == X @ w + b`, folding `StandardScaler` steps of a pipeline into `w`
    and `b`; `None` when the estimator is not of that form (checked numerically, not trusted from `coef_`)."""
    steps = [step for _, step in est.steps] if type(est) is Pipeline else [est]
    *pre, final = steps
    try:
        coef = np.asarray(final.coef_, dtype=np.float64)
        intercept = np.asarray(final.intercept_, dtype=np.float64).reshape(-1)
    except (AttributeError, TypeError, ValueError):  # e.g. SVC(kernel="rbf").coef_ raises AttributeError
        return None
    if coef.ndim == 2 and coef.shape[0] == 1:
        coef = coef[0]
    if coef.ndim != 1 or intercept.shape != (1,) or not hasattr(est, "decision_function"):
        return None
    folded = fold_standard_scalers(pre, coef, intercept)
    if folded is None:
        return None
    coef, bias = folded[0], float(folded[1][0])
    try:
        X = _probe(est)
        reference = np.asarray(est.decision_function(X), dtype=np.float64).reshape(-1)
        fires = np.asarray(est.predict(X)).reshape(-1) == 1
    except Exception:  # an estimator we cannot probe simply takes the scikit-learn path
        return None
    ours = X @ coef + bias
    if not np.allclose(ours, reference, rtol=1e-9, atol=1e-9) or not np.array_equal(ours > 0, fires):
        return None
    return coef, bias


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
        raise _NotEncodable(f"estimator class {_qualified_name(est)}")
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


def _decode_from(spec: dict, prefix: str, tensors: dict):
    if spec["class"] == "Pipeline":
        steps = [
            (name, _decode_from(s, f"{prefix}steps.{i}.", tensors))
            for i, (name, s) in enumerate(spec["steps"])
        ]
        widths = [int(step.n_features_in_) for _, step in steps]  # each checked when it was decoded
        if len(set(widths)) > 1:  # a StandardScaler keeps the width, so every step reads the same columns
            raise InvalidField(f"{prefix}steps: n_features_in_ differ between steps ({widths})")
        return Pipeline(steps)
    entry = _safe_registry().get(spec["class"])
    if entry is None:
        raise ValueError(f"unsupported estimator class {spec['class']!r}")
    cls, arrays, scalars = entry
    est = cls(**{k: _from_json_value(v) for k, v in spec["params"].items()})
    for attr in arrays:
        setattr(est, attr, None if attr in spec["none"] else tensors[prefix + attr])
    for attr in scalars:
        if attr in spec["scalars"]:
            setattr(est, attr, _from_json_value(spec["scalars"][attr]))
    check_fitted_state(spec["class"], est, prefix)
    return est


def _equal(a, b) -> bool:
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:
        return False


def _same_decisions(a, b) -> bool:
    X = _probe(a)
    for method in ("decision_function", "predict", "predict_proba"):
        if hasattr(a, method) != hasattr(b, method):
            return False
        if hasattr(a, method) and not np.array_equal(getattr(a, method)(X), getattr(b, method)(X)):
            return False
    return True


def _safe_encode(est) -> bytes | None:
    """The safetensors bytes of `est`, verified by rebuilding it; `None` (with a warning) when not encodable."""
    tensors: dict = {}
    try:
        spec = _encode_into(est, "", tensors)
        # One metadata key: safetensors orders several keys arbitrarily, and the file should be byte-stable.
        header = json.dumps({"format": SAFE_FORMAT, "estimator": spec}, sort_keys=True)
        blob = safetensors.numpy.save(tensors, metadata={"adainfer_hf": header})
        if not _same_decisions(est, _decode_from(spec, "", safetensors.numpy.load(blob))):
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


def _safe_load(path: str):
    try:
        with safe_open(path, framework="np") as f:
            header = json.loads((f.metadata() or {}).get("adainfer_hf", "{}"))
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as err:
        raise ValueError(f"Could not read the safetensors file {path!r}: {err}") from err
    if header.get("format") != SAFE_FORMAT:
        raise ValueError(
            f"{path!r} has encoding {header.get('format')!r}; this adainfer-hf reads {SAFE_FORMAT!r}."
        )
    try:
        est = _decode_from(header["estimator"], "", tensors)
        check_probe(est, int(est.n_features_in_))
    except InvalidField as err:
        raise ValueError(f"{path!r} holds an invalid estimator encoding: {err}.") from err
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(
            f"{path!r} holds an invalid estimator encoding ({type(err).__name__}: {err})."
        ) from err
    return est
