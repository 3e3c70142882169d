"""The exit classifier saved beside a checkpoint (by the model's `save_pretrained`): found in a local directory or a
Hub repository, and loaded under the pickle rule.

A joblib-only artifact beside a checkpoint is not unpickled just because it is there: the user named a model, and a
local model directory may be a Hub download (see `artifact.io.read_local`); it loads only when named as the
classifier (`exit_classifier=DIR`) or with `trust_remote_classifier=True`.
"""

from __future__ import annotations

import os

from huggingface_hub import hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import (
    EntryNotFoundError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
)

from ..artifact.constants import CLASSIFIER_CONFIG_NAME
from ..artifact.io import has_artifact
from ..policy.classifier import ExitClassifier

__all__ = ["find_classifier_beside"]


def find_classifier_beside(name_or_path, trust_remote_classifier=False, **hub_kwargs):
    """The `ExitClassifier` saved beside a checkpoint (local dir or Hub repo), or None when there is none."""
    path = os.fspath(name_or_path)
    if os.path.isdir(path):
        if not has_artifact(path):  # a lone manifest is half of a removed artifact: read_local refuses it
            return None
        # The user named a model, not this pickle, and the directory may be a download: see read_local.
        return ExitClassifier._from_local(path, allow_pickle=trust_remote_classifier)
    revision = hub_kwargs.get("revision")
    cached = try_to_load_from_cache(path, CLASSIFIER_CONFIG_NAME, cache_dir=hub_kwargs.get("cache_dir"),
                                    revision=revision)
    if not isinstance(cached, str):
        # Not in the cache (or cached as absent): ask the Hub, unless we are offline.
        try:
            hf_hub_download(path, CLASSIFIER_CONFIG_NAME, **hub_kwargs)
        except (EntryNotFoundError, RemoteEntryNotFoundError, LocalEntryNotFoundError, OfflineModeIsEnabled):
            return None
    return ExitClassifier.from_pretrained(path, trust_remote_classifier=trust_remote_classifier, **hub_kwargs)
