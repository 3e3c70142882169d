"""`save_pretrained` / `from_pretrained` / `push_to_hub` for an object made of a config and a fitted estimator.

[`ArtifactMixin`] is what `ExitClassifier` inherits for its life on disk and on the Hub (as PEFT's `PushToHubMixin`):
the class supplies `config` (an [`~adainfer_hf.artifact.io.ExitClassifierConfig`]), `estimator`, and
`_from_artifact(config, estimator)`; the files themselves are read and written by `artifact.io`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from huggingface_hub import HfApi

from .io import read_hub, read_local, write_artifact

__all__ = ["ArtifactMixin"]


class ArtifactMixin:
    """Local and Hub persistence of a config-plus-estimator artifact (see the module docstring)."""

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Save the config, the joblib estimator and (when possible) its pickle-free safetensors encoding.

        The write is atomic per artifact: files are written to a temporary directory beside `save_directory`
        and moved into place only once complete, so an interrupted save leaves any previous artifact intact.

        Args:
            save_directory (`str` or `os.PathLike`): target directory (created if missing).
        """
        write_artifact(self.estimator, self.config, save_directory)

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

        A local directory is loaded from its safetensors file when present, else from its joblib file. A Hub
        repository is loaded from its safetensors file; a repository with only a joblib file (a pickle, which runs
        code when loaded) is refused unless `trust_remote_classifier=True`. With `HF_HUB_OFFLINE=1` the Hub files
        are read from the local cache.

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
            return cls._from_artifact(*read_local(Path(path)))
        if os.path.exists(path):
            raise ValueError(
                f"{path!r} is a file; expected a directory written by save_pretrained or a repo id."
            )
        return cls._from_artifact(*read_hub(
            path, revision, trust_remote_classifier, cache_dir, token, bool(local_files_only)))

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
