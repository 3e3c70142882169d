"""Hub round trips through the real `huggingface_hub` client, never the real Hub.

1. Pull, offline: a Hub-layout cache (`models--org--name/{refs,snapshots,blobs}`) built by hand and read with
   `HF_HUB_OFFLINE=1`, with outbound connections disabled.
2. Push (and pull back): a minimal in-process Hub on 127.0.0.1 that implements the handful of endpoints that
   `create_repo`, `upload_folder` and `hf_hub_download` call.
"""

from __future__ import annotations

import hashlib
import json
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import constants as hub_constants
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from sklearn.tree import DecisionTreeClassifier

from adainfer_hf.artifact.constants import (
    CLASSIFIER_CONFIG_NAME,
    CLASSIFIER_MANIFEST_NAME,
    CLASSIFIER_SAFE_NAME,
    CLASSIFIER_WEIGHTS_NAME,
)
from adainfer_hf.policy.classifier import (
    ExitClassifier,
)

RNG = np.random.default_rng(0)
X = RNG.uniform(size=(200, 2))
Y = (X[:, 0] > 0.5).astype(int)
X_TEST = np.random.default_rng(1).uniform(size=(300, 2))


def _svc_classifier():
    return ExitClassifier(make_pipeline(StandardScaler(), SVC()).fit(X, Y), min_layer=2)


def _pickle_only_classifier():
    return ExitClassifier(DecisionTreeClassifier(max_depth=3, random_state=0).fit(X, Y))


def _artifact_files(clf, tmp_path, name) -> dict[str, bytes]:
    folder = tmp_path / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the pickle-only estimator warns that it has no safe encoding
        clf.save_pretrained(folder)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _assert_same_decisions(a, b):
    np.testing.assert_array_equal(a.score(X_TEST), b.score(X_TEST))
    np.testing.assert_array_equal(a.exit_mask(X_TEST), b.exit_mask(X_TEST))


# ---------------------------------------------------------------------- 1. offline pull from a hand-built cache
def _write_hub_cache(cache_dir: Path, repo_id: str, files: dict[str, bytes], commit: str) -> None:
    """Lay out `files` the way `hf_hub_download` stores them: blobs by hash, snapshot symlinks, a `main` ref."""
    repo_dir = cache_dir / f"models--{repo_id.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    for name, data in files.items():
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        pointer = repo_dir / "snapshots" / commit / name
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.symlink_to(Path("..", "..", "blobs", blob.name))


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 (the constant is read at import, so patch it too) and no outbound connections at all."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)

    def refuse(self, address):
        raise AssertionError(f"network access attempted: {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_offline_pull_of_safe_artifact(tmp_path, offline):
    clf = _svc_classifier()
    commit = "a" * 40
    _write_hub_cache(tmp_path / "cache", "org/exit-svc", _artifact_files(clf, tmp_path, "src"), commit)
    loaded = ExitClassifier.from_pretrained("org/exit-svc", cache_dir=tmp_path / "cache")
    assert loaded.min_layer == 2
    _assert_same_decisions(clf, loaded)
    pinned = ExitClassifier.from_pretrained("org/exit-svc", revision=commit, cache_dir=tmp_path / "cache")
    _assert_same_decisions(clf, pinned)


def test_offline_pull_of_pickle_only_artifact_needs_trust(tmp_path, offline):
    clf = _pickle_only_classifier()
    files = _artifact_files(clf, tmp_path, "src")
    assert CLASSIFIER_SAFE_NAME not in files
    _write_hub_cache(tmp_path / "cache", "org/exit-tree", files, "b" * 40)
    with pytest.raises(ValueError, match=r"'org/exit-tree'.*pickle.*trust_remote_classifier=True"):
        ExitClassifier.from_pretrained("org/exit-tree", cache_dir=tmp_path / "cache")
    loaded = ExitClassifier.from_pretrained(
        "org/exit-tree", cache_dir=tmp_path / "cache", trust_remote_classifier=True
    )
    _assert_same_decisions(clf, loaded)


@pytest.mark.parametrize("manifest", ["deleted", "resealed"])
def test_offline_pull_refuses_a_gate_file_the_config_does_not_name(tmp_path, offline, manifest):
    from adainfer_hf.artifact.constants import CLASSIFIER_GATE_NAME
    from adainfer_hf.artifact.manifest import manifest_text
    from adainfer_hf.policy.gate import LinearGate

    gate = LinearGate([1, 2], np.ones((2, 4)), np.zeros(2), np.zeros(2))
    files = _artifact_files(ExitClassifier(make_pipeline(StandardScaler(), SVC()).fit(X, Y), gate=gate), tmp_path,
                            "src")
    config = json.loads(files[CLASSIFIER_CONFIG_NAME])
    files[CLASSIFIER_CONFIG_NAME] = json.dumps({**config, "gate_fingerprint": None}).encode()
    del files[CLASSIFIER_MANIFEST_NAME]
    if manifest == "resealed":
        files[CLASSIFIER_MANIFEST_NAME] = manifest_text(files).encode()
    _write_hub_cache(tmp_path / "cache", "org/gated", files, "c" * 40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # without a manifest the load warns first
        with pytest.raises(ValueError, match=rf"{CLASSIFIER_CONFIG_NAME} of Hub repo 'org/gated' names no gate "
                                             rf"\(gate_fingerprint=null\), but {CLASSIFIER_GATE_NAME} of Hub repo"):
            ExitClassifier.from_pretrained("org/gated", cache_dir=tmp_path / "cache")


def test_offline_pull_of_missing_repo_names_the_config(tmp_path, offline):
    with pytest.raises(FileNotFoundError, match=rf"'org/absent'.*{CLASSIFIER_CONFIG_NAME}"):
        ExitClassifier.from_pretrained("org/absent", cache_dir=tmp_path / "cache")


# ---------------------------------------------------------------------- 2. push to (and pull from) a local Hub
def test_push_then_pull_through_the_client(tmp_path, local_hub):
    clf = _svc_classifier()
    info = clf.push_to_hub("org/pushed", commit_message="add exit classifier", token="hf_test")
    repo = local_hub.repos["org/pushed"]
    assert info.oid == repo["commit"]

    # The same bytes a local save_pretrained writes (the artifact is deterministic).
    expected = _artifact_files(clf, tmp_path, "local")
    assert repo["files"] == expected
    assert set(expected) == {CLASSIFIER_CONFIG_NAME, CLASSIFIER_SAFE_NAME, CLASSIFIER_WEIGHTS_NAME, CLASSIFIER_MANIFEST_NAME}

    # Pushing again to the existing repo works (create_repo(exist_ok=True) swallows the 409).
    clf.push_to_hub("org/pushed", token="hf_test")

    loaded = ExitClassifier.from_pretrained("org/pushed", cache_dir=tmp_path / "cache", token="hf_test")
    _assert_same_decisions(clf, loaded)
    assert not any(path.endswith(CLASSIFIER_WEIGHTS_NAME) for _, path in local_hub.log)  # never downloaded


def test_pull_of_pushed_pickle_only_artifact_needs_trust(tmp_path, local_hub):
    clf = _pickle_only_classifier()
    with pytest.warns(UserWarning, match="only the joblib pickle"):
        clf.push_to_hub("org/tree", token="hf_test")
    assert set(local_hub.repos["org/tree"]["files"]) == {
        CLASSIFIER_CONFIG_NAME, CLASSIFIER_WEIGHTS_NAME, CLASSIFIER_MANIFEST_NAME}
    with pytest.raises(ValueError, match="trust_remote_classifier=True"):
        ExitClassifier.from_pretrained("org/tree", cache_dir=tmp_path / "cache", token="hf_test")
    assert not any(
        path.endswith(CLASSIFIER_WEIGHTS_NAME) for _, path in local_hub.log
    )  # refused before download
    loaded = ExitClassifier.from_pretrained(
        "org/tree", cache_dir=tmp_path / "cache", token="hf_test", trust_remote_classifier=True
    )
    _assert_same_decisions(clf, loaded)


def test_missing_local_path_is_not_mistaken_for_a_repo(tmp_path, offline):
    with pytest.raises(FileNotFoundError, match="neither a local directory nor a valid Hub repo id"):
        ExitClassifier.from_pretrained(str(tmp_path / "no" / "such" / "dir"))
