"""The exit-classifier config: the one dataclass that describes an artifact, apart from its fitted estimator.

`ExitClassifier` holds one [`ExitClassifierConfig`] and exposes its fields (`POLICY_FIELDS`) as read-only
properties; every change goes through `ExitClassifier.replace(**changes)`, which validates. The fields in
`SAVE_TIME_FIELDS` describe a saved file (estimator class, package versions, encodings) and are filled by the save.
[`jsonable`] gives the JSON-safe copy of a calibration record the config carries.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from .validation import check_config_types

__all__ = ["FORMAT_VERSION", "POLICY_FIELDS", "SAVE_TIME_FIELDS", "ExitClassifierConfig", "jsonable"]

FORMAT_VERSION = 1


@dataclass
class ExitClassifierConfig:
    """Everything about an [`ExitClassifier`] except the fitted estimator, serialised as sorted JSON.

    Args:
        estimator_class (`str`, *optional*): qualified class name of the estimator (informational).
        features (`list[str]`): feature names, in the column order the estimator expects.
        threshold (`float`, *optional*): firing threshold on the score; `None` uses the estimator's `predict`.
        min_layer (`int`, defaults to 1): first 1-based layer after which the classifier may fire.
        check_layers (`list[int]`, *optional*): explicit 1-based schedule of checked layers.
        decode_check_layers (`list[int]`, *optional*): the schedule of cached single-token steps; `None` = the same.
        check_dtype (`str`, *optional*): dtype of the LM head used by checks ("bfloat16", "float16"); `None` = the
            model's own. A half-precision head makes checks several times cheaper on fp32 models; calibrate with
            the same setting.
        check_vocabulary (`list[int]`, *optional*): the token ids a check scores (sorted); `None` = all. A check
            then computes only these rows of the LM head (its features describe the distribution over them) and a
            row that exits gets their logits as its next-token logits, every other token `-inf`. Calibrate with the
            same vocabulary (`training.vocabulary.restrict_table`).
        label (`str`, defaults to `"final"`): training target, `"final"` (top-1 equals the final layer's) or
            `"gold"` (top-1 equals the gold answer).
        base_model_name_or_path (`str`, *optional*) / base_model_revision (`str`, *optional*): the base model.
        num_layers (`int`, *optional*): decoder layer count of the base model.
        lm_head_fingerprint (`dict`, *optional*): `architectures.lm_head_fingerprint` of the base model.
        calibration (`dict`, *optional*): free-form achieved figures (accuracy, mean exit layer, ...).
        gate_fingerprint (`str`, *optional*): `LinearGate.fingerprint()` of the classifier's gate, stored in
            `exit_gate.safetensors`; `None` = no gate (every check computes the LM head).
        drafting (`bool`, defaults to `False`): the classifier was trained to draft tokens for lossless generation;
            `generate` then verifies its exits by default (`generate(..., lossless=True)`; a per-call `lossless=`
            overrides).
        versions (`dict`): package versions at save time.
        safe_format (`str`, *optional*): name of the pickle-free encoding saved beside the joblib file, if any.
        format_version (`int`): version of this file format.
    """

    estimator_class: str | None = None
    features: list[str] = field(default_factory=lambda: ["gap", "top_prob"])
    threshold: float | None = None
    min_layer: int = 1
    check_layers: list[int] | None = None
    decode_check_layers: list[int] | None = None
    check_dtype: str | None = None
    check_vocabulary: list[int] | None = None
    label: str = "final"
    base_model_name_or_path: str | None = None
    base_model_revision: str | None = None
    num_layers: int | None = None
    lm_head_fingerprint: dict | None = None
    calibration: dict | None = None
    gate_fingerprint: str | None = None
    drafting: bool = False
    versions: dict = field(default_factory=dict)
    safe_format: str | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if not isinstance(self.drafting, bool):
            raise ValueError(f"drafting must be True or False; got {self.drafting!r}.")

    def to_json_string(self) -> str:
        """Serialise to sorted, indented JSON (stable diffs, human-readable on the Hub)."""
        try:
            return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"
        except TypeError as err:
            raise ValueError(
                f"ExitClassifierConfig is not JSON-serialisable ({err}); check `calibration`."
            ) from err

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> ExitClassifierConfig:
        """Build a config from a dict; unknown keys are dropped with one warning (as PEFT does), and a known key of the
        wrong JSON type (or a malformed `lm_head_fingerprint`) raises `ValueError` naming `source` and the field."""
        if not isinstance(data, dict):
            raise ValueError(f"{source} must hold a JSON object, got {type(data).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(
                f"Ignoring unknown key(s) {unknown} in {source}; they may come from a newer adainfer-hf.",
                UserWarning,
                stacklevel=3,
            )
        check_config_types(data, source)
        config = cls(**{k: v for k, v in data.items() if k in known})
        if not isinstance(config.format_version, int) or config.format_version > FORMAT_VERSION:
            raise ValueError(
                f"{source} has format_version={config.format_version!r}; this adainfer-hf reads versions up to "
                f"{FORMAT_VERSION}. Upgrade adainfer-hf to load it."
            )
        return config

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> ExitClassifierConfig:
        """Read a config file; a malformed file raises `ValueError` naming it."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"Exit-classifier config {os.fspath(path)!r} is not valid JSON: {err}") from err
        return cls.from_dict(data, source=os.fspath(path))


# Filled when an artifact is written (`artifact.io.write_artifact`), not chosen by the user.
SAVE_TIME_FIELDS = ("estimator_class", "versions", "safe_format", "format_version")
# What an `ExitClassifier` is made of besides its estimator: its constructor's keyword arguments and properties.
POLICY_FIELDS = tuple(f.name for f in fields(ExitClassifierConfig) if f.name not in SAVE_TIME_FIELDS)


def jsonable(value):
    """`value` (a calibration record, `ExitClassifierConfig.calibration`) with dict keys as strings, tuples as
    lists, numpy scalars as Python ones and non-finite floats as None (JSON has no inf or nan)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
