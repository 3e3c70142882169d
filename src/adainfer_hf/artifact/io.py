"""Reading and writing exit-classifier artifacts: the typed config, atomic saves, local and Hub loading.

An artifact directory holds `exit_classifier_config.json` (sorted JSON), `exit_classifier.joblib` (the estimator,
pickled), for the estimators this package produces `exit_classifier.safetensors` (pickle-free; see
`artifact.codec`), and `exit_classifier_manifest.json` (the sha256 of the others, written last; see
`artifact.manifest`). The config itself is `artifact.config.ExitClassifierConfig`; `ExitClassifier.save_pretrained`
/ `from_pretrained` (`artifact.hub.ArtifactMixin`) and the model classes call these functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import safetensors.numpy
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HFValidationError

from ..utils.atomic import atomic_file
from .codec import SAFE_FORMAT, qualified_name, safe_encode, safe_load
from .config import ExitClassifierConfig
from .constants import (
    ARTIFACT_DATA_NAMES,
    CLASSIFIER_CONFIG_NAME,
    CLASSIFIER_GATE_NAME,
    CLASSIFIER_MANIFEST_NAME,
    CLASSIFIER_SAFE_NAME,
    CLASSIFIER_WEIGHTS_NAME,
)
from .manifest import check_files, check_local, manifest_text, read_manifest

__all__ = [
    "artifact_state",
    "check_agreement",
    "commit_artifact",
    "encode_artifact",
    "has_artifact",
    "read_hub",
    "read_local",
    "save_beside_weights",
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


def encode_artifact(estimator, config: ExitClassifierConfig,
                    gate_tensors: dict[str, np.ndarray] | None = None) -> dict[str, bytes]:
    """The artifact's files as `{file name: bytes}`: the config (versions filled in here), the joblib estimator,
    when the estimator has one its pickle-free safetensors encoding, and the gate's arrays when given (safetensors).
    Everything that depends on the content (an unserialisable `calibration`, an estimator joblib cannot pickle)
    fails here, before anything is written."""
    if (gate_tensors is None) != (config.gate_fingerprint is None):
        raise ValueError("gate_fingerprint and the gate's arrays go together: pass both or neither.")
    config.versions = _versions()
    safe_bytes = safe_encode(estimator)  # None when the estimator has no safe encoding
    config.safe_format = SAFE_FORMAT if safe_bytes is not None else None
    files = {CLASSIFIER_CONFIG_NAME: config.to_json_string().encode("utf-8")}
    buffer = io.BytesIO()
    joblib.dump(estimator, buffer)
    files[CLASSIFIER_WEIGHTS_NAME] = buffer.getvalue()
    if safe_bytes is not None:
        files[CLASSIFIER_SAFE_NAME] = safe_bytes
    if gate_tensors is not None:
        files[CLASSIFIER_GATE_NAME] = safetensors.numpy.save(
            {k: np.ascontiguousarray(v) for k, v in gate_tensors.items()})
    return files


def _load_gate(path: str) -> dict[str, np.ndarray]:
    try:
        return safetensors.numpy.load_file(path)
    except Exception as err:  # a damaged header raises SafetensorError, a truncated file OSError or ValueError
        raise ValueError(f"Could not read the gate file {path!r} ({type(err).__name__}: {err}).") from err


def commit_artifact(files: dict[str, bytes], save_directory: str | os.PathLike) -> None:
    """Writes the files of [`encode_artifact`] into `save_directory` as one consistent unit.

    Each file is written to a temporary name inside `save_directory` and renamed into place (`utils.atomic`),
    so nothing is written outside the directory and no rename crosses a file system. The manifest goes last: until
    it lands, a reader finds the old manifest, which no longer matches the files already moved, and refuses the
    artifact (`manifest.check_local`). If the save fails or is interrupted after a first file has moved, the
    artifact files are removed (manifest last), so the directory holds the old complete artifact or none.
    """
    target = Path(save_directory)
    if target.exists() and not target.is_dir():
        raise ValueError(f"save_directory {os.fspath(target)!r} exists and is not a directory.")
    target.mkdir(parents=True, exist_ok=True)  # touches the parent only when the target is missing
    old = {name: target / name for name in ARTIFACT_DATA_NAMES if (target / name).is_file()}
    if old and not (target / CLASSIFIER_MANIFEST_NAME).is_file():
        # An artifact from an earlier version: record what it holds first, so that an interruption below is
        # detected like any other (this describes the old files exactly; they still load).
        _write(target / CLASSIFIER_MANIFEST_NAME, manifest_text({n: p.read_bytes() for n, p in old.items()}).encode())
    before = _file_digests(target)
    try:
        for name in ARTIFACT_DATA_NAMES:  # a stale safetensors file would shadow a new joblib: it goes too
            if name in files:
                _write(target / name, files[name])
            elif (target / name).exists():
                os.remove(target / name)
        _write(target / CLASSIFIER_MANIFEST_NAME, manifest_text(files).encode("utf-8"))
    except BaseException:
        # Compared with what was there, not with a flag set after each step: an interruption that lands after a
        # rename and before any bookkeeping is seen too.
        if _file_digests(target) != before:
            _remove_artifact(target)
        raise


def write_artifact(estimator, config: ExitClassifierConfig, save_directory: str | os.PathLike,
                   gate_tensors: dict[str, np.ndarray] | None = None) -> None:
    """[`encode_artifact`] then [`commit_artifact`]: the `ExitClassifier.save_pretrained` of one artifact."""
    commit_artifact(encode_artifact(estimator, config, gate_tensors), save_directory)


def _write(path: Path, data: bytes) -> None:
    with atomic_file(path, "wb") as f:
        f.write(data)


def _file_digests(directory: Path) -> dict:
    """sha256 of each artifact file present in `directory` (the manifest included)."""
    return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest()
            for name in (*ARTIFACT_DATA_NAMES, CLASSIFIER_MANIFEST_NAME) if (directory / name).is_file()}


def _remove_artifact(directory: Path) -> None:
    """Best-effort removal of an artifact's files, the manifest last (a half-removed artifact stays refused)."""
    for name in (*ARTIFACT_DATA_NAMES, CLASSIFIER_MANIFEST_NAME):
        with contextlib.suppress(OSError):
            os.remove(directory / name)


def has_artifact(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds (part of) an exit-classifier artifact: a config or a manifest."""
    directory = Path(directory)
    return (directory / CLASSIFIER_CONFIG_NAME).is_file() or (directory / CLASSIFIER_MANIFEST_NAME).is_file()


def save_beside_weights(save, save_directory: str | os.PathLike) -> None:
    """Runs `save(save_directory)` (an artifact save) after a model's weights were written there.

    A failure raises `OSError` (same errno) or `RuntimeError` saying that the weights were saved but the classifier
    was not, and what the directory now holds ([`artifact_state`]); a `KeyboardInterrupt` propagates as it is.
    """
    try:
        save(save_directory)
    except Exception as err:
        message = (
            f"Saved the model weights to {os.fspath(save_directory)!r} but not its exit classifier "
            f"({type(err).__name__}: {err}); the directory {artifact_state(save_directory)}. Fix the cause and "
            "save again."
        )
        if isinstance(err, OSError) and err.errno is not None:
            raise OSError(err.errno, message) from err  # callers that handle disk errors still see one
        raise RuntimeError(message) from err


def artifact_state(directory: str | os.PathLike) -> str:
    """What `directory` holds after a failed save, in words, for error messages."""
    if not has_artifact(directory):
        return "holds no exit classifier, so loading it gives a model that never exits"
    try:
        check_local(Path(directory))
    except (OSError, ValueError):
        return "holds a partial exit classifier, which loading refuses"
    return "still holds its previous exit classifier"


def check_agreement(config: ExitClassifierConfig, config_source: str, estimator, gate_file: str | None) -> None:
    """Refuses an artifact whose files and config disagree, naming both: a gate file the config does not name
    (`gate_fingerprint` null, e.g. set by hand with the manifest deleted: loading it without its gate would change
    where the classifier exits), or an estimator file of another class than the config's `estimator_class`.

    Args:
        config ([`ExitClassifierConfig`]): the artifact's config, as read.
        config_source (`str`): the config file, for messages.
        estimator: the estimator loaded from the artifact's estimator file (`None`: not loaded yet, not checked).
        gate_file (`str`, *optional*): where the artifact holds a gate file (a path, or a name in a Hub repo);
            `None` when it holds none.

    Raises:
        `ValueError`: naming the config file, the field and the file that disagree.
    """
    if config.gate_fingerprint is None and gate_file is not None:
        raise ValueError(
            f"The artifact's files and config disagree: {config_source} names no gate (gate_fingerprint=null), but "
            f"{gate_file} is present. Loading it without the gate would change where it exits; restore the "
            f"config's gate_fingerprint, or delete {CLASSIFIER_GATE_NAME} to use the classifier without a gate."
        )
    named = config.estimator_class
    # Only the class name: a module path may move between releases (scikit-learn's private `_classes` modules).
    if estimator is not None and named is not None and named.rpartition(".")[2] != type(estimator).__name__:
        raise ValueError(
            f"The artifact's files and config disagree: {config_source} names estimator_class={named!r}, but the "
            f"estimator file holds a {qualified_name(estimator)}."
        )


def read_local(directory: Path, allow_pickle: bool = True) -> tuple[ExitClassifierConfig, Any, dict | None]:
    """(config, estimator, gate arrays or None) of an artifact directory: the estimator from its safetensors
    encoding when present, else joblib; the gate's arrays when the config names a gate.

    The files are checked against the manifest first (`manifest.check_local`), then against the config
    ([`check_agreement`]). With `allow_pickle=False` (an
    artifact found beside a checkpoint that the caller only named as a model) a joblib-only artifact is refused
    before its file is opened.
    """
    config_path = directory / CLASSIFIER_CONFIG_NAME
    where = os.fspath(directory)
    if not config_path.is_file():
        raise FileNotFoundError(
            f"No exit classifier in {where!r}: {CLASSIFIER_CONFIG_NAME} is missing (expected "
            f"{CLASSIFIER_CONFIG_NAME} plus {CLASSIFIER_SAFE_NAME} and/or {CLASSIFIER_WEIGHTS_NAME})."
        )
    check_local(directory)
    config = ExitClassifierConfig.from_json_file(config_path)
    gate = None
    if config.gate_fingerprint is not None:
        if not (directory / CLASSIFIER_GATE_NAME).is_file():
            raise FileNotFoundError(f"{os.fspath(config_path)!r} names a gate (gate_fingerprint="
                                    f"{config.gate_fingerprint!r}) but {CLASSIFIER_GATE_NAME} is missing in {where!r}.")
        gate = _load_gate(os.fspath(directory / CLASSIFIER_GATE_NAME))
    if (directory / CLASSIFIER_SAFE_NAME).is_file():
        estimator = safe_load(os.fspath(directory / CLASSIFIER_SAFE_NAME))
    elif (directory / CLASSIFIER_WEIGHTS_NAME).is_file():
        if not allow_pickle:
            raise ValueError(
                f"The model directory {where!r} holds an exit classifier as {CLASSIFIER_WEIGHTS_NAME} only (no "
                f"{CLASSIFIER_SAFE_NAME}). A joblib file is a pickle and runs arbitrary code when loaded, and a model "
                "directory may come from the Hub (snapshot_download, `hf download --local-dir`, git clone), so it is "
                "not loaded just because it sits beside the weights. If you trust it, name it: "
                f"from_pretrained(..., exit_classifier={where!r}), or pass trust_remote_classifier=True; "
                "exit_classifier=None loads the model without it."
            )
        estimator = _load_joblib(os.fspath(directory / CLASSIFIER_WEIGHTS_NAME))
    else:
        raise FileNotFoundError(
            f"No estimator file in {where!r}: expected {CLASSIFIER_SAFE_NAME} or "
            f"{CLASSIFIER_WEIGHTS_NAME} beside {CLASSIFIER_CONFIG_NAME}."
        )
    gate_path = directory / CLASSIFIER_GATE_NAME
    check_agreement(config, repr(os.fspath(config_path)), estimator,
                    repr(os.fspath(gate_path)) if gate_path.is_file() else None)
    return config, estimator, gate


def read_hub(repo_id, revision, trust_remote_classifier, cache_dir, token, local_files_only):
    """(config, estimator, gate arrays or None) of a Hub artifact; a joblib-only repository needs
    `trust_remote_classifier`. The files are checked against the manifest, then against the config
    ([`check_agreement`]; without a manifest, a gate file is looked for even where the config names none)."""
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
    try:  # absent from repos pushed by an earlier adainfer-hf (and from a cache filled by one while offline)
        manifest = read_manifest(fetch(CLASSIFIER_MANIFEST_NAME))
    except EntryNotFoundError:
        manifest = None
    place = f"Hub repo {where}"
    check_files({CLASSIFIER_CONFIG_NAME: config_path}, manifest, place)
    config = ExitClassifierConfig.from_json_file(config_path)
    config_source = f"{CLASSIFIER_CONFIG_NAME} of {place}"
    gate = None
    if config.gate_fingerprint is None:
        listed = manifest is not None and CLASSIFIER_GATE_NAME in manifest
        if manifest is None:  # an artifact saved without one (or with it deleted): is a gate file there?
            try:
                fetch(CLASSIFIER_GATE_NAME)
                listed = True
            except EntryNotFoundError:
                pass
        check_agreement(config, config_source, None, f"{CLASSIFIER_GATE_NAME} of {place}" if listed else None)
    else:
        try:
            gate_path = fetch(CLASSIFIER_GATE_NAME)
        except EntryNotFoundError as err:
            raise FileNotFoundError(f"Hub repo {where} names a gate in {CLASSIFIER_CONFIG_NAME} but has no "
                                    f"{CLASSIFIER_GATE_NAME}.") from err
        check_files({CLASSIFIER_GATE_NAME: gate_path}, manifest, place)
        gate = _load_gate(gate_path)
    if config.safe_format is not None:
        try:
            safe_path = fetch(CLASSIFIER_SAFE_NAME)
        except EntryNotFoundError:
            pass  # announced but absent: fall through to the joblib rule below
        else:
            check_files({CLASSIFIER_SAFE_NAME: safe_path}, manifest, place)
            estimator = safe_load(safe_path)
            check_agreement(config, config_source, estimator, None)
            return config, estimator, gate
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
    check_files({CLASSIFIER_WEIGHTS_NAME: weights_path}, manifest, place)
    estimator = _load_joblib(weights_path)
    check_agreement(config, config_source, estimator, None)
    return config, estimator, gate
