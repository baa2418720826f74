"""What the Hub's read API reports about a repository, computed from the local Hub's git repositories.

olah (the read-side mirror) answers file downloads well but leaves the metadata routes empty or broken: its repo
info has no card metadata, safetensors summary or file sizes, its commit list lacks the ``authors`` field, and it
has no ``/api/models`` listing. These functions give the JSON the Hub gives for ``model_info``/``dataset_info``
(``?blobs=True`` included), ``list_repo_commits`` and ``list_models``/``list_datasets``, so that huggingface_hub's
client parses it as it parses the Hub's.
"""

from __future__ import annotations

import json
import re
import struct
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from .gitrepo import LFS_POINTER_RE, GitRepo

REPO_KINDS = {"models": "model", "datasets": "dataset", "spaces": "space"}
_CARD_RE = re.compile(r"\A\s*---\n(.*?)\n---", flags=re.S)
_SAFETENSORS_HEADER_LIMIT = 100 * 1024 * 1024


def _commit_date(repo: GitRepo, commit: str) -> str:
    return repo.git("show", "-s", "--format=%cI", commit).strip()


def _iso(date: str) -> str:
    """git's ISO 8601 date (``2026-11-28T21:00:00+00:00``) in the Hub's form (``2026-11-28T21:00:00.000Z``)."""
    return datetime.fromisoformat(date).astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def list_files(repo: GitRepo, commit: str) -> list[dict[str, Any]]:
    """The Hub's ``siblings`` with ``?blobs=True``: path, size (the real size for LFS files), blob id, LFS info."""
    files = []
    for line in repo.git("ls-tree", "-r", "-l", "-z", commit).split("\0"):
        if not line:
            continue
        meta, path = line.split("\t", 1)
        _mode, _type, blob, size = meta.split()
        entry: dict[str, Any] = {"rfilename": path, "size": int(size), "blobId": blob}
        if 100 < int(size) < 200:
            match = LFS_POINTER_RE.fullmatch(repo.read_blob(blob))
            if match:
                lfs_size = int(match.group(2))
                entry["size"] = lfs_size
                entry["lfs"] = {"sha256": match.group(1).decode(), "size": lfs_size, "pointerSize": int(size)}
        files.append(entry)
    return files


def _read(repo: GitRepo, commit: str, path: str) -> bytes:
    return repo.read_blob(f"{commit}:{path}")


def card_metadata(repo: GitRepo, commit: str, files: list[dict[str, Any]]) -> dict[str, Any]:
    """The YAML front matter of the revision's README.md ({} when there is none or it is not a mapping)."""
    if not any(f["rfilename"] == "README.md" for f in files):
        return {}
    match = _CARD_RE.match(_read(repo, commit, "README.md").decode(errors="replace"))
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _safetensors_header(repo: GitRepo, commit: str, entry: dict[str, Any]) -> dict[str, Any]:
    if "lfs" in entry:
        path = repo.lfs_object(entry["lfs"]["sha256"])
        if not path.is_file():
            return {}
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
            raw = handle.read(length) if 0 < length <= _SAFETENSORS_HEADER_LIMIT else b""
    else:
        data = repo.read_blob(entry["blobId"])
        length = struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else 0
        raw = data[8 : 8 + length]
    try:
        header = json.loads(raw) if raw else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return header if isinstance(header, dict) else {}


def safetensors_info(repo: GitRepo, commit: str, files: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The Hub's ``safetensors`` summary: parameter count per dtype over all .safetensors files, and the total."""
    counts: dict[str, int] = {}
    for entry in files:
        if not entry["rfilename"].endswith(".safetensors"):
            continue
        for name, tensor in _safetensors_header(repo, commit, entry).items():
            if name == "__metadata__" or not isinstance(tensor, dict):
                continue
            size = 1
            for dim in tensor.get("shape", []):
                size *= int(dim)
            counts[tensor.get("dtype", "unknown")] = counts.get(tensor.get("dtype", "unknown"), 0) + size
    return {"parameters": counts, "total": sum(counts.values())} if counts else None


def _tags(card: dict[str, Any], files: list[dict[str, Any]], config: dict[str, Any]) -> list[str]:
    """Tags as the Hub derives them: library, card tags, file formats, custom code, license, datasets, base model."""
    tags: list[str] = []
    if card.get("library_name"):
        tags.append(str(card["library_name"]))
    card_tags = card.get("tags") or []
    tags += [str(t) for t in (card_tags if isinstance(card_tags, list) else [card_tags])]
    if any(f["rfilename"].endswith(".safetensors") for f in files):
        tags.append("safetensors")
    if config.get("model_type"):
        tags.append(str(config["model_type"]))
    if config.get("auto_map"):
        tags.append("custom_code")
    if card.get("pipeline_tag"):
        tags.append(str(card["pipeline_tag"]))
    if card.get("license"):
        tags.append(f"license:{card['license']}")
    datasets = card.get("datasets") or []
    tags += [f"dataset:{d}" for d in (datasets if isinstance(datasets, list) else [datasets])]
    base = card.get("base_model") or []
    tags += [f"base_model:{b}" for b in (base if isinstance(base, list) else [base])]
    return list(dict.fromkeys(tags))


def repo_info(repo: GitRepo, kind: str, repo_id: str, commit: str, *, blobs: bool = False) -> dict[str, Any]:
    """The Hub's answer to ``GET /api/{kind}/{repo_id}[/revision/{rev}]`` for ``commit``."""
    files = list_files(repo, commit)
    card = card_metadata(repo, commit, files)
    config: dict[str, Any] = {}
    if kind == "models" and any(f["rfilename"] == "config.json" for f in files):
        try:
            full = json.loads(_read(repo, commit, "config.json"))
            config = {k: full[k] for k in ("architectures", "model_type", "auto_map") if k in full}
        except (json.JSONDecodeError, UnicodeDecodeError):
            config = {}
    first = repo.git("rev-list", "--max-parents=0", commit).split()[-1]
    info: dict[str, Any] = {
        "_id": first,
        "id": repo_id,
        "author": repo_id.split("/", 1)[0],
        "sha": commit,
        "lastModified": _iso(_commit_date(repo, commit)),
        "createdAt": _iso(_commit_date(repo, first)),
        "private": repo.private,
        "gated": False,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "tags": _tags(card, files, config),
        "cardData": card or None,
        "siblings": [entry if blobs else {"rfilename": entry["rfilename"]} for entry in files],
        "usedStorage": sum(f["size"] for f in files),
    }
    if kind == "models":
        info["modelId"] = repo_id
        info["library_name"] = card.get("library_name")
        info["pipeline_tag"] = card.get("pipeline_tag")
        info["config"] = config or None
        info["safetensors"] = safetensors_info(repo, commit, files)
        if card.get("model-index"):
            info["model-index"] = card["model-index"]
    return info


def repo_commits(repo: GitRepo, commit: str) -> list[dict[str, Any]]:
    """The Hub's commit list (newest first) for ``GET /api/{kind}/{repo_id}/commits/{rev}``."""
    out = repo.git("log", "--format=%H%x00%an%x00%cI%x00%s%x00%b%x1e", commit)
    commits = []
    for record in out.split("\x1e"):
        record = record.strip("\n")
        if not record:
            continue
        oid, author, date, title, body = record.split("\x00", 4)
        commits.append({"id": oid, "title": title, "message": body.strip(), "date": _iso(date),
                        "authors": [{"user": author}]})
    return commits


def list_repos(
    root: Path, kind: str, query: dict[str, list[str]], *, include_private: bool = False
) -> list[dict[str, Any]]:
    """``GET /api/models`` (or datasets, spaces): the repositories under ``root``, filtered as the Hub filters by
    ``search`` (substring of the id), ``author``, ``filter`` (tags, all required) and ``pipeline_tag``; ``limit``.
    Private repositories are listed only with ``include_private`` (a caller with the hub's token)."""
    search = (query.get("search") or [""])[0].lower()
    author = (query.get("author") or [None])[0]
    wanted_tags = set(query.get("filter") or [])
    pipeline_tag = (query.get("pipeline_tag") or [None])[0]
    limit = (query.get("limit") or [None])[0]
    answers = []
    for path in sorted((root / kind).glob("*/*")):
        repo = GitRepo(path)
        repo_id = f"{path.parent.name}/{path.name}"
        commit = repo.resolve("main") if repo.exists() else None
        if commit is None or search not in repo_id.lower() or (author and path.parent.name != author):
            continue
        if repo.private and not include_private:
            continue
        info = repo_info(repo, kind, repo_id, commit)
        if wanted_tags - set(info["tags"]) or (pipeline_tag and info.get("pipeline_tag") != pipeline_tag):
            continue
        answers.append(info)
        if limit is not None and len(answers) >= int(limit):
            break
    return answers


__all__ = ["REPO_KINDS", "card_metadata", "list_files", "list_repos", "repo_commits", "repo_info",
           "safetensors_info"]
