"""File names of the exit-classifier artifact: the one place that defines them (as PEFT's `utils/constants.py`).

An artifact directory (standalone, or beside a checkpoint's weights) holds:

- `exit_classifier_config.json` (`CLASSIFIER_CONFIG_NAME`): the `ExitClassifierConfig`, sorted JSON;
- `exit_classifier.joblib` (`CLASSIFIER_WEIGHTS_NAME`): the estimator, pickled with joblib;
- `exit_classifier.safetensors` (`CLASSIFIER_SAFE_NAME`): the pickle-free encoding of the estimator, when it has one;
- `exit_gate.safetensors` (`CLASSIFIER_GATE_NAME`): the arrays of the classifier's gate (`policy.gate.LinearGate`),
  when it has one; the config records its fingerprint;
- `exit_classifier_manifest.json` (`CLASSIFIER_MANIFEST_NAME`): the sha256 of each file above, written last by a save
  and checked by every load, so that an interrupted or mixed save is refused instead of loaded (see `manifest`).
"""

__all__ = [
    "ARTIFACT_DATA_NAMES",
    "CLASSIFIER_CONFIG_NAME",
    "CLASSIFIER_GATE_NAME",
    "CLASSIFIER_MANIFEST_NAME",
    "CLASSIFIER_SAFE_NAME",
    "CLASSIFIER_WEIGHTS_NAME",
]

CLASSIFIER_CONFIG_NAME = "exit_classifier_config.json"
CLASSIFIER_WEIGHTS_NAME = "exit_classifier.joblib"
CLASSIFIER_SAFE_NAME = "exit_classifier.safetensors"
CLASSIFIER_GATE_NAME = "exit_gate.safetensors"
CLASSIFIER_MANIFEST_NAME = "exit_classifier_manifest.json"
# The files the manifest covers, in the order a save moves them into place (the config last, then the manifest).
ARTIFACT_DATA_NAMES = (CLASSIFIER_WEIGHTS_NAME, CLASSIFIER_SAFE_NAME, CLASSIFIER_GATE_NAME, CLASSIFIER_CONFIG_NAME)
