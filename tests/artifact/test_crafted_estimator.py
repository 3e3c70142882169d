"""Crafted estimator files fail when they are loaded, naming the file and the field: each case takes a saved
classifier, edits its safetensors encoding and reseals the manifest (a crafted file need not be a damaged one)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from artifact_files import X, Y
from sklearn.linear_model import LogisticRegression
from sklearn.svm import SVC

from adainfer_hf import ExitClassifier, GapThresholdRule
from adainfer_hf.artifact.constants import (
    ARTIFACT_DATA_NAMES,
    CLASSIFIER_MANIFEST_NAME,
    CLASSIFIER_SAFE_NAME,
)


# ---------------------------------------------------------------------- item 11: crafted files fail at load time
def _recraft(directory: Path, edit) -> None:
    """Rewrite the safetensors encoding with `edit(tensors, estimator_spec)` and a manifest that matches (a crafted
    file need not be a damaged one: it can come with its own manifest)."""
    import safetensors.numpy
    from safetensors import safe_open

    from adainfer_hf.artifact.manifest import manifest_text

    path = directory / CLASSIFIER_SAFE_NAME
    with safe_open(path, framework="np") as f:
        header = json.loads(f.metadata()["adainfer_hf"])
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    edit(tensors, header["estimator"])
    safetensors.numpy.save_file(tensors, path, metadata={"adainfer_hf": json.dumps(header)})
    files = {n: (directory / n).read_bytes() for n in ARTIFACT_DATA_NAMES if (directory / n).is_file()}
    (directory / CLASSIFIER_MANIFEST_NAME).write_text(manifest_text(files))


def _set(key, value):
    def edit(tensors, spec):
        tensors[key] = value
    return edit


def _svc_edit(key, fn):
    def edit(tensors, spec):
        tensors[key] = fn(tensors[key])
    return edit


def _scalar(name, value):
    def edit(tensors, spec):
        spec["scalars"][name] = value
    return edit


def _pipeline():
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), SVC()).fit(X, Y)


CRAFTED = {
    "coef_-3-columns": (lambda: LogisticRegression().fit(X, Y), _set("coef_", np.ones((1, 3))),
                        r"coef_ has shape \(1, 3\); expected \(1, 2\)"),
    "intercept_-2": (lambda: LogisticRegression().fit(X, Y), _set("intercept_", np.zeros(2)),
                     r"intercept_ has shape \(2,\); expected \(1,\)"),
    "coef_-nan": (lambda: LogisticRegression().fit(X, Y), _set("coef_", np.array([[np.nan, 1.0]])),
                  "coef_ holds non-finite values"),
    "n_features_in_-3": (lambda: LogisticRegression().fit(X, Y), _scalar("n_features_in_", 3),
                         r"coef_ has shape \(1, 2\); expected \(1, 3\)"),
    "gap-rule-feature_index": (lambda: GapThresholdRule().fit(X), lambda t, s: s["params"].update(feature_index=4),
                               r"params.feature_index=4 must be an int in \[0, 1\]"),
    "svc-support-vectors-3-columns": (lambda: SVC().fit(X, Y),
                                      _svc_edit("support_vectors_", lambda v: np.hstack([v, v[:, :1]])),
                                      r"support_vectors_ has shape \(\d+, 3\); expected \(n, 2\)"),
    "svc-n_support-sum": (lambda: SVC().fit(X, Y), _svc_edit("_n_support", lambda v: v + np.int32(5)),
                          r"_n_support=\[\d+, \d+\] must be >= 0 and sum to the \d+ support vectors"),
    "svc-dual_coef-short": (lambda: SVC().fit(X, Y), _svc_edit("_dual_coef_", lambda v: v[:, 1:]),
                            r"_dual_coef_ has shape \(1, \d+\); expected \(1, \d+\)"),
    "svc-float32-vectors": (lambda: SVC().fit(X, Y), _svc_edit("support_vectors_", lambda v: v.astype(np.float32)),
                            "support_vectors_ has dtype float32; expected float64"),
    "scaler-mean_-3": (_pipeline, _set("steps.0.mean_", np.zeros(3)),
                       r"steps.0.mean_ has shape \(3,\); expected \(2,\)"),
    "scaler-scale_-1": (_pipeline, _set("steps.0.scale_", np.ones(1)),
                        r"steps.0.scale_ has shape \(1,\); expected \(2,\)"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_an_inconsistent_estimator_encoding_fails_at_load_naming_the_file_and_field(tmp_path, case):
    fit, edit, message = CRAFTED[case]
    ExitClassifier(fit()).save_pretrained(tmp_path)
    _recraft(tmp_path, edit)
    with pytest.raises(ValueError, match=rf"{CLASSIFIER_SAFE_NAME}.*invalid estimator encoding: .*{message}"):
        ExitClassifier.from_pretrained(tmp_path)
