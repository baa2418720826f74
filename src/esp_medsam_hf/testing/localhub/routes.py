"""The local Hub's URL table: (method, path pattern, handler) in the order they are tried, first match wins.

A route's handler is the request handler's method ``h_<handler>`` (server.py, with the mixins of read_routes.py,
write_routes.py and admin.py); the pattern's named groups are its arguments, ``type`` (the repository kind's
folder: models, datasets, spaces), ``ns``/``name`` (the repository), ``rev`` and ``path``. A path that no route
parses is answered 404 and never forwarded to olah.
"""

from __future__ import annotations

import re

REPO_TYPES = {"model": "models", "dataset": "datasets", "space": "spaces"}
"""A request's repository ``type`` (as huggingface_hub sends it) -> the folder of its kind."""
REPO_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
"""A namespace or repository name in a URL or a create body (``guard.check_repo_name`` then applies the Hub's rule)."""
_T = r"(?P<type>models|datasets|spaces)"
_REPO = rf"(?P<ns>{REPO_NAME})/(?P<name>{REPO_NAME})"
_PREFIX = r"(?:(?P<type>datasets|spaces)/)?"
ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    (m, re.compile(p), h)
    for m, p, h in [
        ("POST", r"/api/repos/create", "create_repo"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("GET", r"/api/agent-harnesses", "not_found"),
        ("POST", rf"/api/{_T}/{_REPO}/branch/(?P<rev>[^/]+)", "create_branch"),
        ("DELETE", rf"/api/{_T}/{_REPO}/branch/(?P<rev>[^/]+)", "delete_branch"),
        ("POST", rf"/api/{_T}/{_REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
        ("POST", rf"/api/{_T}/{_REPO}/commit/(?P<rev>[^/]+)", "commit"),
        ("POST", rf"/{_PREFIX}{_REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
        ("PUT", rf"/_lfs/{_T}/{_REPO}/(?P<oid>[0-9a-f]{{64}})/(?P<size>[0-9]+)", "lfs_put"),
        ("GET", r"/_local/health", "health"),
        ("POST", r"/_local/faults", "set_faults"),
        # read side answered from git (olah leaves these empty or broken; see repoinfo.py)
        ("GET", r"/api/whoami-v2", "whoami"),
        ("GET", rf"/api/{_T}", "list_repos"),
        ("GET", rf"/api/{_T}/{_REPO}/revision/(?P<rev>[^/]+)", "repo_info"),
        ("GET", rf"/api/{_T}/{_REPO}/commits/(?P<rev>[^/]+)", "repo_commits"),
        ("POST", rf"/api/{_T}/{_REPO}/tag/(?P<rev>[^/]+)", "create_tag"),
        ("GET", rf"/api/{_T}/{_REPO}/discussions(?:/.*)?", "discussions"),
        ("POST", rf"/api/{_T}/{_REPO}/discussions(?:/.*)?", "discussions"),
        # read side: validated here, then proxied to olah
        ("GET", rf"/api/{_T}/{_REPO}", "read_repo_info"),
        ("GET", rf"/api/{_T}/{_REPO}/refs", "read_repo"),
        ("GET", rf"/api/{_T}/{_REPO}/tree/(?P<rev>[^/]+)/(?P<path>.+)", "read_tree_path"),
        ("GET", rf"/api/{_T}/{_REPO}/(?:revision|tree|commits)/(?P<rev>[^/]+)(?:/.*)?", "read_revision"),
        ("POST", rf"/api/{_T}/{_REPO}/paths-info/(?P<rev>[^/]+)", "read_revision"),
        ("GET", rf"/{_PREFIX}{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "read_file"),
        # repository administration (admin.py)
        ("DELETE", rf"/api/{_T}/{_REPO}/tag/(?P<rev>[^/]+)", "delete_tag"),
        ("POST", rf"/api/{_T}/{_REPO}/super-squash/(?P<rev>[^/]+)", "super_squash"),
        ("PUT", rf"/api/{_T}/{_REPO}/settings", "repo_settings"),
        ("GET", rf"/api/{_T}/{_REPO}/likers", "repo_likers"),
        ("DELETE", r"/api/repos/delete", "delete_repo"),
        ("POST", r"/api/repos/move", "move_repo"),
    ]
]
