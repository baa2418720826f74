"""The local Hub answers huggingface_hub's repository administration calls as the Hub does (issue 23): copies of
LFS files, tag deletion, history squashing, settings, likers, deletion and renaming, with the Hub's status codes;
and a refused request's body is drained so that the next request on a keep-alive connection is parsed right."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json

import pytest
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from test_hub_server import TOKEN, api, create, repo_of, request, server, tree  # noqa: F401 (server: fixture)


def _ndjson(*items: dict) -> bytes:
    return b"\n".join(json.dumps(item).encode() for item in items)


def test_copy_of_an_lfs_file_commits_the_same_object(server):
    client = api(server)
    client.create_repo("esp/copy")
    weights = bytes(range(256)) * 16
    client.upload_file(path_or_fileobj=weights, path_in_repo="model.safetensors", repo_id="esp/copy")
    oid = hashlib.sha256(weights).hexdigest()
    # what huggingface_hub sends for CommitOperationCopy of an LFS file: the source's oid, no size
    body = _ndjson({"key": "header", "value": {"summary": "copy"}},
                   {"key": "lfsFile", "value": {"path": "stage/model.safetensors", "algo": "sha256", "oid": oid}})
    status, _, answer = request(server, "POST", "/api/models/esp/copy/commit/main", body,
                                {"Content-Type": "application/x-ndjson"})
    assert status == 200 and answer["success"]
    repo = repo_of(server, "esp/copy")
    assert "100644 stage/model.safetensors" in tree(repo)
    assert repo.read_blob("main:stage/model.safetensors") == repo.read_blob("main:model.safetensors")
    missing = _ndjson({"key": "header", "value": {"summary": "copy"}},
                      {"key": "lfsFile", "value": {"path": "other.bin", "algo": "sha256", "oid": "0" * 64}})
    status, headers, _ = request(server, "POST", "/api/models/esp/copy/commit/main", missing,
                                 {"Content-Type": "application/x-ndjson"})
    assert status == 404 and headers["X-Error-Code"] == "EntryNotFound"


def test_delete_tag_and_super_squash_history(server):
    client = api(server)
    client.create_repo("esp/admin")
    for index in range(3):
        client.upload_file(path_or_fileobj=f"v{index}".encode(), path_in_repo="notes.txt", repo_id="esp/admin")
    client.create_tag("esp/admin", tag="v1")
    client.delete_tag("esp/admin", tag="v1")
    assert "v1" not in repo_of(server, "esp/admin").tags()
    with pytest.raises(RevisionNotFoundError):
        client.delete_tag("esp/admin", tag="v1")
    with pytest.raises(RepositoryNotFoundError):
        client.delete_tag("esp/absent", tag="v1")

    repo = repo_of(server, "esp/admin")
    before = tree(repo)
    client.super_squash_history("esp/admin", commit_message="one commit")
    commits = repo.git("log", "--format=%s", "main").splitlines()
    assert commits == ["one commit"] and tree(repo) == before
    assert repo.read_blob("main:notes.txt") == b"v2"
    with pytest.raises(RevisionNotFoundError):
        client.super_squash_history("esp/admin", branch="no-such-branch")


def test_settings_and_likers(server):
    client = api(server)
    client.create_repo("esp/settings")
    client.update_repo_settings("esp/settings", gated=False)  # what the local Hub is: accepted
    with pytest.raises(HfHubHTTPError) as refused:
        client.update_repo_settings("esp/settings", gated="auto")
    assert refused.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as refused:
        client.update_repo_settings("esp/settings", private=True)
    assert refused.value.response.status_code == 403
    with pytest.raises(RepositoryNotFoundError):
        client.update_repo_settings("esp/absent", gated=False)
    assert list(client.list_repo_likers("esp/settings")) == []
    with pytest.raises(RepositoryNotFoundError):
        list(client.list_repo_likers("esp/absent"))


def test_delete_and_move_repo(server):
    client = api(server)
    client.create_repo("esp/old")
    client.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="esp/old")
    client.create_repo("esp/taken")
    with pytest.raises(HfHubHTTPError) as conflict:
        client.move_repo("esp/old", "esp/taken")
    assert conflict.value.response.status_code == 409
    client.move_repo("esp/old", "esp/new")
    assert not repo_of(server, "esp/old").exists() and repo_of(server, "esp/new").read_blob("main:x.txt") == b"x"
    with pytest.raises(RepositoryNotFoundError):
        client.move_repo("esp/old", "esp/other")
    client.delete_repo("esp/new")
    assert not repo_of(server, "esp/new").exists()
    with pytest.raises(RepositoryNotFoundError):
        client.delete_repo("esp/new")
    client.delete_repo("esp/new", missing_ok=True)
    with pytest.raises(HfHubHTTPError) as bad:
        client.move_repo("esp/taken", "esp/bad..name")
    assert bad.value.response.status_code == 400


def test_a_refused_body_is_drained_and_the_connection_kept(server):
    create(server)
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    body = json.dumps({"files": [{"path": "a.bin", "size": 1, "sample": base64.b64encode(b"a").decode()}]})
    conn.request("POST", "/api/models/esp/absent/preupload/main", body=body, headers=headers)  # 404 before reading
    first = conn.getresponse()
    first.read()
    assert first.status == 404 and first.getheader("Connection") != "close"
    conn.request("GET", "/_local/health")  # same connection: parsed from its own request line
    second = conn.getresponse()
    assert second.status == 200 and json.loads(second.read())
    conn.request("DELETE", "/api/repos/delete", body=json.dumps({"name": "none", "organization": "esp"}),
                 headers=headers)
    third = conn.getresponse()
    third.read()
    assert third.status == 404
    conn.request("GET", "/_local/health")
    assert conn.getresponse().status == 200
    conn.close()
