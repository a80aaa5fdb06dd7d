"""A stand-in for the Hugging Face Hub on loopback, serving one local model directory.

Point `HF_ENDPOINT` at `hub.url` and `huggingface_hub` / `transformers` download from it exactly as
they would from huggingface.co: the same routes, headers and error codes, so the download-then-cache
path every online user takes can be tested offline.

    with HubStandIn(model_dir) as hub:
        env["HF_ENDPOINT"] = hub.url
        ...
        assert hub.count("GET", "model.safetensors") == 1
        print(hub.log())            # every request, with the status it got

Routes (what huggingface_hub 2.x and transformers 5.x ask for when a model loads):
- HEAD/GET /                                      the root (`requests.head(ENDPOINT)` reachability checks)
- HEAD/GET /{repo}/resolve/{revision}/{filename}  file metadata and content; 404 EntryNotFound when absent
- GET /api/models/{repo}[/revision/{revision}]    model info: id, sha, siblings
- GET /api/models/{repo}/tree/{revision}[/{path}] file listing; 404 EntryNotFound for a missing folder
- GET /api/agent-harnesses                        huggingface_hub's telemetry registry (answered empty)
Anything else is answered 404 and recorded in `hub.unknown`, so a test can show what was asked.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

REPO_IDS = ("gpt2", "openai-community/gpt2")
LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub stores files above 10 MB in LFS (its ETag is then the sha256)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    status: int

    def __str__(self) -> str:
        return f"{self.method} {self.path} -> {self.status}"


@dataclass(frozen=True)
class HubFile:
    name: str  # path inside the repository, "/"-separated
    data: bytes
    etag: str  # without quotes: git blob sha1 for small files, sha256 for LFS ones
    lfs_sha256: str | None


def _hub_file(name: str, data: bytes) -> HubFile:
    if len(data) >= LFS_THRESHOLD:
        sha256 = hashlib.sha256(data).hexdigest()
        return HubFile(name, data, sha256, sha256)
    blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # what git (and the Hub) calls the file
    return HubFile(name, data, blob, None)


class HubStandIn:
    """A threaded HTTP server answering as the Hugging Face Hub for `repo_ids`, all serving `model_dir`."""

    def __init__(self, model_dir: str | Path, repo_ids: tuple[str, ...] = REPO_IDS):
        root = Path(model_dir)
        self.files = {
            p.relative_to(root).as_posix(): _hub_file(p.relative_to(root).as_posix(), p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()
        }
        self.repo_ids = tuple(repo_ids)
        tree = "".join(f"{f.name}\0{f.etag}\n" for f in self.files.values())
        self.commit = hashlib.sha1(tree.encode()).hexdigest()  # 40 hex digits, like a git commit id
        self.requests: list[Request] = []
        self.unknown: list[Request] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> "HubStandIn":
        hub = self

        class Handler(_HubHandler):
            standin = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        host, port = self._server.server_address[:2]
        self.url = f"http://{host}:{port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop answering and close the port: afterwards any connection to `url` is refused."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = None

    def __enter__(self) -> "HubStandIn":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- what was asked ----------------------------------------------------------------

    def record(self, method: str, path: str, status: int, known: bool = True) -> None:
        with self._lock:
            self.requests.append(Request(method, path, status))
            if not known:
                self.unknown.append(Request(method, path, status))

    def count(self, method: str, filename: str | None = None, status: int | None = None) -> int:
        """How many `method` requests for `filename` (any repo, any revision) were answered `status`."""
        with self._lock:
            seen = list(self.requests)
        return sum(
            1 for r in seen
            if r.method == method
            and (filename is None or ("/resolve/" in r.path and r.path.split("?")[0].endswith("/" + filename)))
            and (status is None or r.status == status)
        )

    def log(self) -> str:
        with self._lock:
            lines = [str(r) for r in self.requests]
            unknown = [str(r) for r in self.unknown]
        text = "\n".join(lines) or "(no requests)"
        if unknown:
            text += "\nunknown routes:\n" + "\n".join(unknown)
        return text

    # --- answers -----------------------------------------------------------------------

    def model_info(self, repo_id: str) -> dict:
        return {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0] if "/" in repo_id else None,
            "sha": self.commit,
            "lastModified": "2024-02-19T10:57:45.000Z",
            "private": False,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "library_name": "transformers",
            "pipeline_tag": "text-generation",
            "tags": ["transformers", "safetensors", "gpt2", "text-generation"],
            "config": {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"},
            "siblings": [{"rfilename": name} for name in self.files],
        }

    def tree(self, folder: str, recursive: bool) -> list[dict] | None:
        """The entries under `folder` ("" for the root), as the Hub's tree API lists them; None if absent."""
        prefix = f"{folder}/" if folder else ""
        inside = [f for f in self.files.values() if f.name.startswith(prefix)]
        if folder and not inside:
            return None
        entries, folders = [], set()
        for f in inside:
            rest = f.name[len(prefix):].split("/")
            for depth in range(1, len(rest) if recursive else min(len(rest), 2)):
                folders.add(prefix + "/".join(rest[:depth]))
            if recursive or len(rest) == 1:
                entries.append(_tree_file(f))
        entries += [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d} for d in sorted(folders)]
        return entries


def _tree_file(f: HubFile) -> dict:
    entry = {"type": "file", "oid": hashlib.sha1(b"blob %d\0" % len(f.data) + f.data).hexdigest(), "size": len(f.data), "path": f.name}
    if f.lfs_sha256:
        entry["lfs"] = {"oid": f.lfs_sha256, "size": len(f.data), "pointerSize": 134}
    return entry


class _HubHandler(BaseHTTPRequestHandler):
    standin: HubStandIn
    protocol_version = "HTTP/1.1"
    server_version = "HubStandIn/1"

    def log_message(self, format, *args) -> None:  # the stand-in keeps its own log
        pass

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def do_GET(self) -> None:
        self._answer(head=False)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self._not_found(known=False)

    # --- routing -----------------------------------------------------------------------

    def _answer(self, head: bool) -> None:
        path = urlsplit(self.path).path
        parts = [unquote(p) for p in path.strip("/").split("/")] if path.strip("/") else []
        if not parts:
            return self._send(200, b"Hugging Face Hub stand-in\n", {"Content-Type": "text/plain"}, head)
        if parts == ["api", "agent-harnesses"]:  # huggingface_hub's user-agent telemetry: an empty registry
            return self._json({"standardEnvVars": [], "harnesses": {}}, head)
        if parts[0] == "api" and len(parts) >= 3 and parts[1] == "models":
            return self._api_models(parts[2:], head)
        if "resolve" in parts[1:3]:
            at = parts.index("resolve")
            repo_id, rest = "/".join(parts[:at]), parts[at + 1:]
            if len(rest) < 2:
                return self._not_found(known=False)
            return self._resolve(repo_id, rest[0], "/".join(rest[1:]), head)
        return self._not_found(known=False)

    def _repo(self, parts: list[str]) -> tuple[str | None, list[str]]:
        """Split `parts` into a served repo id and what follows it (None when the repo is not served)."""
        for size in (2, 1):
            repo_id = "/".join(parts[:size])
            if len(parts) >= size and repo_id in self.standin.repo_ids:
                return repo_id, parts[size:]
        return None, parts

    def _revision_ok(self, revision: str) -> bool:
        return revision in ("main", self.standin.commit)

    def _api_models(self, parts: list[str], head: bool) -> None:
        hub = self.standin
        repo_id, rest = self._repo(parts)
        if repo_id is None:
            return self._error(404, "RepoNotFound", "Repository not found", head)
        if not rest:
            return self._json(hub.model_info(repo_id), head)
        if rest[0] == "revision" and len(rest) == 2:
            if not self._revision_ok(rest[1]):
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rest[1]}", head)
            return self._json(hub.model_info(repo_id), head)
        if rest[0] == "tree" and len(rest) >= 2:
            if not self._revision_ok(rest[1]):
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rest[1]}", head)
            folder = "/".join(rest[2:]).strip("/")
            recursive = "recursive=true" in urlsplit(self.path).query.lower()
            entries = hub.tree(folder, recursive)
            if entries is None:
                return self._error(404, "EntryNotFound", f"{folder} does not exist on \"{rest[1]}\"", head,
                                   {"X-Repo-Commit": hub.commit})
            return self._json(entries, head)
        return self._not_found(known=False, head=head)

    def _resolve(self, repo_id: str, revision: str, filename: str, head: bool) -> None:
        hub = self.standin
        if repo_id not in hub.repo_ids:
            return self._error(404, "RepoNotFound", "Repository not found", head)
        if not self._revision_ok(revision):
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
        f = hub.files.get(filename)
        if f is None:
            return self._error(404, "EntryNotFound", f"{filename} does not exist on \"{revision}\"", head,
                               {"X-Repo-Commit": hub.commit})
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Repo-Commit": hub.commit,
            "ETag": f'"{f.etag}"',
            "Accept-Ranges": "bytes",
        }
        if f.lfs_sha256:  # what the Hub adds for LFS files (it would redirect to its CDN; serving them here is equivalent)
            headers["X-Linked-Etag"] = f'"{f.etag}"'
            headers["X-Linked-Size"] = str(len(f.data))
        data, status = f.data, 200
        start = self._range_start(len(f.data))
        if start is not None and not head:
            data, status = f.data[start:], 206
            headers["Content-Range"] = f"bytes {start}-{len(f.data) - 1}/{len(f.data)}"
        self._send(status, data, headers, head)

    def _range_start(self, size: int) -> int | None:
        """The first byte of a `Range: bytes=N-` request, if one was made (the only form resumes use)."""
        value = self.headers.get("Range", "")
        if not value.startswith("bytes="):
            return None
        first = value[len("bytes="):].split("-")[0]
        return min(int(first), size) if first.isdigit() else None

    # --- writing -----------------------------------------------------------------------

    def _json(self, payload, head: bool) -> None:
        self._send(200, json.dumps(payload).encode(), {"Content-Type": "application/json"}, head)

    def _error(self, status: int, code: str, message: str, head: bool, extra: dict | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        headers = {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message} | (extra or {})
        self._send(status, body, headers, head)

    def _not_found(self, known: bool = True, head: bool = False) -> None:
        body = json.dumps({"error": "Not found (Hub stand-in: unknown route)"}).encode()
        self._send(404, body, {"Content-Type": "application/json"}, head, known=known)

    def _send(self, status: int, body: bytes, headers: dict, head: bool, known: bool = True) -> None:
        self.standin.record(self.command, self.path, status, known=known)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)
