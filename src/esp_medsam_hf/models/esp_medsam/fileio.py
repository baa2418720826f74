"""Atomic writes: every file and folder the package produces appears complete or not at all.

One place for the temporary-sibling-then-``os.replace`` pattern that checkpoints, prepared datasets, reports,
masks and converted models all use. What appears gets the permissions a plain ``open``/``mkdir`` would give
under the process's umask (``tempfile`` alone would leave files 0600 and folders 0700).
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix, for writers that infer the format from it); it is
    renamed onto ``path`` when the block succeeds and removed when it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    temporary = Path(name)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def replace_directory(staging: Path, target: Path) -> None:
    """Move a finished ``staging`` folder to ``target``, replacing what was there, with no moment without a target."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old)
    else:
        os.replace(staging, target)


@contextmanager
def staging_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a new temporary folder beside ``target``; it replaces ``target`` when the block succeeds (see
    ``replace_directory``) and is removed when it fails, leaving ``target`` as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staging.chmod(0o777 & ~_umask())
    try:
        yield staging
        replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def check_clear_of_inputs(
    output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], *, option: str = "the output"
) -> None:
    """The package's one rule for outputs and inputs: refuse (``FileExistsError``) an ``output`` that equals or
    contains one of the ``inputs`` (a command deletes or replaces only what it wrote itself, never its inputs or a
    folder holding them). Called before anything is read or written; ``option`` names the output in the message."""
    resolved = Path(output).resolve()
    for item in inputs:
        if item is None or str(item) == "":
            continue
        path = Path(item).resolve()
        if path == resolved or resolved in path.parents:
            raise FileExistsError(
                f"{option} {output} {'is' if path == resolved else 'holds'} the input {item}: writing there would "
                "replace or delete it; choose another output folder"
            )


def check_replaceable(
    output: str | os.PathLike,
    *,
    inputs: Iterable[str | os.PathLike | None] = (),
    owned: Iterable[str] = (),
    command: str = "this command",
) -> None:
    """Refuse (``FileExistsError``) to let ``--overwrite`` replace ``output`` when it is or holds one of the
    ``inputs`` (the model, the checkpoint, the data), or holds entries that ``command`` does not write (names
    matching none of the ``owned`` glob patterns). Called before anything is read or written."""
    output = Path(output)
    if not output.exists():
        return
    check_clear_of_inputs(output, inputs)
    if not output.is_dir():
        raise FileExistsError(f"{output} is a file, not a folder; choose another output folder")
    patterns = tuple(owned)
    unrelated = sorted(p.name for p in output.iterdir() if not any(fnmatch.fnmatch(p.name, pat) for pat in patterns))
    if unrelated:
        shown = ", ".join(unrelated[:5]) + (", ..." if len(unrelated) > 5 else "")
        raise FileExistsError(
            f"{output} holds files that {command} does not write ({shown}); --overwrite only replaces a folder of "
            "its own outputs: move them or choose another output folder"
        )
