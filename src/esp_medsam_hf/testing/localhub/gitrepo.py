"""Hub-style repositories kept as plain git repositories on disk, written with the ``git`` binary.

Commits are built with git plumbing (a private index file, ``commit-tree``, ``update-ref`` with the expected old
value) so that the working tree is never touched, concurrent writers cannot lose each other's commits, and a failed
commit leaves every branch exactly as it was. Large files are stored the git-lfs way: a pointer blob in git and the
content under ``.git/lfs/objects/aa/bb/<sha256>``, which is where olah (the read-side server) looks for it.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

ZERO_OID = "0" * 40
LFS_POINTER_RE = re.compile(
    rb"version https://git-lfs\.github\.com/spec/v1\noid sha256:([0-9a-f]{64})\nsize ([0-9]+)\n"
)
# Same defaults as the Hub's .gitattributes for new repositories (the binary formats people push).
LFS_SUFFIXES = (
    ".7z .arrow .bin .bz2 .ckpt .ftz .gz .h5 .joblib .mlmodel .model .msgpack .npy .npz .onnx .ot .parquet .pb "
    ".pickle .pkl .pt .pth .rar .safetensors .tar .tflite .tgz .wasm .xz .zip .zst"
).split()
LFS_MIN_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES)
PRIVATE_KEY = "hub.private"
"""The git config key holding a repository's visibility (``true``: private)."""
_IDENTITY = {
    "GIT_AUTHOR_NAME": "esp-medsam local hub",
    "GIT_AUTHOR_EMAIL": "local-hub@127.0.0.1",
    "GIT_COMMITTER_NAME": "esp-medsam local hub",
    "GIT_COMMITTER_EMAIL": "local-hub@127.0.0.1",
}


class GitError(RuntimeError):
    """A git command failed or a repository operation was refused."""


class CommitConflict(GitError):
    """The branch moved while a commit was being built (or the given parent is not the branch head)."""


@dataclass(frozen=True)
class FileAdd:
    """Add or replace ``path`` with ``content`` (regular blob) or with an LFS pointer to ``lfs_oid``."""

    path: str
    content: bytes | None = None
    lfs_oid: str | None = None
    lfs_size: int | None = None


@dataclass(frozen=True)
class PathDelete:
    """Delete a file, or every file below a folder when ``folder`` is true."""

    path: str
    folder: bool = False


UNREADABLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Zl", "Zp"})
"""Unicode categories a repository path may not hold: controls (NUL, tab, U+0085 NEL), format characters (the
bidi overrides U+202E and U+2066-2069, zero-width joiners), surrogates, private use and line/paragraph
separators: names that display as something else, or that a listing cannot show."""


def check_repo_path(path: str) -> str:
    """Return ``path`` normalised to a relative POSIX path, or raise ValueError for paths that escape the repo,
    name git's own folder (``.git`` in any case) or hold unreadable characters (``UNREADABLE_CATEGORIES``)."""
    parts = PurePosixPath(path.strip("/")).parts
    if (
        not parts
        or any(part in ("", ".", "..") or part.lower().rstrip(". ") == ".git" for part in parts)
        or "\\" in path
    ):
        raise ValueError(f"invalid path in repository: {path!r}")
    bad = [ch for ch in path if unicodedata.category(ch) in UNREADABLE_CATEGORIES]
    if bad:
        raise ValueError(f"invalid path in repository: {path!r} holds the unreadable character(s) "
                         f"{', '.join(f'U+{ord(ch):04X}' for ch in dict.fromkeys(bad))}")
    return "/".join(parts)


class PathConflict(ValueError):
    """A commit that would replace a file by a folder or a folder by a file without deleting it first."""


def check_no_replacement(existing: set[str], operations: list) -> None:
    """Refuse (``PathConflict``) an added file where a folder is, or under a path that is a file, unless the commit
    deletes what is there (as the Hub refuses it)."""
    deleted = {op.path for op in operations if isinstance(op, PathDelete)}
    folders = {op.path for op in operations if isinstance(op, PathDelete) and op.folder}
    kept = {p for p in existing if p not in deleted and not any(p.startswith(f + "/") for f in folders)}
    kept |= {op.path for op in operations if isinstance(op, FileAdd)}
    for path in sorted(kept):
        parents = path.split("/")[:-1]
        for depth in range(1, len(parents) + 1):
            folder = "/".join(parents[:depth])
            if folder in kept:
                raise PathConflict(f"{folder!r} is a file and {path!r} would make it a folder: delete {folder!r} "
                                   "in the same commit to replace it")


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


class GitRepo:
    """One Hub repository (``<root>/<type>s/<namespace>/<name>``) as a non-bare git repository."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    # -- low level -------------------------------------------------------------------------------------------
    def git(self, *args: str, input: bytes | None = None, env: dict[str, str] | None = None, check: bool = True) -> str:
        full_env = {**os.environ, **_IDENTITY, **(env or {})}
        proc = subprocess.run(
            ["git", "-C", str(self.path), *args], input=input, capture_output=True, env=full_env, check=False
        )
        if check and proc.returncode != 0:
            stderr = proc.stderr.decode(errors="replace").strip()
            raise GitError(f"git {' '.join(args)} failed in {self.path}: {stderr}")
        return proc.stdout.decode(errors="replace")

    @property
    def lfs_dir(self) -> Path:
        return self.path / ".git" / "lfs" / "objects"

    def exists(self) -> bool:
        return (self.path / ".git" / "HEAD").is_file()

    @classmethod
    def create(cls, path: Path, *, private: bool = False) -> "GitRepo":
        """Create the repository with a first commit on ``main`` holding the Hub's default ``.gitattributes``;
        ``private`` is recorded before the first commit, so that its content is never readable as public."""
        path.mkdir(parents=True, exist_ok=False)
        repo = cls(path)
        repo.git("init", "-q", "-b", "main")
        repo.set_private(private)
        repo.commit("main", [FileAdd(".gitattributes", GITATTRIBUTES.encode())], "initial commit", parent=None)
        return repo

    # -- settings ---------------------------------------------------------------------------------------------
    @property
    def private(self) -> bool:
        """Whether the repository is private: read only with the hub's token (``hub.private`` in its git config,
        the one place the flag is kept; ``set_private`` changes it)."""
        proc = subprocess.run(["git", "-C", str(self.path), "config", "--type=bool", "--get", PRIVATE_KEY],
                              capture_output=True)
        if proc.returncode == 1:  # the key is not set: public, as the Hub creates repositories by default
            return False
        return proc.returncode != 0 or proc.stdout.strip() == b"true"  # an unreadable setting counts as private

    def set_private(self, private: bool) -> None:
        """Make the repository private or public (git writes its config through a lock file)."""
        self.git("config", "--type=bool", PRIVATE_KEY, "true" if private else "false")

    # -- reading ----------------------------------------------------------------------------------------------
    def resolve(self, revision: str) -> str | None:
        """The commit id a branch, tag or (abbreviated) commit id points at, or None."""
        if not revision or revision.startswith("-") or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in revision):
            return None
        if not revision.startswith("refs/") and self.branch_head(revision) is not None:
            return self.branch_head(revision)  # a branch wins over a tag of the same name (git prefers the tag)
        out = self.git("rev-parse", "--verify", "--quiet", "--end-of-options", f"{revision}^{{commit}}", check=False)
        return out.strip() or None

    def branch_head(self, branch: str) -> str | None:
        out = self.git("rev-parse", "--verify", "--quiet", f"refs/heads/{branch}", check=False)
        return out.strip() or None

    def branches(self) -> dict[str, str]:
        out = self.git("for-each-ref", "--format=%(refname:lstrip=2) %(objectname)", "refs/heads")
        return dict(line.split(" ", 1) for line in out.splitlines())

    def has_path(self, commit: str, path: str) -> bool:
        proc = subprocess.run(["git", "-C", str(self.path), "cat-file", "-e", f"{commit}:{path}"], capture_output=True)
        return proc.returncode == 0

    def file_oids(self, commit: str) -> dict[str, str]:
        """Path -> the oid the Hub reports: the sha256 for LFS files, the git blob id for the others."""
        oids: dict[str, str] = {}
        for line in self.git("ls-tree", "-r", "-l", "-z", commit).split("\0"):
            if not line:
                continue
            meta, path = line.split("\t", 1)
            _mode, _type, blob, size = meta.split()
            oids[path] = blob
            if size.isdigit() and 100 < int(size) < 200:
                match = LFS_POINTER_RE.fullmatch(self._blob(blob))
                if match:
                    oids[path] = match.group(1).decode()
        return oids

    def _blob(self, blob: str) -> bytes:
        proc = subprocess.run(["git", "-C", str(self.path), "cat-file", "blob", blob], capture_output=True, check=True)
        return proc.stdout

    def read_blob(self, name: str) -> bytes:
        """The bytes of a blob, named by its id or as ``<commit>:<path>``."""
        return self._blob(name)

    def lfs_file(self, commit: str, path: str) -> tuple[str, Path] | None:
        """``(sha256, stored object)`` of ``path`` at ``commit`` when it is an LFS pointer whose object is stored
        here; None for a regular blob."""
        size = self.git("cat-file", "-s", f"{commit}:{path}").strip()
        if not (size.isdigit() and 100 < int(size) < 200):
            return None
        match = LFS_POINTER_RE.fullmatch(self.read_blob(f"{commit}:{path}"))
        if match is None:
            return None
        stored = self.lfs_object(match.group(1).decode())
        return (match.group(1).decode(), stored) if stored.is_file() else None

    def tags(self) -> dict[str, str]:
        """Tag name -> the commit it points at."""
        out = self.git("for-each-ref", "--format=%(refname:lstrip=2) %(objectname) %(*objectname)", "refs/tags")
        return {name: (peeled or oid) for name, oid, *rest in (line.split(" ") for line in out.splitlines())
                for peeled in [rest[0] if rest else ""]}

    def create_tag(self, tag: str, commit: str, message: str | None = None) -> None:
        """Tag ``commit`` (annotated when there is a message); an existing tag is a ``CommitConflict``."""
        if self.resolve(f"refs/tags/{tag}") is not None:
            raise CommitConflict(f"tag {tag!r} already exists")
        if self.branch_head(tag) is not None:
            raise CommitConflict(f"{tag!r} is a branch; a tag of the same name would shadow it")
        check_ref = subprocess.run(["git", "check-ref-format", f"refs/tags/{tag}"], capture_output=True)
        if check_ref.returncode != 0 or tag.startswith("-"):
            raise ValueError(f"invalid tag name {tag!r}")
        self.git("tag", *(["-a", "-m", message] if message else []), tag, commit)

    def lfs_object(self, oid: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", oid):
            raise ValueError(f"invalid LFS oid {oid!r}: expected 64 lowercase hex digits")
        return self.lfs_dir / oid[:2] / oid[2:4] / oid

    def has_lfs_object(self, oid: str, size: int) -> bool:
        path = self.lfs_object(oid)
        return path.is_file() and path.stat().st_size == size

    # -- writing ----------------------------------------------------------------------------------------------
    def store_lfs_object(self, oid: str, size: int, chunks) -> None:
        """Write an LFS object from an iterable of byte chunks; keep it only if its size and sha256 match."""
        target = self.lfs_object(oid)
        target.parent.mkdir(parents=True, exist_ok=True)
        digest, written = hashlib.sha256(), 0
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as handle:
                for chunk in chunks:
                    digest.update(chunk)
                    written += len(chunk)
                    handle.write(chunk)
            if written != size or digest.hexdigest() != oid:
                raise ValueError(
                    f"LFS object {oid}: received {written} bytes with sha256 {digest.hexdigest()}, "
                    f"expected {size} bytes with sha256 {oid}"
                )
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def create_branch(self, branch: str, start: str) -> str:
        """Create ``branch`` at commit ``start``; GitError if it already exists."""
        self.git("check-ref-format", "--branch", branch)
        if self.resolve(f"refs/tags/{branch}") is not None:
            raise GitError(f"{branch!r} is a tag; a branch of the same name would be shadowed by it")
        self.git("update-ref", f"refs/heads/{branch}", start, ZERO_OID)
        return start

    def delete_branch(self, branch: str) -> None:
        self.git("update-ref", "-d", f"refs/heads/{branch}")

    def commit(self, branch: str, operations: list[FileAdd | PathDelete], message: str, parent: str | None) -> str:
        """Commit ``operations`` on top of ``parent``; move ``branch`` there only if it still points at ``parent``."""
        with tempfile.TemporaryDirectory(prefix="esp-medsam-index-") as tmp:
            env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            if parent is not None:
                self.git("read-tree", parent, env=env)
            check_no_replacement(set(self.git("ls-files", "-z", env=env).split("\0")) - {""}, operations)
            entries: list[str] = []
            for op in operations:
                if isinstance(op, PathDelete):
                    # literal pathspecs: a path like "*" or ":(glob)**" names itself, not a pattern
                    listed = self.git("ls-files", "-z", "--", op.path,
                                      env={**env, "GIT_LITERAL_PATHSPECS": "1"}).split("\0")
                    targets = [p for p in listed if p and (op.folder or p == op.path)]
                    if not targets:
                        kind = "folder" if op.folder else "file"
                        raise FileNotFoundError(f"cannot delete {op.path!r}: no such {kind}")
                    entries += [f"0 {ZERO_OID}\t{p}" for p in targets]
                    continue
                if op.lfs_oid is not None:
                    if not self.has_lfs_object(op.lfs_oid, op.lfs_size or 0):
                        raise FileNotFoundError(f"LFS object {op.lfs_oid} for {op.path!r} was not uploaded")
                    data = lfs_pointer(op.lfs_oid, op.lfs_size or 0)
                else:
                    data = op.content or b""
                blob = self.git("hash-object", "-w", "--stdin", input=data).strip()
                entries.append(f"100644 {blob}\t{op.path}")
            if entries:  # NUL-terminated records: no path can end an entry early or start a forged one
                self.git("update-index", "-z", "--index-info", input="".join(e + "\0" for e in entries).encode(),
                         env=env)
            tree = self.git("write-tree", env=env).strip()
        args = ["commit-tree", tree, "-m", message] + (["-p", parent] if parent else [])
        commit = self.git(*args).strip()
        old = parent if parent is not None else ZERO_OID
        proc = subprocess.run(
            ["git", "-C", str(self.path), "update-ref", f"refs/heads/{branch}", commit, old], capture_output=True
        )
        if proc.returncode != 0:
            raise CommitConflict(f"branch {branch!r} moved while committing (expected parent {parent})")
        return commit
