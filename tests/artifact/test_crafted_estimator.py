"""Crafted estimator files fail when they are loaded, naming the file and the field: each case takes a saved
classifier, edits its safetensors encoding and reseals the manifest (a crafted file need not be a damaged one)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from artifact_files import X, Y, reseal
from sklearn.linear_model import LogisticRegression
from sklearn.svm import SVC

from adainfer_hf import AlwaysExit, ExitClassifier, GapThresholdRule
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




# ---------------------------------------------------------------------- every field, not only the shapes
def _param(name, value):
    def edit(tensors, spec):
        spec["params"][name] = value
    return edit


def _step(i, edit):
    """`edit` applied to the spec of the pipeline's step `i`."""
    def step_edit(tensors, spec):
        edit(tensors, spec["steps"][i][1])
    return step_edit


def _logistic():
    return LogisticRegression().fit(X, Y)


def _svc():
    return SVC().fit(X, Y)


def _first(value):
    """Replace the first entry of an index array (same dtype)."""
    return lambda v: np.concatenate([np.array([value], dtype=v.dtype), v[1:]])


CRAFTED.update({
    # Unknown content is refused, not ignored.
    "extra-tensor-__class__": (_logistic, _set("__class__", np.zeros(1)),
                               r"unknown tensor\(s\) \['__class__'\]: no field of the estimator reads them"),
    "always-exit-coef_": (lambda: AlwaysExit().fit(X), _set("coef_", np.ones((1, 2))),
                          r"unknown tensor\(s\) \['coef_'\]"),  # its margin is derived, never stored
    "unknown-parameter": (lambda: GapThresholdRule().fit(X), _param("kernel", "rbf"),
                          r"params holds unknown parameter\(s\) \['kernel'\]"),
    "unknown-scalar": (_logistic, _scalar("n_iter_", 3), r"scalars holds unknown scalar\(s\) \['n_iter_'\]"),
    "unknown-spec-key": (_logistic, lambda t, s: s.update(code="x"), r"estimator holds unknown key\(s\) \['code'\]"),
    "none-names-no-array": (_logistic, lambda t, s: s.update(none=["__class__"]),
                            r"none=\['__class__'\] must list fitted arrays of LogisticRegression"),
    "missing-array": (_logistic, lambda t, s: t.pop("coef_"), "coef_ is missing"),
    # Parameters pass scikit-learn's own constraints.
    "logistic-C-a-dict": (_logistic, _param("C", {"dict": [["C", 1.0]]}),
                          r"params: The 'C' parameter of LogisticRegression must be a float"),
    "svc-kernel-unknown": (_svc, _param("kernel", "evil"), r"params: The 'kernel' parameter of SVC must be"),
    # Index fields are range-checked against the sizes they index.
    "svc-support_-negative": (_svc, _svc_edit("support_", _first(-1_000_000)),
                              r"support_ holds indices outside \[0, 199\] \(shape_fit_\[0\] = 200 training rows\): "
                              r"min -1000000"),
    "svc-support_-past-the-end": (_svc, _svc_edit("support_", _first(200)),
                                  r"support_ holds indices outside \[0, 199\].*max 200"),
    "svc-shape_fit_-fewer-rows-than-vectors": (_svc, _scalar("shape_fit_", {"tuple": [3, 2]}),
                                               r"shape_fit_=\(3, 2\) must be \(n_samples, 2\) with n_samples >= the"),
    "gap-rule-classes": (lambda: GapThresholdRule().fit(X), _set("classes_", np.array([0, 2])),
                         r"classes_=\[0, 2\] must be \[0, 1\]"),
    # Fields that must agree with each other do.
    "gap-rule-coef-another-column": (lambda: GapThresholdRule().fit(X), _set("coef_", np.array([[0.0, 1.0]])),
                                     "coef_ / intercept_ must be the one-hot column 0 and -threshold"),
    "gap-rule-intercept-another-threshold": (lambda: GapThresholdRule().fit(X), _set("intercept_", np.array([0.5])),
                                             "coef_ / intercept_ must be the one-hot column 0 and -threshold"),
    "svc-dual_coef-not-negated": (_svc, _svc_edit("dual_coef_", lambda v: -v), "dual_coef_ must be -_dual_coef_"),
    "svc-intercept-not-negated": (_svc, _svc_edit("intercept_", lambda v: v + 1.0), "intercept_ must be -_intercept_"),
    "svc-fit_status_": (_svc, _scalar("fit_status_", 1), r"fit_status_=1 must be 0 \(a completed fit\)"),
    "svc-gamma-negative": (_svc, _scalar("_gamma", -1.0), r"_gamma=-1.0 must be a finite number > 0"),
    "svc-class_weight-negative": (_svc, _svc_edit("class_weight_", lambda v: -v), r"class_weight_=.* must be >= 0"),
    "scaler-scale_-zero": (_pipeline, _set("steps.0.scale_", np.zeros(2)), "steps.0.scale_ must be > 0"),
    "scaler-var_-negative": (_pipeline, _set("steps.0.var_", -np.ones(2)), "steps.0.var_ must be >= 0"),
    "scaler-n_samples_seen_-0": (_pipeline, _step(0, _scalar("n_samples_seen_", 0)),
                                 r"n_samples_seen_=0 must be a number >= 1"),
    "pipeline-duplicate-names": (_pipeline, lambda t, s: s["steps"][0].__setitem__(0, s["steps"][1][0]),
                                 "steps has duplicate names or names with '__'"),
    "unsupported-class": (_logistic, lambda t, s: s.update({"class": "Popen"}),
                          r"class: unsupported estimator class 'Popen'"),
})


@pytest.mark.parametrize("case", list(CRAFTED))
def test_an_inconsistent_estimator_encoding_fails_at_load_naming_the_file_and_field(tmp_path, case):
    fit, edit, message = CRAFTED[case]
    ExitClassifier(fit()).save_pretrained(tmp_path)
    _recraft(tmp_path, edit)
    with pytest.raises(ValueError, match=rf"{CLASSIFIER_SAFE_NAME}.*invalid estimator encoding: .*{message}"):
        ExitClassifier.from_pretrained(tmp_path)


def test_every_estimator_the_package_trains_loads_back_with_its_decisions(tmp_path):
    """The strict decoder accepts what the package writes: each estimator reloads and decides as the fitted one."""
    from sklearn.linear_model import SGDClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    fitted = [_logistic(), _svc(), _pipeline(), LinearSVC().fit(X, Y), SGDClassifier(random_state=0).fit(X, Y),
              GapThresholdRule(feature_index=1, threshold=0.3).fit(X), AlwaysExit().fit(X),
              make_pipeline(StandardScaler(), LogisticRegression()).fit(X, Y)]
    for i, estimator in enumerate(fitted):
        ExitClassifier(estimator).save_pretrained(tmp_path / str(i))
        assert (tmp_path / str(i) / CLASSIFIER_SAFE_NAME).is_file()
        loaded = ExitClassifier.from_pretrained(tmp_path / str(i)).estimator
        assert type(loaded) is type(estimator)
        for method in ("decision_function", "predict"):
            np.testing.assert_array_equal(getattr(loaded, method)(X), getattr(estimator, method)(X))


def test_a_header_or_metadata_key_the_decoder_does_not_read_is_refused(tmp_path):
    import safetensors.numpy
    from safetensors import safe_open

    ExitClassifier(_logistic()).save_pretrained(tmp_path)
    path = tmp_path / CLASSIFIER_SAFE_NAME
    with safe_open(path, framework="np") as f:
        metadata = f.metadata()
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    header = json.loads(metadata["adainfer_hf"])
    for crafted, message in (({**metadata, "code": "x"}, r"unknown metadata key\(s\) \['code'\]"),
                             ({"adainfer_hf": json.dumps({**header, "code": 1})},
                              r"the header holds unknown key\(s\) \['code'\]")):
        safetensors.numpy.save_file(tensors, path, metadata=crafted)
        reseal(tmp_path)
        with pytest.raises(ValueError, match=rf"{CLASSIFIER_SAFE_NAME}.*invalid estimator encoding: {message}"):
            ExitClassifier.from_pretrained(tmp_path)
