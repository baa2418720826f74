"""Publish trained stages to a Hub repository: one branch per stage, ``main`` for the released model.

Each stage's saved folder (config.json, model.safetensors, preprocessor config, remote-code .py files: whatever it
holds) goes up as is, together with that stage's model card as README.md, in ONE commit on the stage's branch, so a
branch is either fully updated or left as it was. Local files are only read, never written.

Retries: huggingface_hub already retries its preupload and LFS transfers (``http_backoff``); the calls it does not
retry (create repo, create branch, the commit itself) are retried here with exponential backoff on transient
failures (5xx, 429, connection and timeout errors). A retried commit cannot duplicate a file change: the Hub
reports the files it already holds and the client leaves unchanged files out of the commit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx2
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard, RepoCard, constants
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

from .cards import ModelCardInfo, build_model_card

logger = logging.getLogger(__name__)

STAGE_BRANCHES = ("stage-1-teacher", "stage-2-distill", "stage-3-esp-medsam")
MAIN_BRANCH = "main"
# Folders that are local tool state, never part of a model (upload_folder leaves the same ones out).
_SKIPPED_DIRS = {".git", ".cache", "__pycache__", ".ipynb_checkpoints"}
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
    (e.g. the shards of an earlier, sharded save), so that the branch mirrors the folder.
    """

    branch: str
    folder: Path
    card: ModelCardInfo | ModelCard | None = None
    commit_message: str | None = None
    extra_files: dict[str, bytes] = field(default_factory=dict)
    delete_stale: bool = True


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


def folder_operations(folder: Path, readme: bytes | None, extra: dict[str, bytes]) -> list[CommitOperationAdd]:
    """One add operation per file below ``folder`` (read lazily from disk), plus the card and any extra files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist or is not a folder")
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and not _SKIPPED_DIRS.intersection(p.relative_to(folder).parts)
    )
    if not files:
        raise FileNotFoundError(f"model folder {folder} holds no files to publish")
    generated = {**extra, **({"README.md": readme} if readme is not None else {})}
    operations = [
        CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
        for p in files
        if p.relative_to(folder).as_posix() not in generated
    ]
    operations += [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data) for name, data in generated.items()]
    return operations


def _card_bytes(card: ModelCardInfo | RepoCard | None, branch: str, repo_id: str) -> bytes | None:
    if card is None:
        return None
    if isinstance(card, ModelCardInfo):
        if card.stage != branch:
            raise ValueError(f"the card for branch {branch!r} describes stage {card.stage!r}")
        card.repo_id = card.repo_id or repo_id
        card = build_model_card(card)
    return str(card).encode()


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


@contextmanager
def _xet_only_on_the_hub(endpoint: str) -> Iterator[None]:
    """Turn Xet uploads off while talking to a server that is not the Hub (huggingface_hub 2.4 uses Xet whenever
    hf_xet is installed, without asking the server; other servers speak only the LFS protocol)."""
    previous = constants.HF_HUB_DISABLE_XET
    if endpoint.rstrip("/") != constants._HF_DEFAULT_ENDPOINT:
        constants.HF_HUB_DISABLE_XET = True
    try:
        yield
    finally:
        constants.HF_HUB_DISABLE_XET = previous


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
    plans = [(r, folder_operations(r.folder, _card_bytes(r.card, r.branch, repo_id), r.extra_files)) for r in releases]

    with _xet_only_on_the_hub(api.endpoint):
        return _publish(api, repo_id, plans, private=private, repo_type=repo_type, retry=retry)


def _publish(
    api: HfApi, repo_id: str, plans: list, *, private: bool | None, repo_type: str, retry: RetryPolicy
) -> dict[str, str]:
    branches = [release.branch for release, _ in plans]
    _check_reachable(api, repo_id, retry)
    with_retries(lambda: api.create_repo(repo_id, private=private, repo_type=repo_type, exist_ok=True),
                 f"creating {repo_id}", retry)
    uploaded: dict[str, str] = {}
    for index, (release, operations) in enumerate(plans):
        branch = release.branch
        try:
            if branch != MAIN_BRANCH:
                with_retries(
                    lambda: api.create_branch(repo_id, branch=branch, repo_type=repo_type, exist_ok=True),
                    f"creating branch {branch}", retry,
                )
            message = release.commit_message or f"Upload {branch} from {Path(release.folder).name}"
            info = with_retries(
                lambda: api.create_commit(
                    repo_id, commit_message=message, revision=branch, repo_type=repo_type,
                    operations=_fresh(operations) + (
                        _stale(api, repo_id, branch, repo_type, operations) if release.delete_stale else []
                    ),
                ),
                f"uploading {release.folder} to {repo_id}@{branch}", retry,
            )
        except Exception as err:
            not_uploaded = branches[index:]
            raise PublishError(
                f"publishing {repo_id} to {api.endpoint} failed on branch {branch!r} "
                f"({type(err).__name__}: {_short(err)}). "
                f"Uploaded: {_describe(uploaded)}. Not uploaded: {', '.join(not_uploaded)} "
                f"(no commit was made on {branch!r}; a commit is all or nothing). Local files were not modified.",
                uploaded=dict(uploaded), not_uploaded=not_uploaded,
            ) from err
        uploaded[branch] = info.oid
        logger.info("published %s to %s@%s (commit %s)", release.folder, repo_id, branch, info.oid[:12])
    return uploaded


def _stale(
    api: HfApi, repo_id: str, branch: str, repo_type: str, operations: list[CommitOperationAdd]
) -> list[CommitOperationDelete]:
    """Deletions of the files on ``branch`` that this commit does not add (``.gitattributes`` stays)."""
    keep = {op.path_in_repo for op in operations} | {".gitattributes"}
    remote = api.list_repo_files(repo_id, revision=branch, repo_type=repo_type)
    return [CommitOperationDelete(path_in_repo=path) for path in remote if path not in keep]


def _fresh(operations: list[CommitOperationAdd]) -> list[CommitOperationAdd]:
    """New operation objects for each try: huggingface_hub refuses to reuse ones from a finished commit."""
    return [CommitOperationAdd(path_in_repo=op.path_in_repo, path_or_fileobj=op.path_or_fileobj) for op in operations]


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
) -> str:
    """Upload a prepared dataset folder (and its DatasetCard as README.md) to a dataset repo; returns the commit id.

    With ``delete_stale`` the revision ends up holding exactly the folder's files (plus the card).
    """
    release = StageRelease(branch=revision, folder=Path(folder), card=card, delete_stale=delete_stale)
    return publish_model(repo_id, [release], api=api, private=private, repo_type="dataset", retry=retry)[revision]

