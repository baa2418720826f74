"""The local Hub's write API: the calls huggingface_hub makes to publish (with ``HF_HUB_DISABLE_XET=1``).

``create_repo``, ``create_branch``/``delete_branch``, ``create_tag``, preupload, the LFS batch API and basic LFS
upload, the NDJSON commit, and README YAML validation, committed into the git repositories olah serves
(``gitrepo.py``) under the repository's lock. The handlers are mixed into ``HubRequestHandler`` (server.py).
"""

from __future__ import annotations

import json
import re

import yaml

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
from .guard import check_repo_name, upload_signature
from .request_body import MAX_COMMIT_BYTES, HubError, body_size, requested_privacy, strict_base64
from .routes import REPO_NAME, REPO_TYPES


class RepoWriteMixin:
    """Handlers (``h_<name>``) of the write routes in ``routes.ROUTES``; they use the request handler's helpers."""

    def h_create_repo(self) -> None:
        data = self._json_body()
        repo_type = REPO_TYPES.get(data.get("type") or "model")
        ns, name = data.get("organization"), data.get("name")
        if (repo_type is None or not ns or not name or not re.fullmatch(REPO_NAME, ns)
                or not re.fullmatch(REPO_NAME, name)):
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
            path, size = str(entry.get("path", "")), body_size(entry.get("size", 0))
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
            oid, size = str(obj.get("oid", "")), body_size(obj.get("size", -1))
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
                    operations.append(FileAdd(path, content=strict_base64(value.get("content", ""), path)))
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
            return body_size(value["size"])
        path = repo.lfs_object(str(value.get("oid")))
        if not path.is_file():
            raise HubError(404, f"LFS object {value.get('oid')} is not in this repository", "EntryNotFound")
        return path.stat().st_size

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
