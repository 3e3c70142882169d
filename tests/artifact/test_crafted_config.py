"""Crafted config files fail when they are loaded, naming the file and the field: a malformed LM-head
fingerprint, a field of the wrong JSON type, a config that contradicts its estimator (each resealed)."""

from __future__ import annotations

import os
import re

import pytest
from artifact_files import X, edit_config, stock_dir

from adainfer_hf import AdaInferLlamaForCausalLM, ExitClassifier, GapThresholdRule
from adainfer_hf.artifact.constants import CLASSIFIER_CONFIG_NAME, CLASSIFIER_SAFE_NAME

FP = r"lm_head_fingerprint"
FINGERPRINTS = {
    "not-an-object": ("abc", rf"{FP} must be an object with 'shape' and 'sample'; got str 'abc'"),
    "no-shape": ({"sample": [0.1]}, rf"{FP}\['shape'\] must be a non-empty list of positive ints; got None"),
    "shape-a-string": ({"shape": "99x32", "sample": [0.1]}, rf"{FP}\['shape'\] must be .*; got '99x32'"),
    "sample-a-string": ({"shape": [99, 32], "sample": "x"}, rf"{FP}\['sample'\] must be a list of numbers; got str"),
    "sample-with-text": ({"shape": [99, 32], "sample": [0.1, "a"]}, rf"{FP}\['sample'\]\[1\] must be a finite number"),
    "sha256-a-number": ({"shape": [99, 32], "sample": [0.1], "sha256": 5}, rf"{FP}\['sha256'\] must be a string"),
}


@pytest.mark.parametrize("case", list(FINGERPRINTS))
def test_a_malformed_fingerprint_fails_at_load_naming_the_file_and_field(tmp_path, case):
    value, message = FINGERPRINTS[case]
    ExitClassifier(GapThresholdRule().fit(X)).save_pretrained(tmp_path / "clf")
    edit_config(tmp_path / "clf", lm_head_fingerprint=value)
    with pytest.raises(ValueError, match=rf"{CLASSIFIER_CONFIG_NAME}: {message}"):
        ExitClassifier.from_pretrained(tmp_path / "clf")
    with pytest.raises(ValueError, match=rf"{CLASSIFIER_CONFIG_NAME}: {message}"):
        AdaInferLlamaForCausalLM.from_pretrained(stock_dir(tmp_path), exit_classifier=tmp_path / "clf")
    with pytest.raises(ValueError, match=rf"^{message}"):  # built directly: no file to name
        ExitClassifier(GapThresholdRule().fit(X), lm_head_fingerprint=value)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("features", 5, "features must be a list of feature names; got 5"),
    ("check_layers", 3, "check_layers must be a list of ints or null; got 3"),
    ("min_layer", "2", "min_layer must be an int; got '2'"),
    ("threshold", True, "threshold must be a number or null; got True"),
])
def test_a_config_field_of_the_wrong_type_fails_naming_the_file_and_field(tmp_path, field, value, message):
    ExitClassifier(GapThresholdRule().fit(X)).save_pretrained(tmp_path)
    edit_config(tmp_path, **{field: value})
    with pytest.raises(ValueError, match=rf"{CLASSIFIER_CONFIG_NAME}: {message}"):
        ExitClassifier.from_pretrained(tmp_path)


def test_a_config_that_contradicts_its_estimator_names_the_file(tmp_path):
    ExitClassifier(GapThresholdRule().fit(X)).save_pretrained(tmp_path)
    edit_config(tmp_path, features=["gap", "top_prob", "kl_prev"])
    with pytest.raises(ValueError, match=rf"Invalid exit classifier in '.*{CLASSIFIER_CONFIG_NAME}': .*n_features_in_=2"):
        ExitClassifier.from_pretrained(tmp_path)


@pytest.mark.parametrize("source", ["safetensors", "joblib"])
def test_an_estimator_file_of_another_class_than_the_config_names_is_refused(tmp_path, source):
    ExitClassifier(GapThresholdRule().fit(X)).save_pretrained(tmp_path)
    if source == "joblib":
        (tmp_path / CLASSIFIER_SAFE_NAME).unlink()
    edit_config(tmp_path, estimator_class="sklearn.svm._classes.SVC")
    where = re.escape(repr(os.fspath(tmp_path / CLASSIFIER_CONFIG_NAME)))
    with pytest.raises(ValueError, match=rf"files and config disagree: {where} names "
                                         r"estimator_class='sklearn.svm._classes.SVC', but the estimator file holds a "
                                         r"adainfer_hf.estimators.rules.GapThresholdRule"):
        ExitClassifier.from_pretrained(tmp_path)
    edit_config(tmp_path, estimator_class="an.old.module.path.GapThresholdRule")  # only the class name must agree
    assert type(ExitClassifier.from_pretrained(tmp_path).estimator) is GapThresholdRule
