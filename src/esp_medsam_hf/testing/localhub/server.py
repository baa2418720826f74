"""The local Hub's front server: the Hub's write API on loopback, read routes proxied to olah.

Why we write it: no package on PyPI, Debian or npm serves the Hub's write API (create repo, branch, preupload,
LFS batch, commit), and olah, the only packaged Hub-API server that runs here, is read-only. So this
small ``http.server`` answers the calls huggingface_hub 2.4 makes to publish (with ``HF_HUB_DISABLE_XET=1``) and
commits into the git repositories that olah serves. Read requests are checked against git first (so that a missing
repository, revision or file gets the Hub's error code, which olah 0.5.4 reports as 401 RepoNotFound in all three
cases, and a private repository is read only with the token) and then proxied to olah unchanged. The metadata routes
olah leaves empty or broken (repo info, commits, listings, whoami, tags, discussions) are answered from git
(``repoinfo.py``). Only loopback addresses are accepted.

olah has no notion of private repositories: it serves every repository under its mirrors path to whoever reaches
it. So it listens on a Unix socket in a folder only this user can enter (``--olah-socket``; launcher.py starts it
so), never on a TCP port, and this server is the only way in: every read it forwards has passed the checks above,
and a path that no route here parses (an encoded ``esp%2Fprivate``, olah's own ``/repos`` pages) is answered 404,
never forwarded. Serving private reads from git here instead would duplicate olah's resolve, range and LFS
handling, and olah's port would still serve them.
Every request first passes ``guard.check_request`` (Host/Origin, the write token, Content-Type, and every name
before git sees it), and a request body that stalls longer than ``body_timeout_s`` is answered 408 and its
connection closed.

``LocalHub`` (launcher.py) launches it; by hand:
``python -m esp_medsam_hf.testing.localhub.server --root DIR --port P --olah-socket PATH --token-file FILE``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import http.client
import json
import logging
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

from . import repoinfo
from .gitrepo import (
    LFS_MIN_SIZE,
    LFS_SUFFIXES,
    CommitConflict,
    FileAdd,
    GitError,
    GitRepo,
    PathConflict,
    PathDelete,
    check_repo_path,
)
from .admin import RepoAdminMixin, admin_routes
from .guard import (
    UNAUTHORIZED,
    GuardError,
    check_repo_access,
    check_repo_name,
    check_request,
    has_token,
    upload_signature,
)

logger = logging.getLogger(__name__)

REPO_TYPES = {"model": "models", "dataset": "datasets", "space": "spaces"}
LOCAL_USER = "local"
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_T = r"(?P<type>models|datasets|spaces)"
_REPO = rf"(?P<ns>{_NAME})/(?P<name>{_NAME})"
_PREFIX = r"(?:(?P<type>datasets|spaces)/)?"
ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    (m, re.compile(p), h)
    for m, p, h in [
        ("POST", r"/api/repos/create", "create_repo"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("GET", r"/api/agent-harnesses", "not_found"),
        ("POST", rf"/api/{_T}/{_REPO}/branch/(?P<rev>[^/]+)", "create_branch"),
        ("DELETE", rf"/api/{_T}/{_REPO}/branch/(?P<rev>[^/]+)", "delete_branch"),
        ("POST", rf"/api/{_T}/{_REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
        ("POST", rf"/api/{_T}/{_REPO}/commit/(?P<rev>[^/]+)", "commit"),
        ("POST", rf"/{_PREFIX}{_REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
        ("PUT", rf"/_lfs/{_T}/{_REPO}/(?P<oid>[0-9a-f]{{64}})/(?P<size>[0-9]+)", "lfs_put"),
        ("GET", r"/_local/health", "health"),
        ("POST", r"/_local/faults", "set_faults"),
        # read side answered from git (olah leaves these empty or broken; see repoinfo.py)
        ("GET", r"/api/whoami-v2", "whoami"),
        ("GET", rf"/api/{_T}", "list_repos"),
        ("GET", rf"/api/{_T}/{_REPO}/revision/(?P<rev>[^/]+)", "repo_info"),
        ("GET", rf"/api/{_T}/{_REPO}/commits/(?P<rev>[^/]+)", "repo_commits"),
        ("POST", rf"/api/{_T}/{_REPO}/tag/(?P<rev>[^/]+)", "create_tag"),
        ("GET", rf"/api/{_T}/{_REPO}/discussions(?:/.*)?", "discussions"),
        ("POST", rf"/api/{_T}/{_REPO}/discussions(?:/.*)?", "discussions"),
        # read side: validated here, then proxied to olah
        ("GET", rf"/api/{_T}/{_REPO}", "read_repo_info"),
        ("GET", rf"/api/{_T}/{_REPO}/refs", "read_repo"),
        ("GET", rf"/api/{_T}/{_REPO}/tree/(?P<rev>[^/]+)/(?P<path>.+)", "read_tree_path"),
        ("GET", rf"/api/{_T}/{_REPO}/(?:revision|tree|commits)/(?P<rev>[^/]+)(?:/.*)?", "read_revision"),
        ("POST", rf"/api/{_T}/{_REPO}/paths-info/(?P<rev>[^/]+)", "read_revision"),
        ("GET", rf"/{_PREFIX}{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "read_file"),
    ]
] + admin_routes({"T": _T, "REPO": _REPO})


DRAIN_LIMIT = 1 << 20
"""Largest refused request body the server reads and drops to keep the connection (bytes); larger: it closes."""


MAX_BODY_BYTES = 16 * 2**20
"""Largest request body the server reads (JSON calls, proxied reads such as paths-info); more is answered 413
before anything is read. Commits (regular files inline, base64) may carry ``MAX_COMMIT_BYTES``; LFS uploads are
bounded by their declared size."""
MAX_COMMIT_BYTES = 512 * 2**20


def _strict_base64(value, path: str) -> bytes:
    """A commit's inline file content: strict base64 (400 for anything else, not an empty or mangled file)."""
    if not isinstance(value, str):
        raise HubError(400, f"content of {path!r} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error as err:
        raise HubError(400, f"content of {path!r} is not valid base64: {err}") from err


def requested_privacy(body: dict) -> bool | None:
    """The visibility a create (or settings) body asks for: ``visibility`` ("public"/"private", what
    huggingface_hub 2.4 sends) or the older ``private`` boolean; None when it asks for neither."""
    visibility, private = body.get("visibility"), body.get("private")
    if visibility is not None and visibility not in ("public", "private"):
        raise HubError(400, f"invalid visibility {visibility!r}: the local hub has 'public' and 'private'")
    if private is not None and not isinstance(private, bool):
        raise HubError(400, f"invalid private {private!r}: expected true or false")
    if visibility is not None and private is not None and (visibility == "private") != private:
        raise HubError(400, "'private' and 'visibility' disagree")
    return (visibility == "private") if visibility is not None else private


class UnixHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to a server listening on a Unix socket (olah's, see the module docstring)."""

    def __init__(self, socket_path: str | Path, timeout: float = 60) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = str(socket_path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _size(value) -> int:
    """A size field of a request body: an integer (400 otherwise, as the Hub answers malformed bodies)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).lstrip("-").isdigit():
        raise HubError(400, f"invalid size {value!r}: expected an integer")
    return int(value)


class HubError(Exception):
    """An error answered the way the Hub answers it: status, X-Error-Code and a JSON ``error`` message."""

    def __init__(self, status: int, message: str, code: str | None = None, **extra) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


class LocalHubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, root: Path, port: int, olah_socket: str | Path, allow_faults: bool = False, *, token: str,
        body_timeout_s: float = 60.0,
    ) -> None:
        if not token:
            raise ValueError("the local hub's write server needs a token")
        super().__init__(("127.0.0.1", port), HubRequestHandler)
        self.root = Path(root)
        self.token = token
        self.body_timeout_s = body_timeout_s
        self.olah_socket = Path(olah_socket)
        self.allow_faults = allow_faults
        self.faults: list[dict] = []
        self.locks: dict[str, threading.Lock] = {}
        self.guard = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def repo(self, repo_type: str | None, namespace: str, name: str) -> GitRepo:
        """The repository ``namespace/name``, matched without regard to case as the Hub does (``Probe/R1`` is
        ``probe/r1`` when that exists)."""
        kind = self.root / (repo_type or "models")
        exact = kind / namespace / name
        if exact.exists():
            return GitRepo(exact)
        for folder in (kind.glob("*/*") if kind.is_dir() else ()):
            if (folder.parent.name.casefold(), folder.name.casefold()) == (namespace.casefold(), name.casefold()):
                return GitRepo(folder)
        return GitRepo(exact)

    def lock(self, repo: GitRepo) -> threading.Lock:
        with self.guard:
            return self.locks.setdefault(str(repo.path), threading.Lock())

    def take_fault(self, route: str, revision: str | None) -> dict | None:
        with self.guard:
            for fault in self.faults:
                if fault["route"] == route and fault["times"] > 0 and fault["revision"] in (None, revision):
                    fault["times"] -= 1
                    return fault
        return None


class HubRequestHandler(RepoAdminMixin, BaseHTTPRequestHandler):
    server: LocalHubServer
    protocol_version = "HTTP/1.1"
    hub_error = HubError  # what RepoAdminMixin raises

    def setup(self) -> None:
        self.timeout = self.server.body_timeout_s  # applied to the socket by StreamRequestHandler.setup
        super().setup()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - signature of the base class
        logger.debug("%s %s", self.address_string(), format % args)

    # -- dispatch ---------------------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        self.body_started = False
        self.body_pending = True  # until the length is known: a refusal closes the connection
        lookup = "GET" if method == "HEAD" else method
        try:
            self.body_pending = self._content_length() > 0 or self._chunked()
            self.deadline = time.monotonic() + self.server.body_timeout_s
            for route_method, pattern, handler in ROUTES:
                match = pattern.fullmatch(url.path)
                if match and route_method == lookup:
                    params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    self._guard(method, handler, params)
                    self._check_access(handler, params)
                    getattr(self, f"h_{handler}")(**params)
                    return
            self._guard(method, None, {})
            raise HubError(404, f"{url.path} is not served by the local hub")  # never forwarded: see the docstring
        except (HubError, GuardError) as err:
            self._send_json({"error": err.message, **err.extra}, err.status, code=err.code)
        except TimeoutError:  # a stalled body: answer if the socket still takes it, then drop the connection
            self.body_pending = True
            try:
                self._send_json({"error": f"request body not received within {self.server.body_timeout_s:g} s"}, 408)
            except OSError:
                self.close_connection = True
        except ConnectionError:
            self.close_connection = True
        except (KeyError, TypeError, AttributeError, ValueError) as err:  # a body of the wrong shape
            self._send_json({"error": f"malformed request body: {type(err).__name__}: {err}"}, 400)
        except Exception as err:  # answer 500 rather than dropping the connection, and keep the server up
            logger.exception("local hub: %s %s failed", method, self.path)
            self._send_json({"error": f"internal error: {err}"}, 500)
        finally:
            self.connection.settimeout(self.server.body_timeout_s)  # the next request's wait, after _read's deadline

    def _guard(self, method: str, handler: str | None, params: dict[str, str]) -> None:
        url = urlsplit(self.path)
        check_request(method=method, handler=handler, params=params, headers=self.headers, query=self.query,
                      path=url.path if handler else unquote(url.path), port=self.server.server_address[1],
                      token=self.server.token, has_body=self.body_pending)

    def _check_access(self, handler: str, params: dict[str, str]) -> None:
        """Every request naming a repository: a private (or missing) one needs the token (guard.check_repo_access).
        LFS uploads carry a signature instead, which only the token could make."""
        if "ns" not in params or handler in ("lfs_put",):
            return
        repo = self.server.repo(params.get("type") or "models", params["ns"], params["name"])
        exists = repo.exists()
        check_repo_access(self.headers, self.server.token, exists=exists, private=exists and repo.private)

    # -- helpers ----------------------------------------------------------------------------------------------
    def _send_json(self, payload, status: int = 200, code: str | None = None, ctype: str = "application/json") -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if code:
            self.send_header("X-Error-Code", code)
        if status >= 400:
            self.send_header("X-Error-Message", str(payload.get("error", ""))[:500].replace("\n", " "))
        if self.body_pending:  # refused before reading the body: drop it, or close when it cannot be dropped
            self._drain_refused_body()
        if self.body_pending:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _content_length(self) -> int:
        """The Content-Length header as a count of bytes; 400 for anything else (``abc``, ``-1``, two values)."""
        value = self.headers.get("Content-Length")
        if value is None:
            return 0
        if not value.strip().isdigit():
            raise HubError(400, f"invalid Content-Length {value!r}: expected a number of bytes")
        return int(value)

    def _chunked(self) -> bool:
        return self.headers.get("Transfer-Encoding", "").lower() == "chunked"

    def _read(self, size: int) -> bytes:
        """Up to ``size`` bytes of the body, within the request's total-time limit (``body_timeout_s`` for the whole
        body, so a body trickled a byte at a time cannot hold the connection longer)."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request body took longer than the limit")
        self.connection.settimeout(left)
        return self.rfile.read1(size)

    def _read_exactly(self, size: int) -> Iterator[bytes]:
        while size > 0:
            chunk = self._read(min(size, 1 << 20))
            if not chunk:
                raise ConnectionError("client closed the connection mid-body")
            size -= len(chunk)
            yield chunk

    def _body_chunks(self, limit: int | None = None) -> Iterator[bytes]:
        """The request body in pieces, from Content-Length or chunked transfer encoding; more than ``limit`` bytes
        (default ``MAX_BODY_BYTES``; LFS uploads pass their declared size) is answered 413 before it is read."""
        self.body_started = True
        limit = MAX_BODY_BYTES if limit is None else limit
        if self._chunked():
            total = 0
            while True:
                line = self.rfile.readline(100)
                try:
                    size = int(line.split(b";")[0].strip() or b"0", 16)
                except ValueError:
                    raise HubError(400, f"invalid chunk size {line[:40]!r}") from None
                total += size
                if total > limit:
                    raise HubError(413, f"request body over the limit of {limit:,} bytes")
                if size == 0:
                    while self.rfile.readline(1000) not in (b"\r\n", b"\n", b""):
                        pass
                    self.body_pending = False
                    return
                yield from self._read_exactly(size)
                self.rfile.readline(10)
        remaining = self._content_length()
        if remaining > limit:
            raise HubError(413, f"request body of {remaining:,} bytes is over the limit of {limit:,} bytes")
        yield from self._read_exactly(remaining)
        self.body_pending = False

    def _body(self, limit: int | None = None) -> bytes:
        return b"".join(self._body_chunks(limit))

    def _drain_refused_body(self) -> None:
        """Read and drop the body of a request answered without reading it, so that the next request on a
        keep-alive connection is parsed from its own first line; a body over ``DRAIN_LIMIT`` bytes, or one that
        stalls or ends early, is left and the connection is closed instead (``body_pending`` stays True)."""
        try:
            declared = self._content_length()
        except HubError:  # a malformed length: no way to find the body's end
            return
        if declared > DRAIN_LIMIT or self.body_started:  # too large, or partly read already: cannot resync
            return
        try:
            for _ in self._body_chunks(DRAIN_LIMIT):
                pass
        except (OSError, ValueError, HubError):  # includes TimeoutError, ConnectionError and a chunked body over
            self.body_pending = True

    def _json_body(self) -> dict:
        try:
            data = json.loads(self._body() or b"{}")
        except json.JSONDecodeError as err:
            raise HubError(400, f"request body is not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise HubError(400, "request body must be a JSON object")
        return data

    def _existing(self, type: str | None, ns: str, name: str) -> GitRepo:
        repo = self.server.repo(type, ns, name)
        if not repo.exists():
            raise HubError(404, f"Repository not found: {ns}/{name}", "RepoNotFound")
        return repo

    def _revision(self, repo: GitRepo, rev: str) -> str:
        commit = repo.resolve(rev)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    def _fault(self, route: str, revision: str | None = None) -> bool:
        """Apply an injected fault for ``route``; True when the request must not be handled further."""
        fault = self.server.take_fault(route, revision)
        if fault is None:
            return False
        if fault["action"] == "drop":
            # simulate a server that dies mid-request: read part of the body, then close without an answer
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(min(length // 2, 1 << 16))
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return True
        self._body()
        self._send_json({"error": f"injected fault on {route}"}, int(fault["action"]))
        return True

    # -- write API --------------------------------------------------------------------------------------------
    def h_create_repo(self) -> None:
        data = self._json_body()
        repo_type = REPO_TYPES.get(data.get("type") or "model")
        ns, name = data.get("organization"), data.get("name")
        if repo_type is None or not ns or not name or not re.fullmatch(_NAME, ns) or not re.fullmatch(_NAME, name):
            raise HubError(400, "repo id must be 'namespace/name' of letters, digits, '.', '_' or '-' "
                                "(the local hub has no user accounts, so the namespace is required)")
        check_repo_name(ns, name)
        private = bool(requested_privacy(data))
        repo = self.server.repo(repo_type, ns, name)
        prefix = "" if repo_type == "models" else f"{repo_type}/"
        url = f"{self.server.endpoint}/{prefix}{ns}/{name}"
        with self.server.lock(repo):
            if repo.exists():
                # the client reads "url" from the 409 answer when exist_ok=True, as the Hub sends it
                raise HubError(409, f"You already created this {data.get('type') or 'model'} repo", url=url)
            GitRepo.create(repo.path, private=private)
        self._send_json({"url": url, "name": f"{ns}/{name}", "id": f"{ns}/{name}"})

    def h_validate_yaml(self) -> None:
        content = self._json_body().get("content", "")
        match = re.match(r"\s*---\n(.*?)\n---", content, flags=re.S)
        try:
            if match and not isinstance(yaml.safe_load(match.group(1)) or {}, dict):
                raise yaml.YAMLError("the metadata block must be a mapping")
        except yaml.YAMLError as err:
            self._send_json({"error": "invalid metadata", "errors": [{"message": str(err)}]}, 400)
            return
        self._send_json({"warnings": []})

    def h_not_found(self) -> None:
        raise HubError(404, f"{self.path} is not served by the local hub")

    def h_create_branch(self, type: str, ns: str, name: str, rev: str) -> None:
        repo = self._existing(type, ns, name)
        start = self._json_body().get("startingPoint") or "main"
        with self.server.lock(repo):
            if repo.branch_head(rev) is not None:
                raise HubError(409, f"Reference already exists: refs/heads/{rev}")
            try:
                repo.create_branch(rev, self._revision(repo, start))
            except GitError as err:
                raise HubError(400, f"invalid branch name {rev!r}: {err}") from err
        self._send_json({})

    def h_delete_branch(self, type: str, ns: str, name: str, rev: str) -> None:
        repo = self._existing(type, ns, name)
        if rev == "main":
            raise HubError(403, "the main branch cannot be deleted")
        with self.server.lock(repo):
            if repo.branch_head(rev) is None:
                raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            repo.delete_branch(rev)
        self._send_json({})

    def h_preupload(self, type: str, ns: str, name: str, rev: str) -> None:
        if self._fault("preupload", rev):
            return
        repo = self._existing(type, ns, name)
        files = self._json_body().get("files", [])
        remote = repo.file_oids(self._revision(repo, rev))
        answer = []
        for entry in files:
            path, size = str(entry.get("path", "")), _size(entry.get("size", 0))
            lfs = size >= LFS_MIN_SIZE or path.lower().endswith(tuple(LFS_SUFFIXES))
            answer.append(
                {
                    "path": path,
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": remote.get(path),
                }
            )
        self._send_json({"files": answer, "commitOid": repo.resolve(rev)})

    def h_lfs_batch(self, ns: str, name: str, type: str | None = None) -> None:
        repo = self._existing(type or "models", ns, name)
        data = self._json_body()
        if data.get("operation") != "upload":
            raise HubError(400, "the local hub's LFS batch endpoint only accepts uploads; download through resolve")
        objects = []
        for obj in data.get("objects", []):
            oid, size = str(obj.get("oid", "")), _size(obj.get("size", -1))
            if not re.fullmatch(r"[0-9a-f]{64}", oid) or size < 0:
                error = {"code": 422, "message": "invalid oid or size"}
                objects.append({"oid": oid, "size": max(size, 0), "error": error})
            elif repo.has_lfs_object(oid, size):
                objects.append({"oid": oid, "size": size})
            else:
                route = f"/_lfs/{type or 'models'}/{ns}/{name}/{oid}/{size}"
                href = f"{self.server.endpoint}{route}?sig={upload_signature(self.server.token, route)}"
                objects.append({"oid": oid, "size": size, "actions": {"upload": {"href": href, "header": {}}}})
        self._send_json({"transfer": "basic", "objects": objects}, ctype="application/vnd.git-lfs+json")

    def h_lfs_put(self, type: str, ns: str, name: str, oid: str, size: str) -> None:
        if self._fault("lfs-upload"):
            return
        repo = self._existing(type, ns, name)
        try:
            repo.store_lfs_object(oid, int(size), self._body_chunks(limit=int(size)))
        except ValueError as err:
            raise HubError(400, str(err)) from err
        self._send_json({})

    def h_commit(self, type: str, ns: str, name: str, rev: str) -> None:
        if self._fault("commit", rev):
            return
        repo = self._existing(type, ns, name)
        if self.query.get("create_pr", ["0"])[0] not in ("0", "false", ""):
            raise HubError(400, "the local hub does not support pull requests; commit to a branch instead")
        lines = [line for line in self._body(MAX_COMMIT_BYTES).splitlines() if line.strip()]
        try:
            items = [json.loads(line) for line in lines]
        except json.JSONDecodeError as err:
            raise HubError(400, f"commit payload is not valid NDJSON: {err}") from err
        if not items or items[0].get("key") != "header":
            raise HubError(400, "commit payload must start with a header line")
        header = items[0].get("value", {})
        operations: list[FileAdd | PathDelete] = []
        try:
            for item in items[1:]:
                key, value = item.get("key"), item.get("value", {})
                path = check_repo_path(str(value.get("path", "")))
                if key == "file":
                    operations.append(FileAdd(path, content=_strict_base64(value.get("content", ""), path)))
                elif key == "lfsFile":
                    operations.append(FileAdd(path, lfs_oid=value.get("oid"), lfs_size=self._lfs_size(repo, value)))
                elif key in ("deletedFile", "deletedFolder"):
                    operations.append(PathDelete(path, folder=key == "deletedFolder"))
                else:
                    raise HubError(400, f"unsupported commit operation {key!r}")
        except ValueError as err:
            raise HubError(400, str(err)) from err
        message = header.get("summary") or "Upload files"
        if header.get("description"):
            message += "\n\n" + header["description"]
        with self.server.lock(repo):
            head = repo.branch_head(rev)
            if head is None:
                raise HubError(404, f"Invalid rev id: {rev} (commits go to an existing branch)", "RevisionNotFound")
            parent = header.get("parentCommit")
            if parent and repo.resolve(parent) != head:
                raise HubError(412, f"parent commit {parent} is not the head of {rev} ({head})")
            try:
                commit = repo.commit(rev, operations, message, parent=head)
            except FileNotFoundError as err:
                raise HubError(404, str(err), "EntryNotFound") from err
            except CommitConflict as err:
                raise HubError(412, str(err)) from err
            except PathConflict as err:
                raise HubError(409, str(err)) from err
        prefix = "" if type == "models" else f"{type}/"
        url = f"{self.server.endpoint}/{prefix}{ns}/{name}/commit/{commit}"
        self._send_json({"commitOid": commit, "commitUrl": url, "pullRequestUrl": None, "success": True})

    @staticmethod
    def _lfs_size(repo: GitRepo, value: dict) -> int:
        """The size of an ``lfsFile`` operation: given, or for a copy (huggingface_hub's ``CommitOperationCopy``
        sends only the source's oid) the size of the stored object; 404 when the object is not here."""
        if "size" in value:
            return _size(value["size"])
        path = repo.lfs_object(str(value.get("oid")))
        if not path.is_file():
            raise HubError(404, f"LFS object {value.get('oid')} is not in this repository", "EntryNotFound")
        return path.stat().st_size

    def h_health(self) -> None:
        self._send_json({"status": "ok"})

    def h_set_faults(self) -> None:
        if not self.server.allow_faults:
            raise HubError(403, "fault injection is off (start the server with --allow-faults)")
        faults = self._json_body().get("faults", [])
        for fault in faults:
            if fault.get("route") not in ("preupload", "lfs-upload", "commit") or str(fault.get("action")) not in (
                "drop", "500", "502", "503", "504"
            ):
                raise HubError(400, f"invalid fault {fault}")
        with self.server.guard:
            self.server.faults = [
                {"route": f["route"], "action": str(f["action"]), "times": int(f.get("times", 1)),
                 "revision": f.get("revision")}
                for f in faults
            ]
        self._send_json({"faults": self.server.faults})

    # -- read API answered from git ----------------------------------------------------------------------------
    def h_repo_info(self, type: str, ns: str, name: str, rev: str = "main") -> None:
        """model_info / dataset_info: card metadata, tags, siblings (sizes with ?blobs=True), safetensors."""
        repo = self._existing(type, ns, name)
        commit = self._revision(repo, rev)
        blobs = (self.query.get("blobs") or ["false"])[0].lower() in ("1", "true")
        self._send_json(repoinfo.repo_info(repo, type, f"{ns}/{name}", commit, blobs=blobs))

    def h_repo_commits(self, type: str, ns: str, name: str, rev: str) -> None:
        repo = self._existing(type, ns, name)
        self._send_json(repoinfo.repo_commits(repo, self._revision(repo, rev)))

    def h_list_repos(self, type: str) -> None:
        """The listing holds private repositories only for a caller with the token, as the Hub lists them."""
        private = has_token(self.headers, self.server.token)
        self._send_json(repoinfo.list_repos(self.server.root, type, self.query, include_private=private))

    def h_whoami(self) -> None:
        """The local Hub has one user, who owns every namespace; as on the Hub, only a caller with the token
        learns who that is (the namespaces name private repositories' owners too)."""
        if not has_token(self.headers, self.server.token):
            raise HubError(401, UNAUTHORIZED)
        namespaces = sorted({p.name for kind in REPO_TYPES.values() for p in (self.server.root / kind).glob("*")})
        self._send_json({
            "type": "user", "id": "local", "name": LOCAL_USER, "fullname": "Local Hub user", "isPro": False,
            "orgs": [{"type": "org", "name": ns} for ns in namespaces],
            "auth": {"type": "access_token", "accessToken": {"displayName": "local", "role": "write"}},
        })

    def h_create_tag(self, type: str, ns: str, name: str, rev: str) -> None:
        repo = self._existing(type, ns, name)
        body = self._json_body()
        tag = body.get("tag")
        if not isinstance(tag, str) or not tag:
            raise HubError(400, "the request body needs a 'tag' (string)")
        with self.server.lock(repo):
            commit = self._revision(repo, rev)
            try:
                repo.create_tag(tag, commit, body.get("message") or None)
            except CommitConflict as err:
                raise HubError(409, f"Tag {tag} already exists", "TagAlreadyExists") from err
            except ValueError as err:
                raise HubError(400, str(err)) from err
        self._send_json({"tag": tag, "commit": commit})

    def h_discussions(self, type: str, ns: str, name: str) -> None:
        self._existing(type, ns, name)
        self._body()
        raise HubError(403, "Discussions are disabled for this repo: the local Hub has no discussions or pull "
                            "requests; publish to a branch instead", "DiscussionsDisabled")

    # -- read API: validate, then proxy to olah ---------------------------------------------------------------
    def h_read_repo_info(self, type: str, ns: str, name: str) -> None:
        # olah 0.5.4 answers repo info without card metadata, safetensors or sizes: answered from git for main
        self.h_repo_info(type, ns, name)

    def h_read_repo(self, type: str, ns: str, name: str) -> None:
        self._existing(type, ns, name)
        self._proxy()

    def h_read_revision(self, type: str, ns: str, name: str, rev: str) -> None:
        self._revision(self._existing(type, ns, name), rev)
        self._proxy()

    def h_read_tree_path(self, type: str, ns: str, name: str, rev: str, path: str) -> None:
        """A folder listing: 404 EntryNotFound for a path the revision lacks, as the Hub answers (olah says 401)."""
        repo = self._existing(type, ns, name)
        commit = self._revision(repo, rev)
        if not repo.has_path(commit, path.rstrip("/")):
            raise HubError(404, f"{path} does not exist on {rev!r}", "EntryNotFound")
        self._proxy()

    def h_read_file(self, ns: str, name: str, rev: str, path: str, type: str | None = None) -> None:
        repo = self._existing(type or "models", ns, name)
        commit = self._revision(repo, rev)
        if not repo.has_path(commit, path):
            raise HubError(404, f"{path} does not exist on {rev!r}", "EntryNotFound")
        self._proxy()

    def _proxy(self, path: str | None = None) -> None:
        """Forward the request to olah (on its Unix socket) and stream its answer back."""
        body = self._body() if self.body_pending or self.command in ("POST", "PUT") else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
        headers["Host"] = urlsplit(self.server.endpoint).netloc
        conn = UnixHTTPConnection(self.server.olah_socket, timeout=60)
        try:
            conn.request(self.command, path or self.path, body=body, headers=headers)
            resp = conn.getresponse()
        except OSError as err:
            conn.close()
            raise HubError(502, f"the read-side server (olah at {self.server.olah_socket}) is not reachable: "
                                f"{err}") from err
        try:
            length = resp.getheader("Content-Length")
            payload = None if length is not None or self.command == "HEAD" else resp.read()
            self.send_response(resp.status)
            for key, value in resp.getheaders():
                if key.lower() in _HOP_HEADERS or key.lower() == "content-length":
                    continue
                self.send_header(key, value)
            self.send_header("Content-Length", length if length is not None else str(len(payload or b"")))
            self.end_headers()
            if self.command == "HEAD":
                return
            if payload is not None:
                self.wfile.write(payload)
            else:
                shutil.copyfileobj(resp, self.wfile, 1 << 20)
        finally:
            conn.close()


_HOP_HEADERS = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
    "transfer-encoding", "upgrade", "host", "accept-encoding",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="folder holding <type>s/<namespace>/<name> git repos")
    parser.add_argument("--port", type=int, required=True, help="loopback port to listen on")
    parser.add_argument("--olah-socket", type=Path, required=True,
                        help="the Unix socket olah listens on (in a folder only this user can enter)")
    parser.add_argument("--allow-faults", action="store_true", help="enable POST /_local/faults (tests only)")
    parser.add_argument("--token-file", type=Path, required=True,
                        help="file holding the token every write must carry (Authorization: Bearer TOKEN)")
    parser.add_argument("--body-timeout", type=float, default=60.0,
                        help="seconds a request may stall before it is answered 408 and closed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = args.token_file.read_text().strip()
    if not token:
        parser.error(f"--token-file {args.token_file} is empty")
    server = LocalHubServer(args.root, args.port, args.olah_socket, allow_faults=args.allow_faults, token=token,
                            body_timeout_s=args.body_timeout)
    logger.info("local hub write server on %s (reads proxied to olah at %s)", server.endpoint, args.olah_socket)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
