"""The local Hub's front server: the Hub's write API on loopback, read routes proxied to olah.

Why we write it: no package on PyPI, Debian or npm serves the Hub's write API (create repo, branch, preupload,
LFS batch, commit), and olah, the only packaged Hub-API server that runs here, is read-only. So this
small ``http.server`` answers the calls huggingface_hub 2.4 makes to publish (with ``HF_HUB_DISABLE_XET=1``) and
commits into the git repositories that olah serves. Read requests are checked against git first (so that a missing
repository, revision or file gets the Hub's error code, which olah 0.5.4 reports as 401 RepoNotFound in all three
cases, and a private repository is read only with the token) and then proxied to olah unchanged. The metadata routes
olah leaves empty or broken (repo info, commits, listings, whoami, tags, discussions) are answered from git
(``repoinfo.py``). Only loopback addresses are accepted.

This module holds the server, the dispatch and fault injection; the URL table is ``routes.py``, the handlers are
mixed in from ``write_routes.py`` (publishing), ``read_routes.py`` (reads, answered from git or proxied to olah)
and ``admin.py`` (repository administration), and request bodies are read by ``request_body.py``.

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
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from .admin import RepoAdminMixin
from .gitrepo import GitRepo
from .guard import GuardError, check_repo_access, check_request
from .read_routes import RepoReadMixin
from .request_body import HubError, RequestBodyMixin
from .routes import ROUTES
from .write_routes import RepoWriteMixin

logger = logging.getLogger(__name__)


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

    def take_fault(self, route: str, revision: str | None, path: str | None = None) -> dict | None:
        with self.guard:
            for fault in self.faults:
                if (fault["route"] == route and fault["times"] > 0 and fault["revision"] in (None, revision)
                        and fault["path"] in (None, path)):
                    fault["times"] -= 1
                    return fault
        return None


class HubRequestHandler(RepoWriteMixin, RepoReadMixin, RepoAdminMixin, RequestBodyMixin, BaseHTTPRequestHandler):
    server: LocalHubServer
    protocol_version = "HTTP/1.1"

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

    def _fault(self, route: str, revision: str | None = None, path: str | None = None) -> bool:
        """Apply an injected fault for ``route`` (a file's ``path`` for ``read-file``); True when the request must
        not be handled further."""
        fault = self.server.take_fault(route, revision, path)
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

    def h_health(self) -> None:
        self._send_json({"status": "ok"})

    def h_set_faults(self) -> None:
        if not self.server.allow_faults:
            raise HubError(403, "fault injection is off (start the server with --allow-faults)")
        faults = self._json_body().get("faults", [])
        for fault in faults:
            if fault.get("route") not in ("preupload", "lfs-upload", "commit", "read-file") or str(fault.get("action")) not in (
                "drop", "500", "502", "503", "504"
            ):
                raise HubError(400, f"invalid fault {fault}")
        with self.server.guard:
            self.server.faults = [
                {"route": f["route"], "action": str(f["action"]), "times": int(f.get("times", 1)),
                 "revision": f.get("revision"), "path": f.get("path")}
                for f in faults
            ]
        self._send_json({"faults": self.server.faults})


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
