"""A local, in-memory, Hub-compatible HTTP server for end-to-end push and download tests.

It implements exactly the endpoints the real ``huggingface_hub`` client calls
(read from its source, version 2.x, with ``HF_HUB_DISABLE_XET=1``):

push
    ``POST /api/repos/create``, ``POST /api/validate-yaml``,
    ``POST /api/models/{repo}/preupload/{rev}``, ``POST /{repo}.git/info/lfs/objects/batch``,
    ``PUT`` to the returned upload href (+ ``POST`` to the verify href),
    ``POST /api/models/{repo}/branch/{branch}``, ``POST /api/models/{repo}/commit/{rev}`` (NDJSON);
download
    ``GET /api/models/{repo}[/revision/{rev}]``, ``GET /api/models/{repo}/tree/{rev}``,
    ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` with ``ETag``, ``X-Repo-Commit``,
    ``Content-Length`` (and ``X-Linked-Etag``/``X-Linked-Size`` for LFS files);
other
    ``GET /api/whoami-v2``.

Anything else answers 404 and is recorded in :attr:`FakeHub.unhandled`, so a
test can assert the client called nothing we did not model. Every request is
recorded with the token it carried (:attr:`FakeHub.requests`).

Hang mode: a request whose path matches one of :attr:`FakeHub.hang_paths`
(regular expressions) is read and never answered (until the server stops),
which is what a hung Hub looks like to the client; :attr:`FakeHub.hung`
records those requests.

Commits are atomic as on the Hub: a commit either lands whole or not at all,
and an LFS pointer to an object that was never uploaded rejects the commit.

Example::

    with FakeHub(tokens={"hf_good": "alice"}) as hub:
        ...  # point huggingface_hub at hub.url
        hub.files("alice/my-merge")  # {path: bytes} at main
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".model", ".h5", ".msgpack")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: what the Hub reports as a regular file's oid/ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, bytes]
    lfs: set[str]  # paths stored through LFS


@dataclass
class Repo:
    repo_id: str
    owner: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    prs: list[str] = field(default_factory=list)  # refs/pr/N -> commit oid, by index

    def head(self, rev: str) -> Commit | None:
        if rev in self.branches:
            return self.commits[self.branches[rev]]
        m = re.fullmatch(r"refs/pr/(\d+)", rev)
        if m and 0 < int(m.group(1)) <= len(self.prs):
            return self.commits[self.prs[int(m.group(1)) - 1]]
        if rev in self.commits:
            return self.commits[rev]
        return None


class _Drop(Exception):
    """Raised inside a handler to close the connection without answering."""


class FakeHub:
    """The server and its state. Use as a context manager; ``url`` is its endpoint."""

    def __init__(self, tokens: dict[str, str] | None = None, *, echo_token_in_errors: bool = True):
        self.tokens = dict(tokens or {})  # token -> user name
        # The real Hub never echoes a token; this one does on purpose, so tests prove we scrub error text.
        self.echo_token_in_errors = echo_token_in_errors
        self.repos: dict[str, Repo] = {}
        self.lfs_store: dict[str, bytes] = {}  # sha256 -> content (uploaded objects)
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, token or None)
        self.unhandled: list[tuple[str, str]] = []
        self.validated_yaml: list[dict[str, Any]] = []  # front matter of every validate-yaml call
        self.drop_uploads: set[str] = set()  # LFS oids whose PUT is cut off midway (every attempt)
        self.dropped: list[str] = []
        self.hang_paths: list[str] = []  # regexes: matching requests get no answer (see the module docstring)
        self.hung: list[tuple[str, str]] = []
        self._release = threading.Event()
        self._lock = threading.Lock()
        self._counter = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()  # let hanging handlers finish
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- what tests read ---------------------------------------------------------------------
    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        """Files of ``repo_id`` at ``rev`` (branch, ``refs/pr/N`` or commit oid)."""
        commit = self.repos[repo_id].head(rev)
        assert commit is not None, f"no revision {rev} in {repo_id}"
        return dict(commit.files)

    def commits(self, repo_id: str) -> list[Commit]:
        """All commits of a repo in creation order (the first is the Hub's initial commit)."""
        return list(self.repos[repo_id].commits.values()) if repo_id in self.repos else []

    def front_matter(self, repo_id: str, rev: str = "main") -> dict[str, Any]:
        text = self.files(repo_id, rev)["README.md"].decode()
        return parse_front_matter(text)

    # -- state changes (called from handler threads) -----------------------------------------
    def _new_oid(self, seed: str) -> str:
        with self._lock:
            self._counter += 1
            return hashlib.sha1(f"{self._counter}:{seed}".encode()).hexdigest()

    def create_repo(self, repo_id: str, owner: str, private: bool) -> Repo:
        repo = Repo(repo_id, owner, private)
        # Like the Hub: a new repo starts with one commit holding .gitattributes.
        attrs = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()
        oid = self._new_oid(repo_id)
        repo.commits[oid] = Commit(oid, None, "initial commit", {".gitattributes": attrs}, set())
        repo.branches["main"] = oid
        self.repos[repo_id] = repo
        return repo


    def seed(self, repo_id: str, files: dict[str, bytes], *, private: bool = False) -> str:
        """Create ``repo_id`` (owner = its namespace) holding ``files`` at main; returns the commit oid."""
        repo = self.repos.get(repo_id) or self.create_repo(repo_id, repo_id.split("/")[0], private)
        parent = repo.head("main")
        lfs = {p for p in files if p.endswith(LFS_SUFFIXES)}
        oid = self._new_oid(repo_id + "seed")
        repo.commits[oid] = Commit(oid, parent.oid, "seed", {**parent.files, **files}, parent.lfs | lfs)
        repo.branches["main"] = oid
        for path in lfs:
            self.lfs_store[hashlib.sha256(files[path]).hexdigest()] = files[path]
        return oid


def parse_front_matter(text: str) -> dict[str, Any]:
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, flags=re.S)
    return (yaml.safe_load(m.group(1)) or {}) if m else {}


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    # -- plumbing ----------------------------------------------------------------------------
    def _token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        return auth[7:].strip() if auth.lower().startswith("bearer ") else None

    def _read_body(self, limit: int | None = None) -> bytes:
        """The request body (Content-Length or chunked), read once; ``limit`` reads that much then drops."""
        if getattr(self, "_body", None) is not None:
            return self._body
        self._body = self._read_raw(limit)
        return self._body

    def _read_raw(self, limit: int | None) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                out += self.rfile.read(size)
                self.rfile.readline()
                if limit is not None and len(out) >= limit:
                    raise _Drop()
            return bytes(out)
        n = int(self.headers.get("Content-Length") or 0)
        if limit is not None:
            self.rfile.read(min(n, limit))
            raise _Drop()
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes | dict | list = b"", headers: dict[str, str] | None = None,
              *, head: bool = False) -> None:
        self._read_body()  # an unread request body would corrupt the next request on this connection
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _error(self, status: int, message: str, code: str | None = None, *, head: bool = False) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers, head=head)

    def _auth(self, *, required: bool) -> str | None | bool:
        """The user for this request; answers 401 and returns False when the token is bad or missing."""
        token = self._token()
        if token is None:
            if required:
                self._error(401, "Invalid username or password.")
                return False
            return None
        user = self.hub.tokens.get(token)
        if user is None:
            msg = "Invalid credentials in Authorization header"
            if self.hub.echo_token_in_errors:
                # Deliberately hostile: the body and a header repeat the token, so callers must scrub it.
                self._send(401, {"error": f"{msg} (got Bearer {token})"},
                           {"X-Error-Message": msg, "X-Echo-Authorization": f"Bearer {token}"})
            else:
                self._error(401, msg)
            return False
        return user

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self._body = None
        self.hub.requests.append((method, path, self._token()))
        if any(re.search(p, path) for p in self.hub.hang_paths):
            self.hub.hung.append((method, path))
            self._read_body()
            self.hub._release.wait(120)  # a hung Hub: the client must give up on its own
            self.close_connection = True
            return
        try:
            for pattern, meth, handler in _ROUTES:
                if meth != method:
                    continue
                m = re.fullmatch(pattern, path)
                if m:
                    handler(self, query, *m.groups())
                    return
            self.hub.unhandled.append((method, path))
            self._error(404, f"fake hub: no route for {method} {path}")
        except _Drop:
            # Cut the connection without an answer: what a dropped upload looks like to the client.
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # -- helpers -----------------------------------------------------------------------------
    def _repo_for_read(self, repo_id: str, *, head: bool = False) -> Repo | None:
        user = self._auth(required=False)
        if user is False:
            return None
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and user != repo.owner):
            self._error(404, "Repository not found", "RepoNotFound", head=head)
            return None
        return repo

    def _repo_for_write(self, repo_id: str) -> Repo | None:
        user = self._auth(required=True)
        if user is False:
            return None
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and user != repo.owner):
            self._error(404, "Repository not found", "RepoNotFound")
            return None
        if user != repo.owner:
            self._error(403, f"You don't have the rights to write to {repo_id}")
            return None
        return repo

    # -- push endpoints ----------------------------------------------------------------------
    def create(self, query: dict) -> None:
        user = self._auth(required=True)
        if user is False:
            return
        body = json.loads(self._read_body() or b"{}")
        name, org = body.get("name"), body.get("organization") or user
        repo_id = f"{org}/{name}"
        if org != user:
            self._error(403, f"You don't have the rights to create a model under the namespace {org}")
            return
        if repo_id in self.hub.repos:
            self._send(409, {"error": "You already created this model repo", "url": f"{self.hub.url}/{repo_id}"},
                       {"X-Error-Message": "You already created this model repo"})
            return
        self.hub.create_repo(repo_id, user, body.get("visibility") == "private" or bool(body.get("private")))
        self._send(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def validate_yaml(self, query: dict) -> None:
        body = json.loads(self._read_body() or b"{}")
        meta = parse_front_matter(body.get("content", ""))
        self.hub.validated_yaml.append(meta)
        errors = []
        bases = meta.get("base_model")
        for b in [bases] if isinstance(bases, str) else (bases or []):
            if not (isinstance(b, str) and _HUB_ID.match(b)):
                errors.append({"message": f'"base_model" must be a Hub model id, got {b!r}'})
        if meta.get("base_model_relation") not in (None, "adapter", "merge", "quantized", "finetune"):
            errors.append({"message": '"base_model_relation" must be adapter, merge, quantized or finetune'})
        if errors:
            self._send(400, {"errors": errors, "warnings": []})
        else:
            self._send(200, {"errors": [], "warnings": []})

    def preupload(self, query: dict, repo_id: str, rev: str) -> None:
        repo = self._repo_for_write(repo_id)
        if repo is None:
            return
        body = json.loads(self._read_body() or b"{}")
        commit = repo.head(rev) if query.get("create_pr") != "1" else repo.head("main")
        files = []
        for f in body.get("files", []):
            sample = base64.b64decode(f["sample"])
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= 10 * 2**20 or b"\0" in sample
            oid = None
            if commit is not None and f["path"] in commit.files:
                data = commit.files[f["path"]]
                oid = hashlib.sha256(data).hexdigest() if f["path"] in commit.lfs else git_blob_sha1(data)
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": oid})
        self._send(200, {"files": files, "commitOid": commit.oid if commit else None})

    def lfs_batch(self, query: dict, repo_id: str) -> None:
        repo = self._repo_for_write(repo_id)
        if repo is None:
            return
        body = json.loads(self._read_body() or b"{}")
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj["oid"], obj["size"]
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.hub.lfs_store:
                # A pre-signed-style URL: the client PUTs without the Hub token, as it would to S3.
                entry["actions"] = {
                    "upload": {"href": f"{self.hub.url}/__lfs__/upload/{oid}", "header": {}},
                    "verify": {"href": f"{self.hub.url}/__lfs__/verify/{repo_id}", "header": {}},
                }
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                   {"Content-Type": "application/vnd.git-lfs+json"})

    def lfs_upload(self, query: dict, oid: str) -> None:
        if oid in self.hub.drop_uploads:
            self.hub.dropped.append(oid)
            self._read_body(limit=1)
        data = self._read_body()
        if hashlib.sha256(data).hexdigest() != oid:
            self._error(400, "uploaded content does not match its sha256")
            return
        self.hub.lfs_store[oid] = data
        self._send(200, b"", {"ETag": f'"{oid}"'})

    def lfs_verify(self, query: dict, repo_id: str) -> None:
        if self._repo_for_write(repo_id) is None:
            return
        body = json.loads(self._read_body() or b"{}")
        data = self.hub.lfs_store.get(body.get("oid"))
        if data is None or len(data) != body.get("size"):
            self._error(404, "object not uploaded")
            return
        self._send(200, {"success": True})

    def branch(self, query: dict, repo_id: str, name: str) -> None:
        repo = self._repo_for_write(repo_id)
        if repo is None:
            return
        body = json.loads(self._read_body() or b"{}")
        if name in repo.branches:
            self._error(409, f"Reference refs/heads/{name} already exists")
            return
        start = repo.head(body.get("startingPoint") or "main")
        repo.branches[name] = start.oid
        self._send(200, {"success": True})

    def commit(self, query: dict, repo_id: str, rev: str) -> None:
        repo = self._repo_for_write(repo_id)
        if repo is None:
            return
        raw = self._read_body()
        create_pr = query.get("create_pr") == "1"
        parent = repo.head(rev)
        pr = re.fullmatch(r"refs/pr/(\d+)", rev)
        if parent is None or (not create_pr and rev not in repo.branches and not pr):
            self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            return
        lines = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
        header = next((x["value"] for x in lines if x["key"] == "header"), {})
        files, lfs = dict(parent.files), set(parent.lfs)
        for item in lines:
            key, value = item["key"], item["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
                lfs.discard(value["path"])
            elif key == "lfsFile":
                data = self.hub.lfs_store.get(value["oid"])
                if data is None:
                    # The Hub refuses a commit that points at LFS objects it never received.
                    self._error(422, f"Your push was rejected because an LFS pointer pointed to a file that "
                                     f"does not exist: {value['path']}")
                    return
                files[value["path"]] = data
                lfs.add(value["path"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
                lfs.discard(value["path"])
            elif key != "header":
                self._error(400, f"unsupported commit operation {key}")
                return
        oid = self.hub._new_oid(repo_id + header.get("summary", ""))
        repo.commits[oid] = Commit(oid, parent.oid, header.get("summary", ""), files, lfs)
        out: dict[str, Any] = {"success": True, "commitOid": oid, "commitUrl": f"{self.hub.url}/{repo_id}/commit/{oid}"}
        if create_pr:
            repo.prs.append(oid)
            out["pullRequestUrl"] = f"{self.hub.url}/{repo_id}/discussions/{len(repo.prs)}"
        elif pr:
            repo.prs[int(pr.group(1)) - 1] = oid  # a commit pushed to an open pull request
        else:
            repo.branches[rev] = oid
        self._send(200, out)

    # -- download endpoints ------------------------------------------------------------------
    def model_info(self, query: dict, repo_id: str, rev: str | None = None) -> None:
        repo = self._repo_for_read(repo_id)
        if repo is None:
            return
        commit = repo.head(rev or "main")
        if commit is None:
            self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            return
        self._send(200, {
            "id": repo_id, "_id": repo_id, "author": repo.owner, "sha": commit.oid, "private": repo.private,
            "gated": False, "disabled": False, "tags": [],
            "siblings": [{"rfilename": p} for p in sorted(commit.files)],
        })

    def tree(self, query: dict, repo_id: str, rev: str, sub: str | None = None) -> None:
        repo = self._repo_for_read(repo_id)
        if repo is None:
            return
        commit = repo.head(rev)
        if commit is None:
            self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            return
        entries = []
        for p in sorted(commit.files):
            if sub and not p.startswith(sub.rstrip("/") + "/"):
                continue
            data = commit.files[p]
            entry: dict[str, Any] = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": p}
            if p in commit.lfs:
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        self._send(200, entries)

    def resolve(self, query: dict, repo_id: str, rev: str, path: str, *, head: bool = False) -> None:
        repo = self._repo_for_read(repo_id, head=head)
        if repo is None:
            return
        commit = repo.head(rev)
        if commit is None:
            self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound", head=head)
            return
        if path not in commit.files:
            self._error(404, "Entry not found", "EntryNotFound", head=head)
            return
        data = commit.files[path]
        headers = {"X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes"}
        if path in commit.lfs:
            sha = hashlib.sha256(data).hexdigest()
            headers.update({"ETag": f'"{sha}"', "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data))})
        else:
            headers["ETag"] = f'"{git_blob_sha1(data)}"'
        status = 200
        rng = self.headers.get("Range")
        if rng and not head:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if m:
                start = int(m.group(1))
                end = int(m.group(2)) if m.group(2) else len(data) - 1
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                data, status = data[start:end + 1], 206
        self._send(status, data, headers, head=head)

    def resolve_head(self, query: dict, repo_id: str, rev: str, path: str) -> None:
        self.resolve(query, repo_id, rev, path, head=True)

    def whoami(self, query: dict) -> None:
        user = self._auth(required=True)
        if user is False:
            return
        self._send(200, {"type": "user", "name": user, "fullname": user, "orgs": [],
                         "auth": {"type": "access_token", "accessToken": {"role": "write"}}})


_REPO = r"([\w.-]+/[\w.-]+)"
_ROUTES: list[tuple[str, str, Any]] = [
    (r"/api/repos/create", "POST", _Handler.create),
    (r"/api/validate-yaml", "POST", _Handler.validate_yaml),
    (rf"/api/models/{_REPO}/preupload/(.+)", "POST", _Handler.preupload),
    (rf"/{_REPO}\.git/info/lfs/objects/batch", "POST", _Handler.lfs_batch),
    (r"/__lfs__/upload/([0-9a-f]{64})", "PUT", _Handler.lfs_upload),
    (rf"/__lfs__/verify/{_REPO}", "POST", _Handler.lfs_verify),
    (rf"/api/models/{_REPO}/branch/(.+)", "POST", _Handler.branch),
    (rf"/api/models/{_REPO}/commit/(.+)", "POST", _Handler.commit),
    (rf"/api/models/{_REPO}/revision/(.+)", "GET", _Handler.model_info),
    (rf"/api/models/{_REPO}", "GET", _Handler.model_info),
    (rf"/api/models/{_REPO}/tree/([^/]+)(?:/(.*))?", "GET", _Handler.tree),
    (rf"/{_REPO}/resolve/([^/]+)/(.+)", "GET", _Handler.resolve),
    (rf"/{_REPO}/resolve/([^/]+)/(.+)", "HEAD", _Handler.resolve_head),
    (r"/api/whoami-v2", "GET", _Handler.whoami),
]
