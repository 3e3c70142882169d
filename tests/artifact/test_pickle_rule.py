"""No silent unpickling beside a checkpoint: a joblib file found beside the weights of a model that is only named
as a model is never loaded; naming the classifier or `trust_remote_classifier=True` is the consent, and a
safetensors encoding beside it is always preferred."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
from artifact_files import X, Y
from sklearn.linear_model import LogisticRegression
from tiny_models import make_pair

from adainfer_hf import AdaInferLlamaForCausalLM, ExitClassifier
from adainfer_hf.artifact.constants import (
    ARTIFACT_DATA_NAMES,
    CLASSIFIER_MANIFEST_NAME,
    CLASSIFIER_SAFE_NAME,
    CLASSIFIER_WEIGHTS_NAME,
)


# ---------------------------------------------------------------------- item 13: no silent unpickling beside a checkpoint
class _Payload:
    """Unpickling this runs `Path(marker).touch()`: the stand-in for a malicious pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _model_dir_with_joblib(tmp_path, payload=True, safe=False) -> Path:
    """A checkpoint with an exit classifier beside it whose joblib file is `_Payload` (and a manifest that matches:
    a crafted Hub repo can carry one), as `snapshot_download` / `hf download --local-dir` / `git clone` leave it."""
    import joblib
    from sklearn.tree import DecisionTreeClassifier

    from adainfer_hf.artifact.manifest import manifest_text

    stock, ada = make_pair("llama_gqa")
    path = tmp_path / "downloaded"
    stock.save_pretrained(path)
    estimator = (LogisticRegression() if safe else DecisionTreeClassifier(max_depth=2, random_state=0)).fit(X, Y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tree has no safetensors encoding
        ExitClassifier(estimator).bind(ada).save_pretrained(path)
    assert (path / CLASSIFIER_SAFE_NAME).is_file() == safe
    if payload:
        joblib.dump(_Payload(tmp_path / "marker"), path / CLASSIFIER_WEIGHTS_NAME)
        files = {n: (path / n).read_bytes() for n in ARTIFACT_DATA_NAMES if (path / n).is_file()}
        (path / CLASSIFIER_MANIFEST_NAME).write_text(manifest_text(files))
    return path


def test_a_joblib_beside_a_checkpoint_is_not_unpickled_when_only_the_model_is_named(tmp_path):
    from adainfer_hf import load_adainfer_model

    path = _model_dir_with_joblib(tmp_path)
    marker = tmp_path / "marker"
    where = repr(os.fspath(path))
    for load in (AdaInferLlamaForCausalLM.from_pretrained, load_adainfer_model):
        with pytest.raises(ValueError, match=rf"{where} holds an exit classifier as {CLASSIFIER_WEIGHTS_NAME} only.*"
                                             rf"exit_classifier={where}.*trust_remote_classifier=True"):
            load(path)
        assert not marker.exists()
    assert AdaInferLlamaForCausalLM.from_pretrained(path, exit_classifier=None).exit_classifier is None
    assert not marker.exists()
    # The flag is what stands between the file and its code: with it the payload runs (and is no classifier).
    with pytest.raises(ValueError, match="estimator"):
        AdaInferLlamaForCausalLM.from_pretrained(path, trust_remote_classifier=True)
    assert marker.exists()


def test_a_joblib_beside_a_checkpoint_loads_when_named_or_trusted(tmp_path):
    path = _model_dir_with_joblib(tmp_path, payload=False)
    for kwargs in ({"exit_classifier": path}, {"exit_classifier": os.fspath(path)}, {"trust_remote_classifier": True}):
        model = AdaInferLlamaForCausalLM.from_pretrained(path, **kwargs)
        assert type(model.exit_classifier.estimator).__name__ == "DecisionTreeClassifier"
    assert type(ExitClassifier.from_pretrained(path).estimator).__name__ == "DecisionTreeClassifier"


def test_the_safetensors_encoding_is_preferred_beside_a_checkpoint(tmp_path):
    path = _model_dir_with_joblib(tmp_path, safe=True)  # a pickle beside a safe file is never read
    model = AdaInferLlamaForCausalLM.from_pretrained(path)
    assert type(model.exit_classifier.estimator) is LogisticRegression
    assert not (tmp_path / "marker").exists()
