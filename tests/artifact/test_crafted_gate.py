"""Crafted gate files and configs that disagree with their files about the gate fail when they are loaded,
naming the file (each resealed with a manifest, or with the manifest deleted as a hand edit does)."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from artifact_files import X, edit_config, reseal, stock_dir

from adainfer_hf import AdaInferLlamaForCausalLM, ExitClassifier, GapThresholdRule
from adainfer_hf.artifact.constants import (
    ARTIFACT_DATA_NAMES,
    CLASSIFIER_CONFIG_NAME,
    CLASSIFIER_GATE_NAME,
    CLASSIFIER_MANIFEST_NAME,
)


def _gated(hidden_size=4):
    from adainfer_hf.policy.gate import LinearGate

    gate = LinearGate([1, 2], np.ones((2, hidden_size)), np.zeros(2), np.zeros(2))
    return ExitClassifier(GapThresholdRule().fit(X), gate=gate)


def _regate(directory: Path, edit) -> None:
    """Rewrite the gate file with `edit(tensors)` and a manifest that matches."""
    import safetensors.numpy

    from adainfer_hf.artifact.manifest import manifest_text

    path = directory / CLASSIFIER_GATE_NAME
    tensors = dict(safetensors.numpy.load_file(path))
    edit(tensors)
    path.write_bytes(safetensors.numpy.save(tensors))
    files = {n: (directory / n).read_bytes() for n in ARTIFACT_DATA_NAMES if (directory / n).is_file()}
    (directory / CLASSIFIER_MANIFEST_NAME).write_text(manifest_text(files))


GATES = {
    "weight-wrong-rows": (lambda t: t.update({"gate.weight": np.ones((3, 4), np.float32)}),
                          r"exit_gate.safetensors: LinearGate weight must have shape \(2, hidden_size\)"),
    "missing-bias": (lambda t: t.pop("gate.bias"), r"exit_gate.safetensors: missing gate arrays \['gate.bias'\]"),
    "weight-nan": (lambda t: t.update({"gate.weight": np.full((2, 4), np.nan, np.float32)}),
                   "exit_gate.safetensors: LinearGate weight and bias must be finite"),
    "other-thresholds": (lambda t: t.update({"gate.threshold": np.ones(2, np.float32)}),
                         "exit_gate.safetensors has fingerprint .* but the config records gate_fingerprint"),
}


@pytest.mark.parametrize("case", list(GATES))
def test_a_crafted_gate_file_fails_at_load_naming_the_file(tmp_path, case):
    edit, message = GATES[case]
    _gated().save_pretrained(tmp_path)
    _regate(tmp_path, edit)
    with pytest.raises(ValueError, match=rf"{CLASSIFIER_CONFIG_NAME}.*{message}"):
        ExitClassifier.from_pretrained(tmp_path)


def test_a_config_naming_a_gate_without_its_file_is_refused(tmp_path):
    ExitClassifier(GapThresholdRule().fit(X)).save_pretrained(tmp_path)
    edit_config(tmp_path, gate_fingerprint="0123456789abcdef")
    with pytest.raises(FileNotFoundError, match="names a gate .* but exit_gate.safetensors is missing"):
        ExitClassifier.from_pretrained(tmp_path)


@pytest.mark.parametrize("manifest", ["deleted", "resealed"])
def test_a_gate_file_the_config_does_not_name_is_refused_naming_both(tmp_path, manifest):
    # What the "edited by hand" message invites: the config's gate_fingerprint set to null, and the manifest deleted
    # (or rewritten to match). Loaded without its gate, the classifier would exit where the gate stops it.
    _gated().save_pretrained(tmp_path / "clf")
    edit_config(tmp_path / "clf", gate_fingerprint=None)
    if manifest == "deleted":
        (tmp_path / "clf" / CLASSIFIER_MANIFEST_NAME).unlink()
    where = re.escape(repr(os.fspath(tmp_path / "clf" / CLASSIFIER_CONFIG_NAME)))
    gate_file = re.escape(repr(os.fspath(tmp_path / "clf" / CLASSIFIER_GATE_NAME)))
    message = rf"files and config disagree: {where} names no gate \(gate_fingerprint=null\), but {gate_file} is present"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # without a manifest the load warns first
        with pytest.raises(ValueError, match=message):
            ExitClassifier.from_pretrained(tmp_path / "clf")
        with pytest.raises(ValueError, match=message):
            AdaInferLlamaForCausalLM.from_pretrained(stock_dir(tmp_path), exit_classifier=tmp_path / "clf")
        (tmp_path / "clf" / CLASSIFIER_GATE_NAME).unlink()  # the remedy the message names
        if manifest == "resealed":
            reseal(tmp_path / "clf")
        loaded = ExitClassifier.from_pretrained(tmp_path / "clf")
    assert loaded.gate is None and loaded.exit_mask(X).tolist() == _gated().exit_mask(X).tolist()
