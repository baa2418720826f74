"""Repository administration on the local Hub: the calls huggingface_hub makes besides commits and reads.

``delete_tag``, ``super_squash_history``, ``update_repo_settings``, ``list_repo_likers``, ``delete_repo`` and
``move_repo`` are answered as the Hub answers them: the same routes, bodies and status codes (404
``RepoNotFound``/``RevisionNotFound`` for what does not exist, 409 for a target that does, 400 for a malformed
body). Visibility (public or private) is changed; settings the local Hub cannot honour (gating and protected
visibility, which need user accounts) are refused with the Hub's 403 for
a setting not allowed to the caller, never silently accepted. The handlers are mixed into ``HubRequestHandler``.
"""

from __future__ import annotations

import shutil

from .guard import check_repo_name
from .request_body import HubError, requested_privacy
from .routes import REPO_TYPES

_VISIBILITIES = ("public", "private", "protected")


class RepoAdminMixin:
    """Handlers (``h_<name>``) of the administration routes in ``routes.ROUTES``; they use the request handler's
    helpers."""

    def h_delete_tag(self, type: str, ns: str, name: str, rev: str) -> None:
        repo = self._existing(type, ns, name)
        with self.server.lock(repo):
            if rev not in repo.tags():
                raise HubError(404, f"Invalid rev id: {rev} (no such tag)", "RevisionNotFound")
            repo.git("tag", "-d", "--", rev)
        self._send_json({"success": True})

    def h_super_squash(self, type: str, ns: str, name: str, rev: str) -> None:
        """One commit holding the branch's current files, with the request's message, replaces its history."""
        repo = self._existing(type, ns, name)
        message = self._json_body().get("message") or f"Super-squash branch '{rev}'"
        with self.server.lock(repo):
            head = repo.branch_head(rev)
            if head is None:
                raise HubError(404, f"Invalid rev id: {rev} (not a branch)", "RevisionNotFound")
            tree = repo.git("rev-parse", f"{head}^{{tree}}").strip()
            env = {"GIT_AUTHOR_NAME": "local", "GIT_AUTHOR_EMAIL": "local@localhost",
                   "GIT_COMMITTER_NAME": "local", "GIT_COMMITTER_EMAIL": "local@localhost"}
            commit = repo.git("commit-tree", tree, "-m", str(message), env=env).strip()
            repo.git("update-ref", f"refs/heads/{rev}", commit, head)
        self._send_json({"commitId": commit})

    def h_repo_settings(self, type: str, ns: str, name: str) -> None:
        repo = self._existing(type, ns, name)
        body = self._json_body()
        unknown = sorted(set(body) - {"gated", "private", "visibility", "discussionsDisabled"})
        if unknown:
            raise HubError(400, f"unknown repository settings {unknown}")
        if body.get("gated") not in (None, False, "auto", "manual"):
            raise HubError(400, f"invalid gated status {body['gated']!r}: expected 'auto', 'manual' or false")
        if body.get("visibility") not in (None, *_VISIBILITIES):
            raise HubError(400, f"invalid visibility {body['visibility']!r}: expected one of {_VISIBILITIES}")
        if body.get("gated") in ("auto", "manual"):
            raise HubError(403, "gated access needs user accounts, which the local Hub does not have")
        if body.get("visibility") == "protected":
            raise HubError(403, "protected visibility needs user accounts, which the local Hub does not have")
        private = requested_privacy(body)
        if private is not None:
            repo.set_private(private)
        self._send_json({"success": True})

    def h_repo_likers(self, type: str, ns: str, name: str) -> None:
        """Nobody: the local Hub has no user accounts (an empty page, as for a repository without likes)."""
        self._existing(type, ns, name)
        self._send_json([])

    def _repo_from_body(self, ns_key: str | None, name_key: str, body: dict) -> tuple[str, str, str]:
        """(type folder, namespace, name) named by a repos/delete or repos/move body; 400 when malformed."""
        repo_type = REPO_TYPES.get(body.get("type") or "model")
        if ns_key is None:
            ns, _, name = str(body.get(name_key) or "").partition("/")
        else:
            ns, name = str(body.get(ns_key) or ""), str(body.get(name_key) or "")
        if repo_type is None or not ns or not name or "/" in name:
            raise HubError(400, f"expected a repository id 'namespace/name' and a type in {sorted(REPO_TYPES)}, "
                           f"got {body!r}")
        check_repo_name(ns, name)
        return repo_type, ns, name

    def h_delete_repo(self) -> None:
        """Remove the repository's git folder (only repositories this Hub created live there)."""
        repo_type, ns, name = self._repo_from_body("organization", "name", self._json_body())
        repo = self._existing(repo_type, ns, name)
        with self.server.lock(repo):
            shutil.rmtree(repo.path)
        self._send_json({"success": True})

    def h_move_repo(self) -> None:
        """Rename a repository (within its type); 409 when the target exists."""
        body = self._json_body()
        repo_type, ns, name = self._repo_from_body(None, "fromRepo", body)
        target_type, to_ns, to_name = self._repo_from_body(None, "toRepo", body)
        source = self._existing(repo_type, ns, name)
        target = self.server.repo(target_type, to_ns, to_name)
        with self.server.lock(source), self.server.lock(target):
            if target.exists():
                raise HubError(409, f"You already have a repository named {to_ns}/{to_name}")
            target.path.parent.mkdir(parents=True, exist_ok=True)
            source.path.rename(target.path)
        self._send_json({"success": True})
