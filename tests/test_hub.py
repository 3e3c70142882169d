"""Hub round trips through the real `huggingface_hub` client, never the real Hub.

1. Pull, offline: a Hub-layout cache (`models--org--name/{refs,snapshots,blobs}`) built by hand and read with
   `HF_HUB_OFFLINE=1`, with outbound connections disabled.
2. Push (and pull back): a minimal in-process Hub on 127.0.0.1 that implements the handful of endpoints that
   `create_repo`, `upload_folder` and `hf_hub_download` call.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import constants as hub_constants
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from sklearn.tree import DecisionTreeClassifier

from adainfer_hf.classifier import (
    CLASSIFIER_CONFIG_NAME,
    CLASSIFIER_SAFE_NAME,
    CLASSIFIER_WEIGHTS_NAME,
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


def test_offline_pull_of_missing_repo_names_the_config(tmp_path, offline):
    with pytest.raises(FileNotFoundError, match=rf"'org/absent'.*{CLASSIFIER_CONFIG_NAME}"):
        ExitClassifier.from_pretrained("org/absent", cache_dir=tmp_path / "cache")


# ---------------------------------------------------------------------- 2. push to (and pull from) a local Hub
class _FakeHub(BaseHTTPRequestHandler):
    """Just enough of the Hub HTTP API for create_repo, upload_folder (regular files) and hf_hub_download."""

    protocol_version = "HTTP/1.1"
    repos: dict  # repo_id -> {"commit": sha or None, "files": {path: bytes}}; set per server
    log: list

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _reply(self, status, payload=None, headers=None, body=None):
        data = body if body is not None else (json.dumps(payload).encode() if payload is not None else b"")
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if payload is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            for _ in range(100_000):  # bounded: a chunked body of a test artifact is a few chunks
                size = int(self.rfile.readline().strip(), 16)
                chunk = self.rfile.read(size + 2)[:size]
                if size == 0:
                    break
                chunks.append(chunk)
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def do_POST(self):
        self.log.append(("POST", self.path))
        body = self._body()
        path = self.path.split("?")[0]
        if path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}"
            if repo_id in self.repos:
                # Like the Hub, a 409 still carries the URL (create_repo(exist_ok=True) reads it).
                return self._reply(
                    409, {"error": "You already created this repo", "url": f"{self.endpoint}/{repo_id}"}
                )
            self.repos[repo_id] = {"commit": None, "files": {}}
            return self._reply(200, {"url": f"{self.endpoint}/{repo_id}", "name": repo_id})
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/main", path)
        if match is None or match.group(1) not in self.repos:
            return self._reply(404, {"error": f"not found: {path}"}, {"X-Error-Code": "RepoNotFound"})
        repo = self.repos[match.group(1)]
        if match.group(2) == "preupload":
            files = json.loads(body)["files"]
            modes = [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                for f in files
            ]
            return self._reply(200, {"files": modes})
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        assert lines[0]["key"] == "header"
        for line in lines[1:]:
            assert line["key"] == "file", f"unsupported commit operation {line['key']}"
            repo["files"][line["value"]["path"]] = base64.b64decode(line["value"]["content"])
        repo["commit"] = hashlib.sha1(json.dumps(lines).encode()).hexdigest()
        commit_url = f"{self.endpoint}/{match.group(1)}/commit/{repo['commit']}"
        return self._reply(
            200, {"commitUrl": commit_url, "commitOid": repo["commit"], "pullRequestUrl": None}
        )

    def do_HEAD(self):
        self._resolve()

    def do_GET(self):
        self._resolve()

    def _resolve(self):
        self.log.append((self.command, self.path))
        match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self.path.split("?")[0])
        repo = self.repos.get(match.group(1)) if match else None
        if repo is None or repo["commit"] is None:
            return self._reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        data = repo["files"].get(match.group(3))
        headers = {"X-Repo-Commit": repo["commit"]}
        if data is None:
            return self._reply(
                404, {"error": "Entry not found"}, {**headers, "X-Error-Code": "EntryNotFound"}
            )
        headers["ETag"] = f'"{hashlib.sha1(data).hexdigest()}"'
        return self._reply(200, headers=headers, body=data)


@pytest.fixture
def local_hub(monkeypatch):
    """A fake Hub on an ephemeral loopback port; the client's endpoint constants point at it."""
    handler = type("Handler", (_FakeHub,), {"repos": {}, "log": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    handler.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setattr(hub_constants, "ENDPOINT", handler.endpoint)
    monkeypatch.setattr(
        hub_constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        handler.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
    )
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    try:
        yield handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_push_then_pull_through_the_client(tmp_path, local_hub):
    clf = _svc_classifier()
    info = clf.push_to_hub("org/pushed", commit_message="add exit classifier", token="hf_test")
    repo = local_hub.repos["org/pushed"]
    assert info.oid == repo["commit"]

    # The same bytes a local save_pretrained writes (the artifact is deterministic).
    expected = _artifact_files(clf, tmp_path, "local")
    assert repo["files"] == expected
    assert set(expected) == {CLASSIFIER_CONFIG_NAME, CLASSIFIER_SAFE_NAME, CLASSIFIER_WEIGHTS_NAME}

    # Pushing again to the existing repo works (create_repo(exist_ok=True) swallows the 409).
    clf.push_to_hub("org/pushed", token="hf_test")

    loaded = ExitClassifier.from_pretrained("org/pushed", cache_dir=tmp_path / "cache", token="hf_test")
    _assert_same_decisions(clf, loaded)
    assert not any(path.endswith(CLASSIFIER_WEIGHTS_NAME) for _, path in local_hub.log)  # never downloaded


def test_pull_of_pushed_pickle_only_artifact_needs_trust(tmp_path, local_hub):
    clf = _pickle_only_classifier()
    with pytest.warns(UserWarning, match="only the joblib pickle"):
        clf.push_to_hub("org/tree", token="hf_test")
    assert set(local_hub.repos["org/tree"]["files"]) == {CLASSIFIER_CONFIG_NAME, CLASSIFIER_WEIGHTS_NAME}
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
