"""Tiny local stand-ins for the ModelScope and Hugging Face hubs, for the download tests.

Each `HubServer` is a threaded HTTP server on 127.0.0.1 (ephemeral port) that speaks just enough of
one hub's API for the *real* client library to list and download a repository:

* ModelScope (`kind="modelscope"`, point `MODELSCOPE_ENDPOINT` at `url`):
  `GET /api/v1/models/{id}` (repo info), `GET /api/v1/models/{id}/repo/files?Revision=` (listing
  with Size and Sha256), `GET|HEAD /api/v1/models/{id}/repo?Revision=&FilePath=` (file bytes).
* Hugging Face (`kind="huggingface"`, point `HF_ENDPOINT` at `url`, optionally under a path prefix
  like a mirror): `GET /api/models/{id}[/revision/{rev}]` (sha + siblings with size and LFS
  sha256), `GET /api/models/{id}/tree/{rev}` (the same files as huggingface_hub >= 1.0 lists them),
  `HEAD|GET /{id}/resolve/{rev}/{file}` with X-Repo-Commit, ETag, X-Linked-Etag,
  X-Linked-Size, Content-Length and Range support.

Faults are switched on by attributes, so a test can break a server, run a download, fix it and
re-run: `status` (answer every request with it), `corrupt` (file -> bytes served instead of the
listed ones), `delay`, `stall` (never answer), `cut` (files whose body stops half way and the connection closes). Every request is
recorded in `requests` as (method, path-with-query, headers).
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".pkl")


@dataclass
class HubRepo:
    files: dict[str, bytes]
    commit: str = ""

    def __post_init__(self) -> None:
        if not self.commit:
            digest = hashlib.sha1()
            for name in sorted(self.files):
                digest.update(name.encode() + hashlib.sha256(self.files[name]).digest())
            self.commit = digest.hexdigest()

    @classmethod
    def from_dir(cls, root: Path, drop: tuple[str, ...] = (), extra: dict[str, bytes] | None = None) -> "HubRepo":
        files = {p.name: p.read_bytes() for p in sorted(Path(root).iterdir()) if p.is_file() and p.name not in drop}
        files.update(extra or {})
        return cls(files)


@dataclass
class RequestLog:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class HubServer:
    kind: str  # "modelscope" | "huggingface"
    repos: dict[str, HubRepo]
    prefix: str = ""  # e.g. "/hf-mirror": serve under a path, as some mirrors do
    status: int | None = None
    corrupt: dict[str, bytes] = field(default_factory=dict)
    cut: set[str] = field(default_factory=set)
    delay: float = 0.0  # seconds to wait before each file body (widens race windows)
    stall: float = 0.0  # seconds to sit on every request before answering (a hung server)
    hide_sha: bool = False  # ModelScope listing without Sha256 (as for files it does not hash)
    requests: list[RequestLog] = field(default_factory=list)
    default_revision: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("modelscope", "huggingface"):
            raise ValueError(self.kind)
        self.default_revision = self.default_revision or ("master" if self.kind == "modelscope" else "main")
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "HubServer":
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}{self.prefix}"

    # --- inspection helpers ------------------------------------------------------------------
    def record(self, entry: RequestLog) -> None:
        with self._lock:
            self.requests.append(entry)

    def file_requests(self) -> list[str]:
        """Names of files whose bytes were requested (GET or HEAD on a file URL)."""
        names = []
        for r in list(self.requests):
            name = _file_of(self.kind, r.path, self.prefix)
            if name is not None:
                names.append(name)
        return names

    def resolve(self, repo_id: str, revision: str | None) -> HubRepo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return None
        if revision in (None, "", self.default_revision, repo.commit):
            return repo
        return None


def _file_of(kind: str, raw_path: str, prefix: str) -> str | None:
    parts = urlsplit(raw_path)
    if kind == "modelscope":
        if re.fullmatch(r"/api/v1/models/[^/]+/[^/]+/repo", parts.path):
            return parse_qs(parts.query).get("FilePath", [None])[0]
        return None
    path = unquote(parts.path)
    if prefix and path.startswith(prefix):
        path = path[len(prefix):]
    m = re.fullmatch(r"/[^/]+/[^/]+/resolve/[^/]+/(.+)", path)
    return m.group(1) if m else None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.0"  # one request per connection: a cut body is a closed socket
    timeout = 10  # never let a stuck client pin a server thread

    def log_message(self, format, *args) -> None:  # noqa: A002 - stdlib signature
        pass

    # --- plumbing ----------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def _dispatch(self, head: bool) -> None:
        self.hub.record(RequestLog(self.command, self.path, dict(self.headers.items())))
        if self.hub.stall:
            time.sleep(self.hub.stall)
            return
        if self.hub.status is not None:
            self._json(self.hub.status, {"Code": self.hub.status, "Message": f"injected HTTP {self.hub.status}", "Success": False}, head)
            return
        if self.hub.kind == "modelscope":
            self._modelscope(head)
        else:
            self._huggingface(head)

    def _repo_or_404(self, repo_id: str, revision: str | None, head: bool, not_found: dict[str, str]):
        """The repo at `revision`, or None after answering 404 the way the Hugging Face hub does."""
        if repo_id not in self.hub.repos:
            self._json(404, {"error": "Repository not found"}, head, not_found)
            return None
        repo = self.hub.resolve(repo_id, revision)
        if repo is None:
            self._json(404, {"error": "Revision not found"}, head, {"X-Error-Code": "RevisionNotFound"})
        return repo

    def _json(self, status: int, body: object, head: bool = False, headers: dict[str, str] | None = None) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(raw)

    def _bytes(self, name: str, data: bytes, head: bool, headers: dict[str, str]) -> None:
        """Serve `data` honouring `Range: bytes=N-`; a file in `hub.cut` stops half way."""
        start = 0
        rng = self.headers.get("Range")
        status = 200
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if m:
                start = int(m.group(1))
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if head:
            return
        if self.hub.delay:
            time.sleep(self.hub.delay)
        if name in self.hub.cut:
            self.wfile.write(body[: max(1, len(body) // 2)])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    # --- ModelScope --------------------------------------------------------------------------
    def _modelscope(self, head: bool) -> None:
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        m = re.fullmatch(r"/api/v1/models/([^/]+/[^/]+)(/repo/files|/repo)?", parts.path)
        if not m:
            self._json(404, {"Code": 10010205001, "Message": "not found", "Success": False}, head)
            return
        repo_id, tail = m.group(1), m.group(2)
        repo = self.hub.resolve(repo_id, query.get("Revision"))
        if repo is None:
            self._json(404, {"Code": 10010205001, "Message": f"model {repo_id} not found", "Success": False}, head)
            return
        if tail is None:
            self._json(200, {"Code": 200, "Data": {"Name": repo_id.split("/")[1], "Path": repo_id.split("/")[0]}, "Success": True}, head)
        elif tail == "/repo/files":
            files = [
                {"Name": name, "Path": name, "Type": "blob", "Size": len(data),
                 "Sha256": None if self.hub.hide_sha else _sha256(data),
                 "Revision": repo.commit, "IsLFS": name.endswith(LFS_SUFFIXES)}
                for name, data in sorted(repo.files.items())
            ]
            self._json(200, {"Code": 200, "Data": {"Files": files}, "Success": True}, head)
        else:
            name = query.get("FilePath", "")
            if name not in repo.files:
                self._json(404, {"Code": 10010205001, "Message": f"file {name} not found", "Success": False}, head)
                return
            self._bytes(name, self.hub.corrupt.get(name, repo.files[name]), head, {})

    # --- Hugging Face ------------------------------------------------------------------------
    def _huggingface(self, head: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        prefix = self.hub.prefix
        if prefix:
            if not path.startswith(prefix + "/"):
                self._json(404, {"error": "outside mirror prefix"}, head)
                return
            path = path[len(prefix):]
        not_found = {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        if m:
            repo = self._repo_or_404(m.group(1), m.group(2), head, not_found)
            if repo is None:
                return
            repo_id = m.group(1)
            siblings = []
            for name, data in sorted(repo.files.items()):
                entry = {"rfilename": name, "size": len(data), "blobId": hashlib.sha1(data).hexdigest()}
                if name.endswith(LFS_SUFFIXES):
                    entry["lfs"] = {"sha256": _sha256(data), "size": len(data), "pointerSize": 134}
                siblings.append(entry)
            self._json(200, {"id": repo_id, "modelId": repo_id, "sha": repo.commit, "private": False, "siblings": siblings}, head)
            return
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", path)
        if m:  # huggingface_hub >= 1.0's snapshot_download lists the files through the tree API
            repo = self._repo_or_404(m.group(1), unquote(m.group(2)), head, not_found)
            if repo is None:
                return
            tree = []
            for name, data in sorted(repo.files.items()):
                entry = {"type": "file", "oid": hashlib.sha1(data).hexdigest(), "size": len(data), "path": name}
                if name.endswith(LFS_SUFFIXES):
                    entry["lfs"] = {"oid": _sha256(data), "size": len(data), "pointerSize": 134}
                tree.append(entry)
            self._json(200, tree, head)
            return
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if not m:
            self._json(404, {"error": "not found"}, head, not_found)
            return
        repo_id, revision, name = m.groups()
        repo = self._repo_or_404(repo_id, revision, head, not_found)
        if repo is None:
            return
        if name not in repo.files:
            self._json(404, {"error": "Entry not found"}, head, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.commit})
            return
        listed = repo.files[name]
        headers = {"X-Repo-Commit": repo.commit}
        if name.endswith(LFS_SUFFIXES):
            headers["ETag"] = f'"{_sha256(listed)}"'
            headers["X-Linked-Etag"] = f'"{_sha256(listed)}"'
            headers["X-Linked-Size"] = str(len(listed))
        else:
            headers["ETag"] = f'"{hashlib.sha1(listed).hexdigest()}"'
        self._bytes(name, self.hub.corrupt.get(name, listed), head, headers)


# --- pytest fixtures shared by the download and pipeline tests ------------------------------------------

MODEL = "Qwen/Tiny-Reranker"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


class ForbiddenHost(BaseException):
    """Not an OSError on purpose: the clients retry network errors, this must end the test at once."""


@pytest.fixture(autouse=True)
def local_network_only(monkeypatch):
    """Any attempt to reach a non-local host fails immediately."""
    real = socket.getaddrinfo

    def guarded(host, *args, **kwargs):
        if host not in LOCAL_HOSTS:
            raise ForbiddenHost(f"test tried to reach {host!r}; only 127.0.0.1 is allowed")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", guarded)


@pytest.fixture(scope="module")
def source_model(tiny_models) -> Path:
    return tiny_models["tied_bf16_sharded"]


@pytest.fixture(scope="module")
def repo(source_model) -> HubRepo:
    # A README and a pickle copy are on the hub too: the first is fetched, the second never is.
    return HubRepo.from_dir(source_model, extra={"README.md": b"# Tiny reranker\n", "pytorch_model.bin": b"\x80\x04pickle"})


class Hubs:
    def __init__(self, ms: HubServer, hf: HubServer, tmp: Path, monkeypatch):
        self.ms, self.hf, self.tmp, self.monkeypatch = ms, hf, tmp, monkeypatch

    def point_hf_at(self, url: str) -> None:
        # Only the environment: huggingface_hub swaps its import-time ENDPOINT prefix for the
        # `endpoint=` argument qconv passes, so patching the constant would break that swap.
        self.monkeypatch.setenv("HF_ENDPOINT", url)

    def point_ms_at(self, url: str) -> None:
        self.monkeypatch.setenv("MODELSCOPE_ENDPOINT", url)


@pytest.fixture
def hubs(repo, tmp_path, monkeypatch):
    """A ModelScope and a Hugging Face server holding MODEL, fresh caches, clients pointed at them."""
    import huggingface_hub.constants
    import modelscope_hub._download
    import modelscope_hub._legacy_api
    from huggingface_hub import utils as hf_utils

    # huggingface_hub < 1.0 caches requests sessions per thread (reset_sessions); 1.x and 2.x hold one
    # httpx client (close_session), recreated on next use.
    reset_sessions = getattr(hf_utils, "reset_sessions", None) or hf_utils.close_session

    ms = HubServer("modelscope", {MODEL: repo}).start()
    hf = HubServer("huggingface", {MODEL: repo}).start()
    hubs = Hubs(ms, hf, tmp_path, monkeypatch)
    hubs.point_ms_at(ms.url)
    hubs.point_hf_at(hf.url)
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    for name in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "QCONV_SOURCE", "MODELSCOPE_DOMAIN"):
        monkeypatch.delenv(name, raising=False)
    # conftest turns huggingface_hub offline for the whole session, and the library reads that at
    # import: switch it on here only, with fresh HTTP sessions (an offline one is cached per thread).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    reset_sessions()
    # The clients' retry back-off is right for real networks and far too slow for a test suite.
    monkeypatch.setattr(modelscope_hub._legacy_api, "REPO_TREE_PAGE_MAX_ATTEMPTS", 1)
    monkeypatch.setattr(modelscope_hub._download, "DOWNLOAD_RETRY_TIMES", 1)
    monkeypatch.setattr(modelscope_hub._download, "DOWNLOAD_INTEGRITY_RETRY_BACKOFF", 0.01)
    monkeypatch.setenv("MODELSCOPE_INTRA_CLOUD_ACCELERATION", "false")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "5")
    yield hubs
    ms.stop()
    hf.stop()
    monkeypatch.undo()
    reset_sessions()
