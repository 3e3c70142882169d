"""A minimal Hub on 127.0.0.1: the endpoints `create_repo`, `upload_folder` and `hf_hub_download` call.

Use the `local_hub` fixture (import it into a test module); the real `huggingface_hub` client talks to it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from huggingface_hub import constants as hub_constants
from transformers.utils import hub as transformers_hub


class _FakeHub(BaseHTTPRequestHandler):
    """Just enough of the Hub HTTP API for create_repo, upload_folder (regular files), hf_hub_download and
    list_repo_tree."""

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
            # Like the Hub, a new repo has an initial commit (with no files the tests care about).
            self.repos[repo_id] = {"commit": hashlib.sha1(repo_id.encode()).hexdigest(), "files": {}}
            return self._reply(200, {"url": f"{self.endpoint}/{repo_id}", "name": repo_id})
        if path == "/api/validate-yaml":  # the model card's metadata check
            return self._reply(200, {"errors": [], "warnings": []})
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

    def _tree(self, repo_id: str, folder: str):
        """`list_repo_tree`: the files under `folder` (tokenizers list `additional_chat_templates/`)."""
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
        entries = [{"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                   for path, data in sorted(repo["files"].items()) if path.startswith(prefix)]
        if prefix and not entries:
            return self._reply(404, {"error": f"{folder} not found"}, {"X-Error-Code": "EntryNotFound"})
        return self._reply(200, entries)

    def _resolve(self):
        self.log.append((self.command, self.path))
        tree = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/[^/]+/?(.*)", self.path.split("?")[0])
        if tree is not None:
            return self._tree(tree.group(1), tree.group(2))
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
    # transformers keeps one HfApi (its endpoint read when built) for push_to_hub; one built against an earlier
    # fake Hub's port would miss this one, so each fake Hub starts without it (absent on some releases).
    monkeypatch.setattr(transformers_hub, "_hf_api", None, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    try:
        yield handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
