"""A tiny local stand-in for the Hugging Face Hub REST API, for upload tests that never leave the machine.

It speaks just enough of the API for the real ``huggingface_hub`` client (2.x, httpx based) to run
``HfApi.create_repo`` and ``HfApi.create_commit`` against it, and records everything it was sent:

* ``POST /api/repos/create`` -- create a repo (409 if it exists, which ``exist_ok=True`` accepts);
* ``POST /api/validate-yaml`` -- ``create_commit`` validates a README.md's YAML front matter first;
* ``POST /api/{type}s/{org}/{name}/preupload/{revision}`` -- always answers ``"uploadMode": "regular"``,
  so every file travels base64-encoded inside the commit payload and no LFS / Xet transfer happens
  (with ``hf_xet`` installed the client would otherwise go straight to a Xet CAS server);
* ``POST /api/{type}s/{org}/{name}/commit/{revision}`` -- the NDJSON commit (header line + one line per file);
* ``GET /api/{type}s/{org}/{name}[/revision/{revision}]`` -- repo info, used by the client in some
  fall-back paths (an empty commit, a 401/403 on create);
* ``GET /api/whoami-v2`` -- who the token belongs to;
* ``GET /api/agent-harnesses`` -- an empty registry: the client fetches it (from ``constants.ENDPOINT``,
  whatever ``HfApi(endpoint=...)`` says) to build its user agent unless telemetry is disabled.

Anything else answers 404 and is listed in ``FakeHub.unknown``.

Use::

    with serve_fake_hub() as hub:
        HfApi(endpoint=hub.url, token="hf_x").create_repo("org/name")
    hub.repos_created, hub.commits, hub.requests
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = ["FakeHub", "serve_fake_hub"]

_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space", "kernels": "kernel"}
_REPO_API = re.compile(
    r"^/api/(?P<plural>models|datasets|spaces|kernels)/(?P<org>[^/]+)/(?P<name>[^/]+)"
    r"(?:/(?P<action>preupload|commit|revision)/(?P<revision>.+))?$"
)


@dataclass
class FakeHub:
    """What the fake Hub was sent (filled in by the server thread; read it once the client is done)."""

    url: str = ""
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path without query)
    headers: list[dict[str, str]] = field(default_factory=list)  # lower-cased headers, one per request
    repos_created: list[dict[str, Any]] = field(default_factory=list)
    preuploads: list[dict[str, Any]] = field(default_factory=list)
    commits: list[dict[str, Any]] = field(default_factory=list)
    unknown: list[tuple[str, str]] = field(default_factory=list)
    repos: dict[str, dict[str, Any]] = field(default_factory=dict)  # repo_id -> {type, private, files, sha}
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def files(self, repo_id: str) -> dict[str, bytes]:
        """The current files of ``repo_id`` (after all its commits)."""
        return dict(self.repos[repo_id]["files"])


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub  # set on a per-server subclass
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep the test output quiet
        pass

    # ------------------------------------------------------------------ plumbing
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _reply(self, status: int, payload: Any = None, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload if payload is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _not_found(self, message: str, code: str = "RepoNotFound") -> None:
        self._reply(404, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

    def _record(self) -> tuple[str, bytes]:
        path = unquote(urlsplit(self.path).path)
        body = self._body()
        with self.hub.lock:
            self.hub.requests.append((self.command, path))
            self.hub.headers.append({k.lower(): v for k, v in self.headers.items()})
        return path, body

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        self._dispatch()

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch()

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch()

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch()

    def _dispatch(self) -> None:
        path, body = self._record()
        try:
            if self.command == "POST" and path == "/api/repos/create":
                return self._create_repo(json.loads(body or b"{}"))
            if self.command == "POST" and path == "/api/validate-yaml":
                return self._reply(200, {"errors": [], "warnings": []})
            if self.command == "GET" and path == "/api/whoami-v2":
                return self._whoami()
            if self.command == "GET" and path == "/api/agent-harnesses":
                return self._reply(200, {"standardEnvVars": [], "harnesses": {}})
            match = _REPO_API.match(path)
            if match:
                repo_id = f"{match['org']}/{match['name']}"
                repo_type, action = _REPO_TYPES[match["plural"]], match["action"]
                if self.command == "POST" and action == "preupload":
                    return self._preupload(repo_id, repo_type, match["revision"], json.loads(body or b"{}"))
                if self.command == "POST" and action == "commit":
                    return self._commit(repo_id, repo_type, match["revision"], body)
                if self.command == "GET" and action in (None, "revision"):
                    return self._repo_info(repo_id, repo_type)
        except Exception as err:  # a bug in the fake or a malformed request: tell the client and the test
            with self.hub.lock:
                self.hub.unknown.append((self.command, f"{path} -> {type(err).__name__}: {err}"))
            return self._reply(500, {"error": f"fake hub: {type(err).__name__}: {err}"})
        with self.hub.lock:
            self.hub.unknown.append((self.command, path))
        self._not_found(f"fake hub does not implement {self.command} {path}", code="EntryNotFound")

    # ------------------------------------------------------------------ endpoints
    def _repo(self, repo_id: str, repo_type: str) -> dict[str, Any] | None:
        repo = self.hub.repos.get(repo_id)
        return repo if repo is not None and repo["type"] == repo_type else None

    def _create_repo(self, payload: dict[str, Any]) -> None:
        organization, name = payload.get("organization"), payload["name"]
        repo_id = f"{organization}/{name}" if organization else name
        repo_type = payload.get("type") or "model"
        visibility = payload.get("visibility")
        private = visibility == "private" if visibility is not None else bool(payload.get("private", False))
        url = (
            f"{self.hub.url}/{repo_id}" if repo_type == "model" else f"{self.hub.url}/{repo_type}s/{repo_id}"
        )
        with self.hub.lock:
            self.hub.repos_created.append(
                {
                    "repo_id": repo_id,
                    "name": name,
                    "organization": organization,
                    "type": repo_type,
                    "private": private,
                    "payload": payload,
                    "authorization": self.headers.get("Authorization"),
                }
            )
            if repo_id in self.hub.repos:
                return self._reply(409, {"error": "You already created this model repo", "url": url})
            self.hub.repos[repo_id] = {"type": repo_type, "private": private, "files": {}, "sha": "0" * 40}
        self._reply(200, {"url": url, "name": repo_id, "id": repo_id})

    def _whoami(self) -> None:
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return self._reply(401, {"error": "Invalid credentials in Authorization header"})
        self._reply(200, {"type": "user", "name": "someone", "orgs": [], "auth": {"type": "access_token"}})

    def _preupload(self, repo_id: str, repo_type: str, revision: str, payload: dict[str, Any]) -> None:
        if self._repo(repo_id, repo_type) is None:
            return self._not_found(f"Repository {repo_id} not found")
        with self.hub.lock:
            self.hub.preuploads.append({"repo_id": repo_id, "revision": revision, "files": payload["files"]})
        files = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
            for f in payload["files"]
        ]
        self._reply(200, {"files": files, "commitOid": self.hub.repos[repo_id]["sha"]})

    def _commit(self, repo_id: str, repo_type: str, revision: str, body: bytes) -> None:
        repo = self._repo(repo_id, repo_type)
        if repo is None:
            return self._not_found(f"Repository {repo_id} not found")
        header: dict[str, Any] = {}
        files: dict[str, bytes] = {}
        deleted: list[str] = []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise ValueError(f"unsupported file encoding {value.get('encoding')!r}")
                files[value["path"]] = base64.b64decode(value["content"], validate=True)
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:  # lfsFile: the preupload answer never asks for LFS, so its bytes were never sent
                raise ValueError(f"unsupported commit operation {key!r}")
        digest = hashlib.sha1(repo["sha"].encode() + body).hexdigest()
        with self.hub.lock:
            self.hub.commits.append(
                {
                    "repo_id": repo_id,
                    "repo_type": repo_type,
                    "revision": revision,
                    "message": header.get("summary"),
                    "description": header.get("description"),
                    "files": files,
                    "deleted": deleted,
                    "authorization": self.headers.get("Authorization"),
                    "oid": digest,
                }
            )
            for path in deleted:
                repo["files"].pop(path, None)
            repo["files"].update(files)
            repo["sha"] = digest
        prefix = self.hub.url if repo_type == "model" else f"{self.hub.url}/{repo_type}s"
        self._reply(
            200,
            {
                "success": True,
                "commitOid": digest,
                "commitUrl": f"{prefix}/{repo_id}/commit/{digest}",
                "pullRequestUrl": None,
            },
        )

    def _repo_info(self, repo_id: str, repo_type: str) -> None:
        repo = self._repo(repo_id, repo_type)
        if repo is None:
            return self._not_found(f"Repository {repo_id} not found")
        self._reply(
            200,
            {
                "id": repo_id,
                "modelId": repo_id,
                "sha": repo["sha"],
                "private": repo["private"],
                "siblings": [{"rfilename": p} for p in sorted(repo["files"])],
            },
        )


@contextlib.contextmanager
def serve_fake_hub() -> Iterator[FakeHub]:
    """Run a :class:`FakeHub` on ``127.0.0.1`` (a free port) in a background thread for the ``with`` block."""
    hub = FakeHub()
    handler = type("FakeHubHandler", (_Handler,), {"hub": hub})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    host, port = server.server_address[:2]
    hub.url = f"http://{host}:{port}"
    thread = threading.Thread(target=server.serve_forever, name="fake-hf-hub", daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
