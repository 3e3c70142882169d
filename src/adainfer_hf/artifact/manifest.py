"""The artifact manifest: the sha256 of each artifact file, written last by a save and checked by every load.

A save moves the estimator files and the config into place one by one (each with an atomic rename), then the
manifest. Until the new manifest lands, the old one no longer matches the files that have already moved, so a save
that was interrupted (Ctrl-C, a crash, a full disk) between two moves is refused at load time with an error that
names the file, instead of loading a new estimator with an old threshold and schedule. An artifact without a
manifest (saved by an earlier adainfer-hf, or by hand) still loads, with a one-time warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

from .constants import ARTIFACT_DATA_NAMES, CLASSIFIER_MANIFEST_NAME

__all__ = ["MANIFEST_FORMAT_VERSION", "check_files", "check_local", "file_sha256", "manifest_text", "read_manifest"]

MANIFEST_FORMAT_VERSION = 1
_WARNED_NO_MANIFEST: set[str] = set()  # artifacts already warned about (warn once per artifact and process)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_text(files: Mapping[str, bytes]) -> str:
    """The manifest of artifact files given as `{file name: content}`: sorted JSON with each file's sha256."""
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    return json.dumps({"format_version": MANIFEST_FORMAT_VERSION, "sha256": digests}, indent=2, sort_keys=True) + "\n"


def read_manifest(path: str | os.PathLike) -> dict[str, str]:
    """`{file name: sha256}` of a manifest file; a malformed one raises `ValueError` naming it."""
    source = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"Exit-classifier manifest {source!r} is not valid JSON: {err}") from err
    version = data.get("format_version") if isinstance(data, dict) else None
    digests = data.get("sha256") if isinstance(data, dict) else None
    if not isinstance(version, int) or isinstance(version, bool) or version > MANIFEST_FORMAT_VERSION:
        raise ValueError(
            f"Exit-classifier manifest {source!r} has format_version={version!r}; this adainfer-hf reads versions "
            f"up to {MANIFEST_FORMAT_VERSION}. Upgrade adainfer-hf to load it."
        )
    if not isinstance(digests, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in digests.items()
    ):
        raise ValueError(
            f"Exit-classifier manifest {source!r}: 'sha256' must map file names to hex digests; got {digests!r}."
        )
    return digests


def check_files(
    files: Mapping[str, str | os.PathLike], manifest: Mapping[str, str] | None, where: str, stacklevel: int = 4
) -> None:
    """Checks artifact files against their manifest.

    Every file given must be listed with its sha256; files the manifest lists but that are absent are not an error
    (an artifact may ship without its joblib pickle), since every file that is present is checked.

    Args:
        files (`Mapping[str, str | os.PathLike]`): `{artifact file name: local path}` of the files about to be read.
        manifest (`Mapping[str, str]`, *optional*): `read_manifest`'s result; `None` when the artifact has none (warns
            once per `where`).
        where (`str`): the artifact, for messages (`"'/path/to/dir'"`, `"Hub repo 'org/name'"`).
        stacklevel (`int`, *optional*, defaults to 4): of the warning, so that it points at the caller's call.

    Raises:
        `ValueError`: naming the first file that is not listed or whose content differs from the manifest.
    """
    if manifest is None:
        if where not in _WARNED_NO_MANIFEST:
            _WARNED_NO_MANIFEST.add(where)
            warnings.warn(
                f"The exit-classifier artifact in {where} has no {CLASSIFIER_MANIFEST_NAME} (it was saved by an "
                "earlier adainfer-hf, or by hand), so an interrupted save cannot be told from a complete one; it is "
                "loaded as it is. Save it again to add the manifest.",
                UserWarning,
                stacklevel=stacklevel,
            )
        return
    for name, path in files.items():
        expected = manifest.get(name)
        problem = None
        if expected is None:
            problem = f"{name} is not listed in {CLASSIFIER_MANIFEST_NAME}"
        elif file_sha256(path) != expected:
            problem = f"{name} does not match the manifest ({CLASSIFIER_MANIFEST_NAME})"
        if problem is not None:
            raise ValueError(
                f"The artifact in {where} is incomplete or mixed: {problem}; re-save it. (A save that was "
                f"interrupted leaves this state; if you edited a file by hand, delete {CLASSIFIER_MANIFEST_NAME}.)"
            )


def check_local(directory: Path) -> None:
    """Checks the artifact files present in `directory` against its manifest (see [`check_files`])."""
    present = {name: directory / name for name in ARTIFACT_DATA_NAMES if (directory / name).is_file()}
    manifest_path = directory / CLASSIFIER_MANIFEST_NAME
    manifest = read_manifest(manifest_path) if manifest_path.is_file() else None
    check_files(present, manifest, repr(os.fspath(directory)), stacklevel=5)
