"""`save_pretrained` / `from_pretrained` / `push_to_hub` for an object made of a config and a fitted estimator.

[`ArtifactMixin`] is what `ExitClassifier` inherits for its life on disk and on the Hub (as PEFT's `PushToHubMixin`):
the class supplies `config` (an [`~adainfer_hf.artifact.io.ExitClassifierConfig`]), `estimator`, `_gate_tensors()`
(the arrays of its gate, or None) and `_from_artifact(config, estimator, gate_tensors)`; the files themselves are
read and written by `artifact.io`, and a validation error of a loaded artifact names the config file it came from.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from huggingface_hub import HfApi

from .constants import CLASSIFIER_CONFIG_NAME
from .io import encode_artifact, read_hub, read_local, write_artifact

__all__ = ["ArtifactMixin"]


class ArtifactMixin:
    """Local and Hub persistence of a config-plus-estimator artifact (see the module docstring)."""

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Save the config, the joblib estimator, (when possible) its pickle-free safetensors encoding and the manifest.

        The artifact is written as one unit: every file is encoded first (a classifier that cannot be saved fails
        before anything is written), then written to a temporary name inside `save_directory` and renamed into
        place, the manifest (the sha256 of each file) last. A save interrupted between two renames leaves files
        that no longer match the old manifest, which loading refuses; a save that fails or is interrupted removes
        the artifact files it had started to replace. So a later load finds the previous artifact, or a clear
        error, never a new estimator with an old config. Nothing is written outside `save_directory`.

        Args:
            save_directory (`str` or `os.PathLike`): target directory (created if missing).
        """
        write_artifact(self.estimator, self.config, save_directory, self._gate_tensors())

    def _gate_tensors(self):
        """The arrays of the object's gate to store beside the estimator, or None (the default: no gate)."""
        return None

    def _artifact_files(self) -> dict[str, bytes]:
        """The artifact's files as bytes (`artifact.io.encode_artifact`), for a save in two steps."""
        return encode_artifact(self.estimator, self.config, self._gate_tensors())

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        revision: str | None = None,
        trust_remote_classifier: bool = False,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool | None = None,
    ):
        """Load a classifier from a local directory or a Hugging Face Hub repository.

        A local directory you name here is loaded from its safetensors file when present, else from its joblib file
        (naming it is the consent to unpickle it). A Hub repository is loaded from its safetensors file; a
        repository with only a joblib file (a pickle, which runs code when loaded) is refused unless
        `trust_remote_classifier=True`. Either way the files are checked against the artifact's manifest first.
        With `HF_HUB_OFFLINE=1` the Hub files are read from the local cache.

        Args:
            path_or_repo_id (`str` or `os.PathLike`): a directory written by `save_pretrained`, or a repo id.
            revision (`str`, *optional*): branch, tag or commit of the Hub repository.
            trust_remote_classifier (`bool`, *optional*, defaults to `False`): allow unpickling a downloaded joblib.
            cache_dir (`str` or `os.PathLike`, *optional*): Hub cache directory.
            token (`str` or `bool`, *optional*): Hub token.
            local_files_only (`bool`, *optional*): only read the Hub cache, never the network.

        Returns:
            An instance of the class (`ExitClassifier`).
        """
        path = os.fspath(path_or_repo_id)
        if os.path.isdir(path):
            return cls._from_local(path)
        if os.path.exists(path):
            raise ValueError(
                f"{path!r} is a file; expected a directory written by save_pretrained or a repo id."
            )
        loaded = read_hub(path, revision, trust_remote_classifier, cache_dir, token, bool(local_files_only))
        return cls._checked(*loaded, f"{CLASSIFIER_CONFIG_NAME} of Hub repo {path!r}")

    @classmethod
    def _from_local(cls, path: str, allow_pickle: bool = True):
        """A local artifact directory; `allow_pickle=False` refuses a joblib-only one (see `artifact.io.read_local`)."""
        loaded = read_local(Path(path), allow_pickle=allow_pickle)
        return cls._checked(*loaded, repr(os.path.join(path, CLASSIFIER_CONFIG_NAME)))

    @classmethod
    def _checked(cls, config, estimator, gate_tensors, source: str):
        """`_from_artifact`, with a validation error naming the file it came from."""
        try:
            return cls._from_artifact(config, estimator, gate_tensors)
        except ValueError as err:
            raise ValueError(f"Invalid exit classifier in {source}: {err}") from err

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str = "Upload exit classifier",
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
    ):
        """Save the artifact to a temporary directory and upload it as one commit (the repo is created if needed).

        Args:
            repo_id (`str`): target repository, `"namespace/name"`.
            commit_message (`str`, *optional*, defaults to `"Upload exit classifier"`): the commit message.
            private (`bool`, *optional*): visibility of a newly created repository.
            token (`str` or `bool`, *optional*): Hub token.
            revision (`str`, *optional*): branch to commit to (created from `main` if missing).

        Returns:
            `huggingface_hub.CommitInfo`: the commit.
        """
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            return api.upload_folder(
                repo_id=repo_id, folder_path=tmp, commit_message=commit_message, revision=revision
            )
