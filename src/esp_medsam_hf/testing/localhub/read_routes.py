"""The local Hub's read API: metadata answered from git, everything else checked against git and proxied to olah.

The metadata routes olah 0.5.4 leaves empty or broken (repo info, commits, listings, whoami, discussions) are
answered from git (``repoinfo.py``). The other reads are checked first (so that a missing repository, revision or
file gets the Hub's error code, which olah reports as 401 RepoNotFound in all three cases) and then forwarded
unchanged to olah on its Unix socket (``UnixHTTPConnection``). The handlers are mixed into ``HubRequestHandler``
(server.py).
"""

from __future__ import annotations

import http.client
import shutil
import socket
from pathlib import Path
from urllib.parse import urlsplit

from . import repoinfo
from .guard import UNAUTHORIZED, has_token
from .request_body import HubError
from .routes import REPO_TYPES

LOCAL_USER = "local"
HOP_HEADERS = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
    "transfer-encoding", "upgrade", "host", "accept-encoding",
}
"""Headers of one connection, never forwarded in either direction."""


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


class RepoReadMixin:
    """Handlers (``h_<name>``) of the read routes in ``routes.ROUTES``; they use the request handler's helpers."""

    def h_not_found(self) -> None:
        raise HubError(404, f"{self.path} is not served by the local hub")

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
        if self._fault("read-file", rev, path):
            return
        stored = repo.lfs_file(commit, path)
        if stored is None:
            self._proxy()
        else:
            self._send_lfs_file(commit, *stored)

    def _send_lfs_file(self, commit: str, oid: str, stored: Path) -> None:
        """An LFS file from its stored object, streamed, with the headers olah sends (its sha256 as ETag, the
        commit, the size). Not proxied: olah 0.5.4 reads and hashes the whole file for a HEAD and reads it whole
        again for a GET before its first byte, which took 11 s for 110 MB beside the main job, past
        huggingface_hub's 10 s timeouts (the client retried, then transformers reported "no file named
        pytorch_model.bin")."""
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("ETag", oid)
        self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Length", str(stored.stat().st_size))
        self.end_headers()
        if self.command != "HEAD":
            with open(stored, "rb") as handle:
                shutil.copyfileobj(handle, self.wfile, 1 << 20)

    def _proxy(self, path: str | None = None) -> None:
        """Forward the request to olah (on its Unix socket) and stream its answer back."""
        body = self._body() if self.body_pending or self.command in ("POST", "PUT") else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
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
                if key.lower() in HOP_HEADERS or key.lower() == "content-length":
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
