"""Reading and writing exit-classifier artifacts: the typed config, atomic saves, local and Hub loading.

An artifact directory holds `exit_classifier_config.json` (sorted JSON), `exit_classifier.joblib` (the estimator,
pickled) and, for the estimators this package produces, `exit_classifier.safetensors` (pickle-free; see
`artifact.codec`). The config itself is `artifact.config.ExitClassifierConfig`; `ExitClassifier.save_pretrained` /
`from_pretrained` (`artifact.hub.ArtifactMixin`) call these functions.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import joblib
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HFValidationError

from .codec import SAFE_FORMAT, _safe_encode, _safe_load
from .config import ExitClassifierConfig
from .constants import CLASSIFIER_CONFIG_NAME, CLASSIFIER_SAFE_NAME, CLASSIFIER_WEIGHTS_NAME

__all__ = [
    "CLASSIFIER_CONFIG_NAME",
    "CLASSIFIER_SAFE_NAME",
    "CLASSIFIER_WEIGHTS_NAME",
    "ExitClassifierConfig",
    "read_hub",
    "read_local",
    "write_artifact",
]

def _package_version(name: str, fallback: str = "0.0.0+unknown") -> str:
    try:
        return importlib_metadata.version(name)
    except importlib_metadata.PackageNotFoundError:
        return fallback


def _versions() -> dict[str, str]:
    return {
        name: _package_version(name)
        for name in ("adainfer-hf", "scikit-learn", "transformers", "torch", "numpy", "joblib")
    }


def _load_joblib(path: str) -> Any:
    try:
        return joblib.load(path)
    except Exception as err:  # unpickling raises anything from EOFError to KeyError on a damaged file
        raise ValueError(
            f"Could not load the exit classifier from {path!r} ({type(err).__name__}: {err}); the file is corrupt "
            "or was written by an incompatible scikit-learn."
        ) from err


def write_artifact(estimator, config: ExitClassifierConfig, save_directory: str | os.PathLike) -> None:
    """Writes `config` (versions filled in here), the joblib estimator and, when the estimator has one, its
    pickle-free safetensors encoding, atomically: files go to a temporary directory beside `save_directory` and
    move into place only once complete, so an interrupted save leaves any previous artifact intact."""
    target = Path(save_directory)
    if target.exists() and not target.is_dir():
        raise ValueError(f"save_directory {os.fspath(target)!r} exists and is not a directory.")
    target.parent.mkdir(parents=True, exist_ok=True)
    config.versions = _versions()
    safe_bytes = _safe_encode(estimator)  # None when the estimator has no safe encoding
    config.safe_format = SAFE_FORMAT if safe_bytes is not None else None
    config_text = config.to_json_string()  # fail on a bad `calibration` before touching the disk

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        joblib.dump(estimator, tmp / CLASSIFIER_WEIGHTS_NAME)
        if safe_bytes is not None:
            (tmp / CLASSIFIER_SAFE_NAME).write_bytes(safe_bytes)
        (tmp / CLASSIFIER_CONFIG_NAME).write_text(config_text, encoding="utf-8")
        target.mkdir(exist_ok=True)
        # Data files first, the config last: until the config moves, a reader still sees a complete old
        # artifact (a stale safetensors file would shadow the new joblib, so it goes before the config).
        for name in (CLASSIFIER_WEIGHTS_NAME, CLASSIFIER_SAFE_NAME, CLASSIFIER_CONFIG_NAME):
            if (tmp / name).exists():
                os.replace(tmp / name, target / name)
            elif (target / name).exists():
                os.remove(target / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_local(directory: Path) -> tuple[ExitClassifierConfig, Any]:
    """(config, estimator) of an artifact directory: the safetensors encoding when present, else joblib."""
    config_path = directory / CLASSIFIER_CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(
            f"No exit classifier in {os.fspath(directory)!r}: {CLASSIFIER_CONFIG_NAME} is missing (expected "
            f"{CLASSIFIER_CONFIG_NAME} plus {CLASSIFIER_SAFE_NAME} and/or {CLASSIFIER_WEIGHTS_NAME})."
        )
    config = ExitClassifierConfig.from_json_file(config_path)
    if (directory / CLASSIFIER_SAFE_NAME).is_file():
        estimator = _safe_load(os.fspath(directory / CLASSIFIER_SAFE_NAME))
    elif (directory / CLASSIFIER_WEIGHTS_NAME).is_file():
        estimator = _load_joblib(os.fspath(directory / CLASSIFIER_WEIGHTS_NAME))
    else:
        raise FileNotFoundError(
            f"No estimator file in {os.fspath(directory)!r}: expected {CLASSIFIER_SAFE_NAME} or "
            f"{CLASSIFIER_WEIGHTS_NAME} beside {CLASSIFIER_CONFIG_NAME}."
        )
    return config, estimator

def read_hub(repo_id, revision, trust_remote_classifier, cache_dir, token, local_files_only):
    """(config, estimator) of a Hub artifact; a joblib-only repository needs `trust_remote_classifier`."""
    where = f"{repo_id!r}" + (f" (revision {revision!r})" if revision else "")

    def fetch(filename: str) -> str:
        return hf_hub_download(
            repo_id,
            filename,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
        )

    try:
        config_path = fetch(CLASSIFIER_CONFIG_NAME)
    except HFValidationError as err:
        raise FileNotFoundError(
            f"{repo_id!r} is neither a local directory nor a valid Hub repo id."
        ) from err
    except EntryNotFoundError as err:
        raise FileNotFoundError(
            f"Hub repo {where} has no {CLASSIFIER_CONFIG_NAME} (or it is not in the cache while offline)."
        ) from err
    config = ExitClassifierConfig.from_json_file(config_path)
    if config.safe_format is not None:
        try:
            return config, _safe_load(fetch(CLASSIFIER_SAFE_NAME))
        except EntryNotFoundError:
            pass  # announced but absent: fall through to the joblib rule below
    if not trust_remote_classifier:
        raise ValueError(
            f"Hub repo {where} has no {CLASSIFIER_SAFE_NAME}, only {CLASSIFIER_WEIGHTS_NAME}: a joblib file is a "
            "pickle and runs arbitrary code when loaded. If you trust this repository, pass "
            "trust_remote_classifier=True."
        )
    try:
        weights_path = fetch(CLASSIFIER_WEIGHTS_NAME)
    except EntryNotFoundError as err:
        raise FileNotFoundError(
            f"Hub repo {where} has neither {CLASSIFIER_SAFE_NAME} nor {CLASSIFIER_WEIGHTS_NAME}."
        ) from err
    return config, _load_joblib(weights_path)
