"""Start and stop the embedded local Hub: olah (read side) behind our write server, the only one on a port.

Layout under ``root``::

    repos/models/<namespace>/<name>/   git repositories (olah's ``mirrors-path``), one branch per stage (mode 0700)
    olah/                              olah's config, cache database and logs (mode 0700)
    logs/                              the write server's log
    hub.json                           state while running: endpoint, port, olah's socket, process ids
    token                              the write token (mode 0600), new at each start

The endpoint that clients use (``HF_ENDPOINT``) is the write server's, on 127.0.0.1: it answers the write API
itself and proxies every read to olah, so one URL serves ``push_to_hub``, ``snapshot_download`` and
``from_pretrained``. Every write, and every read of a private repository, needs the token generated at start
(``HF_TOKEN`` in ``LocalHub.env``); see guard.py for the checks.

olah knows nothing of private repositories, so it opens no TCP port: it listens on a Unix socket in a fresh
folder of mode 0700 (``tempfile.mkdtemp``; a socket path must stay under about 100 bytes, which ``root`` may not),
which only this user can enter, and the write server is its only client (server.py says why).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from shutil import which

from .guard import new_token
from .read_routes import UnixHTTPConnection

logger = logging.getLogger(__name__)

STATE_FILE = "hub.json"
TOKEN_FILE = "token"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
OLAH_CONFIG = """[basic]
repos-path = "{state}"
mirrors-path = ["{mirrors}"]
hf-scheme = "http"
hf-netloc = "127.0.0.1:9"
hf-lfs-netloc = "127.0.0.1:9"
mirror-scheme = "http"
mirror-netloc = "127.0.0.1:{port}"
mirror-lfs-netloc = "127.0.0.1:{port}"

[accessibility]
offline = true
"""
# hf-netloc points at a closed loopback port (the discard port) so that olah never reaches out to the internet.
# No host or port: olah listens on the Unix socket given on its command line (see the module docstring).
SOCKET_PREFIX = "esp-medsam-hub-"
SOCKET_NAME = "olah.sock"


class LocalHubError(RuntimeError):
    """The local Hub could not be started, found or stopped."""


def client_env(endpoint: str, token: str) -> dict[str, str]:
    """Environment for a huggingface_hub client talking to ``endpoint`` with the hub's write ``token`` (Xet is
    only spoken by the real Hub)."""
    return {
        "HF_ENDPOINT": endpoint,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_TOKEN": token,
    }


def read_token(root: Path) -> str | None:
    """The write token of the local hub started for ``root`` (None when there is none)."""
    try:
        return (Path(root) / TOKEN_FILE).read_text().strip() or None
    except OSError:
        return None


def _write_token(root: Path) -> str:
    """A new token in ``root/token``, readable by this user only."""
    token = new_token()
    path = Path(root) / TOKEN_FILE
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return token


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def find_olah() -> Path:
    """olah-cli from this interpreter's environment (it installs beside our dependencies), else from PATH."""
    candidates = [Path(sys.executable).parent / "olah-cli"]
    found = which("olah-cli")
    candidates += [Path(found)] if found else []
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise LocalHubError(
        "olah-cli was not found (looked in " + ", ".join(map(str, candidates)) + "); install it with "
        "`pip install \"esp-medsam-hf[testing]\"` (olah) or run scripts/install.sh"
    )


def olah_python(olah_cli: Path) -> str:
    """The interpreter olah is installed for: ``olah-cli``'s own (its ``#!`` line), else this one. olah is started
    as ``python -m uvicorn olah.server:app --uds ...`` (olah reads ``OLAH_CONFIG`` when imported, as its
    multi-worker mode does), because ``olah-cli`` can only listen on TCP."""
    try:
        first = olah_cli.read_bytes()[:500].split(b"\n", 1)[0].decode()
    except (OSError, UnicodeDecodeError):
        return sys.executable
    interpreter = Path(first[2:].strip()) if first.startswith("#!") else None
    if interpreter is not None and interpreter.is_absolute() and os.access(interpreter, os.X_OK):
        return str(interpreter)
    return sys.executable


def _remove_socket(path: Path) -> None:
    """Remove olah's socket and its folder, only when they are what ``start`` made (a socket named
    ``SOCKET_NAME`` in a folder named ``SOCKET_PREFIX...``): an edited state file cannot name anything else."""
    if path.name != SOCKET_NAME or not path.parent.name.startswith(SOCKET_PREFIX):
        return
    try:
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
        path.parent.rmdir()  # only when empty
    except OSError:
        pass


def _http_status(port: int | Path, path: str, timeout: float = 1.0) -> int | None:
    """The status of ``GET path`` on 127.0.0.1:``port``, or on the Unix socket ``port`` when it is a path."""
    if isinstance(port, Path):
        conn: http.client.HTTPConnection = UnixHTTPConnection(port, timeout=timeout)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


def process_start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot, field 22 of ``/proc/PID/stat``), or None when it does not run:
    with the pid, it names one process; a recycled pid has another start time."""
    try:
        fields = Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    return int(fields[19]) if len(fields) > 19 and fields[19].isdigit() else None


def _alive(pid: int, marker: str, started: int | None = None) -> bool:
    """True when ``pid`` runs, its command line contains ``marker`` and, when ``started`` is given, it is the
    process that started then (a stale or edited state file names another process: never signalled)."""
    try:
        cmdline = Path(f"/proc/{int(pid)}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, ValueError):
        return False
    return marker in cmdline and (started is None or process_start_time(pid) == started)


def _terminate(pid: int, marker: str, started: int) -> None:
    """Stop the process ``pid`` only while it is the one that started at ``started`` (SIGTERM, then SIGKILL)."""
    if not _alive(pid, marker, started):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline and _alive(pid, marker, started):
        time.sleep(0.05)
    if _alive(pid, marker, started):
        os.kill(pid, signal.SIGKILL)


def _recorded(state: dict, key: str) -> tuple[int, int] | None:
    """``(pid, start time)`` of a process the state file records, or None when either is missing or not a number
    (a state file written before start times were recorded, or edited, names no process we may stop)."""
    pid, started = state.get(key), state.get(f"{key}_start")
    if isinstance(pid, bool) or isinstance(started, bool) or not isinstance(pid, int) or not isinstance(started, int):
        return None
    return pid, started


def read_state(root: Path) -> dict | None:
    try:
        return json.loads((Path(root) / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


# state key -> a string the process's command line must contain before we signal it
_MARKERS = {"server_pid": "esp_medsam_local_hub", "olah_pid": "olah"}
# The write server needs only this subpackage and the standard library. Importing it as
# `esp_medsam_hf.testing.localhub` would run the parent package's __init__, which imports torch and transformers (seconds and ~1 GB per server), so the
# server process loads this folder as a stand-alone package named `esp_medsam_local_hub` instead.
_SERVER_LAUNCHER = (
    "import importlib.util, sys; "
    "spec = importlib.util.spec_from_file_location('esp_medsam_local_hub', sys.argv[1] + '/__init__.py', "
    "submodule_search_locations=[sys.argv[1]]); "
    "package = importlib.util.module_from_spec(spec); sys.modules['esp_medsam_local_hub'] = package; "
    "spec.loader.exec_module(package); "
    "from esp_medsam_local_hub.server import main; sys.exit(main(sys.argv[2:]))"
)


def is_running(root: Path) -> bool:
    state = read_state(root)
    return bool(state) and all((rec := _recorded(state, k)) is not None and _alive(rec[0], m, rec[1])
                               for k, m in _MARKERS.items())


class LocalHub:
    """The local Hub as a context manager: ``with LocalHub(tmp) as hub: os.environ.update(hub.env)``.

    ``port`` is the endpoint's port (a free one when None). ``allow_faults`` enables the write server's
    fault-injection route, for tests of interrupted uploads.
    """

    def __init__(
        self, root: str | Path, port: int | None = None, *, allow_faults: bool = False, body_timeout_s: float = 60.0
    ) -> None:
        self.root = Path(root).resolve()
        self.port = port
        self.allow_faults = allow_faults
        self.body_timeout_s = body_timeout_s
        self._token: str | None = None
        self._procs: dict[str, subprocess.Popen] = {}
        self._olah_socket: Path | None = None
        self._logs: list = []
        self._xet_disabled_before: bool | None = None

    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise LocalHubError("the local hub is not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def token(self) -> str:
        """The write token (``Authorization: Bearer``; ``HF_TOKEN`` for huggingface_hub)."""
        token = self._token or read_token(self.root)
        if token is None:
            raise LocalHubError(f"no local hub token in {self.root} (start the hub first)")
        return token

    @property
    def env(self) -> dict[str, str]:
        return client_env(self.endpoint, self.token)

    @property
    def repos_dir(self) -> Path:
        return self.root / "repos"

    def start(self) -> "LocalHub":
        if is_running(self.root):
            raise LocalHubError(f"a local hub already runs for {self.root} at {read_state(self.root)['endpoint']}")
        olah_cli = find_olah()
        if self.port is not None and not port_is_free(self.port):
            raise LocalHubError(f"port {self.port} on 127.0.0.1 is already in use; pick another --port or leave it out")
        port = self.port or free_port()
        for sub in ("repos/models", "repos/datasets", "olah/state", "olah/logs", "logs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for private in ("repos", "olah"):  # private repositories stay unreadable to other users on disk too
            (self.root / private).chmod(0o700)
        config = self.root / "olah" / "config.toml"
        config.write_text(OLAH_CONFIG.format(port=port, state=self.root / "olah" / "state", mirrors=self.repos_dir))
        self.port = port
        self._token = _write_token(self.root)
        self._olah_socket = Path(tempfile.mkdtemp(prefix=SOCKET_PREFIX)) / SOCKET_NAME
        try:
            self._spawn("olah_pid", [olah_python(olah_cli), "-m", "uvicorn", "olah.server:app",
                                     "--uds", str(self._olah_socket), "--log-level", "info"],
                        self.root / "olah" / "olah.out",
                        {"OLAH_CONFIG": str(config), "OLAH_LOG_PATH": str(self.root / "olah" / "logs")})
            self._spawn("server_pid", [sys.executable, "-c", _SERVER_LAUNCHER, str(Path(__file__).parent),
                                       "--root", str(self.repos_dir), "--port", str(port),
                                       "--olah-socket", str(self._olah_socket),
                                       "--token-file", str(self.root / TOKEN_FILE),
                                       "--body-timeout", str(self.body_timeout_s)]
                        + (["--allow-faults"] if self.allow_faults else []), self.root / "logs" / "server.log")
            # readiness: an API route on olah (its HTML index answers 500), the health route on ours
            self._wait_ready(self._olah_socket, "/api/models/local-hub/ready/refs", "olah_pid")
            self._wait_ready(port, "/_local/health", "server_pid")
        except BaseException:
            self.stop()
            raise
        state = {"endpoint": self.endpoint, "port": port, "olah_socket": str(self._olah_socket),
                 "root": str(self.root),
                 **{key: proc.pid for key, proc in self._procs.items()},
                 **{f"{key}_start": process_start_time(proc.pid) for key, proc in self._procs.items()}}
        tmp = self.root / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, self.root / STATE_FILE)
        logger.info("local hub ready at %s (olah on %s, repositories in %s)", self.endpoint, self._olah_socket,
                    self.repos_dir)
        return self

    def _spawn(self, key: str, cmd: list[str], log_path: Path, extra_env: dict[str, str] | None = None) -> None:
        log = open(log_path, "ab")
        self._logs.append(log)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        # olah's own start-up would otherwise try to reach the Hub through any inherited HF_ENDPOINT
        env.pop("HF_ENDPOINT", None)
        self._procs[key] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=env, cwd=self.root, start_new_session=True)

    def _wait_ready(self, port: int | Path, path: str, key: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._procs[key].poll() is not None:
                raise LocalHubError(f"{key.split('_')[0]} exited with code {self._procs[key].returncode} on start; "
                                    f"see the logs under {self.root}")
            if _http_status(port, path) is not None:
                return
            time.sleep(0.1)
        where = port if isinstance(port, Path) else f"127.0.0.1:{port}"
        raise LocalHubError(f"{key.split('_')[0]} did not answer on {where} within {START_TIMEOUT_S:.0f} s")

    def stop(self) -> None:
        """Stop both servers (those this object started, else those recorded in the state file)."""
        state = read_state(self.root) or {}
        for key, marker in _MARKERS.items():
            proc = self._procs.pop(key, None)
            if proc is not None:
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(STOP_TIMEOUT_S)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
            elif (recorded := _recorded(state, key)) is not None:
                _terminate(recorded[0], marker, recorded[1])
        for log in self._logs:
            log.close()
        self._logs.clear()
        recorded_socket = state.get("olah_socket")
        for socket_path in (self._olah_socket, Path(recorded_socket) if isinstance(recorded_socket, str) else None):
            if socket_path is not None:
                _remove_socket(socket_path)
        self._olah_socket = None
        (self.root / STATE_FILE).unlink(missing_ok=True)
        (self.root / TOKEN_FILE).unlink(missing_ok=True)

    def kill_write_server(self) -> None:
        """Kill the write server abruptly (SIGKILL), as a crash would; for tests of a server that goes down."""
        proc = self._procs["server_pid"]
        proc.kill()
        proc.wait()

    def __enter__(self) -> "LocalHub":
        """Start the hub; until the block ends, this process's huggingface_hub uploads through LFS.

        The local Hub does not speak Xet, and huggingface_hub reads ``HF_HUB_DISABLE_XET`` (which ``env`` gives
        other processes) only when it is imported, so a test double that a running process talks to turns Xet
        off in that process for as long as it runs, and restores the setting afterwards.
        """
        from huggingface_hub import constants

        self.start()
        self._xet_disabled_before = constants.HF_HUB_DISABLE_XET
        constants.HF_HUB_DISABLE_XET = True
        return self

    def __exit__(self, *exc) -> None:
        from huggingface_hub import constants

        if self._xet_disabled_before is not None:
            constants.HF_HUB_DISABLE_XET = self._xet_disabled_before
            self._xet_disabled_before = None
        self.stop()


def stop_local_hub(root: str | Path) -> bool:
    """Stop the local hub recorded in ``root``'s state file; False when none was running."""
    root = Path(root).resolve()
    if read_state(root) is None:
        return False
    LocalHub(root).stop()
    return True
