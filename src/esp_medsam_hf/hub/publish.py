"""Publish trained stages to a Hub repository: one branch per stage, ``main`` for the released model.

Each stage's saved folder (config.json, model.safetensors, preprocessor config, remote-code .py files: whatever it
holds) goes up as is, together with that stage's model card as README.md, with ``HfApi.upload_folder``: one commit
on the stage's branch that also deletes the files the branch holds and the folder does not
(``delete_patterns="*"``). Local files are only read, never written: the card is added in a temporary mirror of the
folder made of symbolic links. A commit is all or nothing, so a branch is either fully updated or left as it was
(huggingface_hub splits only folders of more than 256 files into several commits, when it uploads through Xet).

Retries: huggingface_hub already retries its preupload and LFS transfers (``http_backoff``); the calls it does not
retry (create repo, create branch, the upload itself) are retried here with exponential backoff on transient
failures (5xx, 429, connection and timeout errors). A retried upload cannot duplicate a file change: the Hub
reports the files it already holds and the client leaves unchanged files out of the commit.

Only the Hugging Face Hub speaks Xet, which huggingface_hub uses whenever ``hf_xet`` is installed: another server
needs ``HF_HUB_DISABLE_XET=1`` in the environment before huggingface_hub is imported.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx2
from huggingface_hub import HfApi, ModelCard, RepoCard, constants
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

from .cards import ModelCardInfo, build_model_card

logger = logging.getLogger(__name__)

STAGE_BRANCHES = ("stage-1-teacher", "stage-2-distill", "stage-3-esp-medsam")
MAIN_BRANCH = "main"
HUB_ENDPOINT = "https://huggingface.co"
# Folders that are local tool state, never part of a model.
_SKIPPED_DIRS = (".git", ".cache", "__pycache__", ".ipynb_checkpoints")
T = TypeVar("T")


class HubUnavailableError(ConnectionError):
    """The Hub endpoint did not answer (server down, wrong HF_ENDPOINT, no network)."""


class PublishError(RuntimeError):
    """Publishing stopped part way: ``uploaded`` maps done branches to commit ids, ``not_uploaded`` lists the rest."""

    def __init__(self, message: str, uploaded: dict[str, str], not_uploaded: list[str]) -> None:
        super().__init__(message)
        self.uploaded = uploaded
        self.not_uploaded = not_uploaded


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: waits ``base_wait_s``, then doubles up to ``max_wait_s``, for ``attempts`` tries in all."""

    attempts: int = 5
    base_wait_s: float = 1.0
    max_wait_s: float = 16.0


@dataclass
class StageRelease:
    """One branch to publish: the saved model folder and (optionally) what its model card shows.

    With ``delete_stale`` (the default) the same commit removes files the branch holds that the folder does not
    (e.g. the shards of an earlier, sharded save), so that the branch mirrors the folder. ``allow_patterns``
    (``upload_folder``'s) publishes only the matching files of the folder; ``extra_files`` (name -> content) and
    the card are added to them.
    """

    branch: str
    folder: Path
    card: ModelCardInfo | ModelCard | None = None
    commit_message: str | None = None
    extra_files: dict[str, bytes] = field(default_factory=dict)
    delete_stale: bool = True
    allow_patterns: list[str] | None = None


def is_transient(err: BaseException) -> bool:
    """Whether retrying ``err`` can help: server errors, rate limits, connection drops and timeouts."""
    if isinstance(err, HfHubHTTPError) and err.response is not None:
        return err.response.status_code >= 500 or err.response.status_code == 429
    return isinstance(err, (httpx2.TransportError, ConnectionError, TimeoutError))


def with_retries(fn: Callable[[], T], what: str, policy: RetryPolicy) -> T:
    """Call ``fn`` until it succeeds or fails with a non-transient error or ``policy.attempts`` is used up."""
    wait = policy.base_wait_s
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except Exception as err:
            if not is_transient(err) or attempt == policy.attempts:
                raise
            logger.warning("%s failed (%s: %s); retry %d/%d in %.1f s",
                           what, type(err).__name__, _short(err), attempt, policy.attempts - 1, wait)
            time.sleep(wait)
            wait = min(policy.max_wait_s, wait * 2)
    raise AssertionError("unreachable: the loop returns or raises")


def _short(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _check_folder(folder: Path) -> None:
    """``folder`` exists and holds a file to publish (checked before the first request)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist or is not a folder")
    skipped = set(_SKIPPED_DIRS)
    if not any(p.is_file() and not skipped.intersection(p.relative_to(folder).parts) for p in folder.rglob("*")):
        raise FileNotFoundError(f"model folder {folder} holds no files to publish")


def _generated_files(release: StageRelease, repo_id: str, branches: list[str] | None = None) -> dict[str, bytes]:
    """What the commit adds to the folder's files: ``extra_files`` and the model card as README.md (naming
    ``branches``, the repository's branches once published, when known)."""
    card = release.card
    if isinstance(card, ModelCardInfo):
        if card.stage != release.branch:
            raise ValueError(f"the card for branch {release.branch!r} describes stage {card.stage!r}")
        card.repo_id = card.repo_id or repo_id
        card = build_model_card(dataclasses.replace(card, branches=branches or card.branches))
    readme = {"README.md": str(card).encode()} if card is not None else {}
    return {**release.extra_files, **readme}


@contextmanager
def _mirror(folder: Path, generated: dict[str, bytes]) -> Iterator[Path]:
    """A temporary mirror of ``folder`` made of symbolic links (nothing is copied, local tool state is left out),
    with the ``generated`` files written over it; removed when the block ends."""
    with tempfile.TemporaryDirectory(prefix="esp-medsam-publish-") as temporary:
        mirror = Path(temporary) / "folder"  # not folder.name: "." has none
        shutil.copytree(folder, mirror, ignore=shutil.ignore_patterns(*_SKIPPED_DIRS),
                        copy_function=lambda source, target: os.symlink(os.path.realpath(source), target))
        for name, data in generated.items():
            path = mirror / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)
            path.write_bytes(data)
        yield mirror


def _check_reachable(api: HfApi, repo_id: str, policy: RetryPolicy) -> None:
    try:
        with_retries(lambda: api.list_repo_refs(repo_id), f"contacting {api.endpoint}", policy)
    except RepositoryNotFoundError:
        return
    except Exception as err:
        if is_transient(err):
            raise HubUnavailableError(
                f"the Hub at {api.endpoint} is not reachable ({type(err).__name__}: {_short(err)}); "
                "is the server running and HF_ENDPOINT right? Nothing was uploaded."
            ) from err
        raise


def _check_xet(api: HfApi, branches: list[str]) -> None:
    """Refuse before any upload when huggingface_hub would speak Xet to a server that is not the Hub."""
    if api.endpoint.rstrip("/") == HUB_ENDPOINT or constants.HF_HUB_DISABLE_XET:
        return
    if importlib.util.find_spec("hf_xet") is not None:
        raise PublishError(
            f"{api.endpoint} is not the Hugging Face Hub, and huggingface_hub uploads through Xet (hf_xet is "
            "installed), which only the Hub speaks: set HF_HUB_DISABLE_XET=1 in the environment before Python "
            "starts (`esp-medsam hub start` prints it). Nothing was uploaded.",
            uploaded={}, not_uploaded=branches,
        )


def publish_model(
    repo_id: str,
    releases: Sequence[StageRelease],
    *,
    api: HfApi | None = None,
    private: bool | None = None,
    repo_type: str = "model",
    retry: RetryPolicy = RetryPolicy(),
) -> dict[str, str]:
    """Create ``repo_id`` if needed and commit each release to its branch, in order; returns branch -> commit id.

    Branches other than ``main`` are created from ``main`` when missing. On failure, raises PublishError naming the
    branches that were and were not uploaded (local files are never modified).
    """
    api = api or HfApi()
    releases = list(releases)
    if not releases:
        raise ValueError("nothing to publish: give at least one StageRelease")
    if len({r.branch for r in releases}) != len(releases):
        branches = [r.branch for r in releases]
        raise ValueError(f"each branch may be published once per call, got {branches}")
    # validate everything locally before the first request, so bad input never leaves a half-published repo
    plans = []
    for release in releases:
        _check_folder(Path(release.folder))
        plans.append((release, _generated_files(release, repo_id)))
    return _publish(api, repo_id, plans, private=private, repo_type=repo_type, retry=retry)


def _publish(
    api: HfApi, repo_id: str, plans: list, *, private: bool | None, repo_type: str, retry: RetryPolicy
) -> dict[str, str]:
    branches = [release.branch for release, _ in plans]
    _check_reachable(api, repo_id, retry)
    _check_xet(api, branches)
    with_retries(lambda: api.create_repo(repo_id, private=private, repo_type=repo_type, exist_ok=True),
                 f"creating {repo_id}", retry)
    present = _branches_after(api, repo_id, branches, repo_type=repo_type, retry=retry)
    plans = [(release, _generated_files(release, repo_id, present)) for release, _ in plans]
    uploaded: dict[str, str] = {}
    for index, (release, generated) in enumerate(plans):
        branch = release.branch
        try:
            commit = _upload(api, repo_id, release, generated, repo_type=repo_type, retry=retry)
        except Exception as err:
            not_uploaded = branches[index:]
            raise PublishError(
                f"publishing {repo_id} to {api.endpoint} failed on branch {branch!r} "
                f"({type(err).__name__}: {_short(err)}). "
                f"Uploaded: {_describe(uploaded)}. Not uploaded: {', '.join(not_uploaded)} "
                f"(no commit was made on {branch!r}; a commit is all or nothing). Local files were not modified.",
                uploaded=dict(uploaded), not_uploaded=not_uploaded,
            ) from err
        uploaded[branch] = commit
        logger.info("published %s to %s@%s (commit %s)", release.folder, repo_id, branch, commit[:12])
    return uploaded


def _branches_after(api: HfApi, repo_id: str, branches: list[str], *, repo_type: str,
                    retry: RetryPolicy) -> list[str]:
    """The branches ``repo_id`` will have once ``branches`` are published: the stage branches first, in order."""
    refs = with_retries(lambda: api.list_repo_refs(repo_id, repo_type=repo_type), f"listing {repo_id}'s branches",
                        retry)
    names = {ref.name for ref in refs.branches} | set(branches)
    known = [name for name in (*STAGE_BRANCHES, MAIN_BRANCH) if name in names]
    return known + sorted(names - set(known))


def _upload(
    api: HfApi, repo_id: str, release: StageRelease, generated: dict[str, bytes], *, repo_type: str,
    retry: RetryPolicy,
) -> str:
    """One release in one commit on its branch (created from ``main`` when missing); returns the commit id."""
    branch = release.branch
    if branch != MAIN_BRANCH:
        with_retries(lambda: api.create_branch(repo_id, branch=branch, repo_type=repo_type, exist_ok=True),
                     f"creating branch {branch}", retry)
    message = release.commit_message or f"Upload {branch} from {Path(release.folder).name}"
    allowed = None if release.allow_patterns is None else [*release.allow_patterns, *generated]
    with _mirror(Path(release.folder), generated) as folder:
        info = with_retries(
            lambda: api.upload_folder(
                repo_id=repo_id, folder_path=folder, revision=branch, repo_type=repo_type, commit_message=message,
                allow_patterns=allowed, delete_patterns="*" if release.delete_stale else None,
            ),
            f"uploading {release.folder} to {repo_id}@{branch}", retry,
        )
    return info.oid


def _describe(uploaded: dict[str, str]) -> str:
    return ", ".join(f"{b} (commit {c[:12]})" for b, c in uploaded.items()) or "nothing"


def publish_dataset(
    repo_id: str,
    folder: str | Path,
    *,
    card: RepoCard | None = None,
    revision: str = MAIN_BRANCH,
    api: HfApi | None = None,
    private: bool | None = None,
    retry: RetryPolicy = RetryPolicy(),
    delete_stale: bool = True,
    allow_patterns: list[str] | None = None,
) -> str:
    """Upload a dataset folder (and its DatasetCard as README.md) to a dataset repo; returns the commit id.

    With ``delete_stale`` the revision ends up holding exactly the folder's files (those matching
    ``allow_patterns`` when given) plus the card.
    """
    release = StageRelease(branch=revision, folder=Path(folder), card=card, delete_stale=delete_stale,
                           allow_patterns=allow_patterns)
    return publish_model(repo_id, [release], api=api, private=private, repo_type="dataset", retry=retry)[revision]

