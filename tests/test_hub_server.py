"""The local Hub's write server refuses what a hostile page or client could send (issue 13): no token or a wrong
one, other origins and hosts, form/text bodies, control characters and git-special names in paths, branches and
repository names, stalled bodies. The write server runs in this process (its read side, olah, is not needed: the
checks are on the write API, and the result is read from the git repositories directly)."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import threading

import pytest
from huggingface_hub import CommitOperationAdd, HfApi, constants
from huggingface_hub.errors import BadRequestError, HfHubHTTPError

from esp_medsam_hf.testing.localhub.gitrepo import FileAdd, GitRepo, PathDelete, check_repo_path
from esp_medsam_hf.testing.localhub.guard import GuardError, check_branch_name, new_token
from esp_medsam_hf.testing.localhub.server import LocalHubServer

TOKEN = new_token()


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    srv = LocalHubServer(tmp_path / "repos", 0, tmp_path / "olah.sock", token=TOKEN, body_timeout_s=0.5)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def request(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            token: str | None = TOKEN) -> tuple[int, dict, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    all_headers = {"Content-Type": "application/json"} if body is not None else {}
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    all_headers.update(headers or {})
    conn.request(method, path, body=body, headers=all_headers)
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), json.loads(payload or b"{}")


def repo_of(server, name: str = "esp/target") -> GitRepo:
    ns, repo = name.split("/")
    return server.repo("models", ns, repo)


def create(server, name: str = "esp/target") -> GitRepo:
    ns, repo = name.split("/")
    status, _, _ = request(server, "POST", "/api/repos/create", json.dumps({"organization": ns, "name": repo}).encode())
    assert status == 200
    return repo_of(server, name)


def tree(repo: GitRepo, rev: str = "main") -> list[str]:
    """``mode path`` of every entry of ``rev`` (submodule entries and symlinks would show their own modes)."""
    out = subprocess.run(["git", "-C", str(repo.path), "ls-tree", "-r", "-z", rev], capture_output=True, check=True)
    entries = [line.decode().split("\t", 1) for line in out.stdout.split(b"\0") if line]
    return sorted(f"{meta.split()[0]} {path}" for meta, path in entries)


def api(server, token: str | None = TOKEN) -> HfApi:
    return HfApi(endpoint=f"http://127.0.0.1:{server.server_address[1]}", token=token)


def test_huggingface_hub_writes_with_the_token(server):
    client = api(server)
    client.create_repo("esp/ok")
    client.upload_file(path_or_fileobj=b"hello", path_in_repo="a/b.txt", repo_id="esp/ok")
    client.upload_file(path_or_fileobj=b"\0" * 2048, path_in_repo="w.safetensors", repo_id="esp/ok")  # LFS route
    client.create_branch("esp/ok", branch="stage-1-teacher")
    client.delete_branch("esp/ok", branch="stage-1-teacher")
    repo = repo_of(server, "esp/ok")
    assert tree(repo) == ["100644 .gitattributes", "100644 a/b.txt", "100644 w.safetensors"]
    assert set(repo.branches()) == {"main"}


@pytest.mark.parametrize("token", [None, "hf_local_hub", TOKEN + "x"])
def test_writes_without_the_right_token_are_refused(server, token):
    repo = create(server, "esp/guarded")
    head = repo.branch_head("main")
    client = api(server, token=token) if token else HfApi(endpoint=api(server).endpoint, token=False)
    with pytest.raises(HfHubHTTPError) as info:
        client.create_repo("esp/other")
    assert info.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError, match="401"):
        client.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="esp/guarded")
    with pytest.raises(HfHubHTTPError, match="401"):
        client.create_branch("esp/guarded", branch="planted")
    api(server).create_branch("esp/guarded", branch="keep")
    with pytest.raises(HfHubHTTPError, match="401"):
        client.delete_branch("esp/guarded", branch="keep")
    head = repo.branches()
    assert not repo_of(server, "esp/other").exists()
    assert repo.branches() == head and set(head) == {"main", "keep"}


def test_branch_deletion_and_faults_need_the_token(server):
    repo = create(server)
    api(server).create_branch("esp/target", branch="keep")
    status, headers, body = request(server, "DELETE", "/api/models/esp/target/branch/keep", token=None)
    assert status == 401 and "hub start" in body["hint"]
    assert request(server, "POST", "/_local/faults", b'{"faults": []}', token="wrong")[0] == 401
    assert "keep" in repo.branches()


def test_lfs_upload_url_must_carry_its_signature(server):
    create(server)
    oid = "a" * 64
    for query in ("", "?sig=" + "0" * 64):
        status, _, _ = request(server, "PUT", f"/_lfs/models/esp/target/{oid}/3{query}", b"abc",
                               {"Content-Type": "application/octet-stream"}, token=None)
        assert status == 401
    assert not repo_of(server).lfs_object(oid).exists()


@pytest.mark.parametrize("headers,status", [
    ({"Origin": "http://evil.example"}, 403),
    ({"Origin": "null"}, 403),
    ({"Sec-Fetch-Site": "cross-site"}, 403),
    ({"Host": "evil.example:80"}, 403),
    ({"Content-Type": "text/plain"}, 415),
    ({"Content-Type": "application/x-www-form-urlencoded"}, 415),
    ({"Content-Type": "multipart/form-data; boundary=x"}, 415),
])
def test_cross_site_requests_are_refused_even_with_the_token(server, headers, status):
    body = json.dumps({"organization": "esp", "name": "from-a-web-page"}).encode()
    got, _, answer = request(server, "POST", "/api/repos/create", body, headers)
    assert got == status, answer
    assert not repo_of(server, "esp/from-a-web-page").exists()


def test_same_origin_is_accepted(server):
    port = server.server_address[1]
    body = json.dumps({"organization": "esp", "name": "same-origin"}).encode()
    assert request(server, "POST", "/api/repos/create", body, {"Origin": f"http://127.0.0.1:{port}"})[0] == 200


def _commit(server, path: str, rev: str = "main") -> tuple[int, dict]:
    lines = [{"key": "header", "value": {"summary": "attack"}},
             {"key": "file", "value": {"path": path, "content": "eA==", "encoding": "base64"}}]
    body = "\n".join(json.dumps(line) for line in lines).encode()
    status, _, answer = request(server, "POST", f"/api/models/esp/target/commit/{rev}", body,
                                {"Content-Type": "application/x-ndjson"})
    return status, answer


@pytest.mark.parametrize("path", [
    "x\n120000 1234567890123456789012345678901234567890\tlink",  # a forged index entry: a symlink
    "x\n160000 1234567890123456789012345678901234567890\tsub",  # a forged submodule
    "a\tb", "nul\0byte", ".GIT/config", "sub/.git/hooks/x", "a/../../b", "bell\x07",
])
def test_commit_paths_with_control_characters_or_git_names_are_refused(server, path):
    repo = create(server)
    head = repo.branch_head("main")
    status, answer = _commit(server, path)
    assert status == 400 and "invalid path" in answer["error"]
    assert repo.branch_head("main") == head
    assert tree(repo) == ["100644 .gitattributes"]


def test_huggingface_hub_gets_bad_request_for_a_newline_path(server):
    create(server)
    with pytest.raises(BadRequestError, match="invalid path"):
        api(server).create_commit("esp/target", [CommitOperationAdd("x\n120000 " + "1" * 40 + "\tlink", b"x")],
                                  commit_message="attack")


def test_git_layer_keeps_odd_but_valid_paths_literal(tmp_path):
    repo = GitRepo.create(tmp_path / "r")
    repo.commit("main", [FileAdd("star*.txt", content=b"1"), FileAdd("keep.txt", content=b"2")], "m",
                repo.branch_head("main"))
    repo.commit("main", [PathDelete("star*.txt")], "m", repo.branch_head("main"))
    assert tree(repo) == ["100644 .gitattributes", "100644 keep.txt"]
    with pytest.raises(FileNotFoundError):  # "*" is a name, not a pattern that would delete every file
        repo.commit("main", [PathDelete("*", folder=True)], "m", repo.branch_head("main"))
    assert tree(repo) == ["100644 .gitattributes", "100644 keep.txt"]


@pytest.mark.parametrize("bad", ["line\nbreak", "tab\there", "nul\0"])
def test_git_layer_refuses_control_characters(bad):
    with pytest.raises(ValueError, match="invalid path"):
        check_repo_path(bad)


@pytest.mark.parametrize("branch", ["main%00", "ma%0Ain", "a..b", "HEAD", "-x", ".hidden", "x.lock", "refs%2Fheads%2Fx",
                                    "a%20b", "a@%7Bb", "a~1", "a%5Cb"])
def test_invalid_branch_names_are_bad_requests(server, branch):
    repo = create(server)
    status, headers, answer = request(server, "POST", f"/api/models/esp/target/branch/{branch}", b"{}")
    assert status == 400, answer
    status, _, _ = request(server, "DELETE", f"/api/models/esp/target/branch/{branch}")
    assert status == 400
    assert set(repo.branches()) == {"main"}


@pytest.mark.parametrize("rev", ["main%00", "main%0A", "main%09x"])
def test_nul_or_newline_in_a_revision_is_400_not_500(server, rev):
    create(server)
    status, _, answer = request(server, "POST", f"/api/models/esp/target/preupload/{rev}",
                                json.dumps({"files": []}).encode())
    assert status == 400, answer
    assert _commit(server, "ok.txt", rev)[0] == 400


@pytest.mark.parametrize("name", ["a..b", "a--b", "-a", "a.", "x.git", "é"])
def test_invalid_repo_names_are_refused(server, name):
    status, _, answer = request(server, "POST", "/api/repos/create",
                                json.dumps({"organization": "esp", "name": name}).encode())
    assert status == 400, answer


@pytest.mark.parametrize("branch", ["main", "stage-1-teacher", "feature/x", "v1.0"])
def test_ordinary_branch_names_pass(branch):
    assert check_branch_name(branch) == branch


def test_check_branch_name_refuses_bidi_marks():
    with pytest.raises(GuardError):
        check_branch_name("ma\u202ein")


def test_a_stalled_body_times_out_and_frees_the_thread(server):
    create(server)
    sock = socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10)
    head = (f"POST /api/models/esp/target/preupload/main HTTP/1.1\r\nHost: 127.0.0.1:{server.server_address[1]}\r\n"
            f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{")
    sock.sendall(head.encode())
    answer = b""
    while chunk := sock.recv(4096):  # the server answers 408 and closes: recv returns b"" instead of blocking
        answer += chunk
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408")
    assert request(server, "GET", "/_local/health")[0] == 200


def test_malformed_bodies_are_bad_requests_not_500(server):
    create(server)
    base = "/api/models/esp/target"
    status, _, _ = request(server, "POST", f"{base}/preupload/main",
                           json.dumps({"files": [{"path": "a", "size": "many"}]}).encode())
    assert status == 400
    status, _, _ = request(server, "POST", "/esp/target.git/info/lfs/objects/batch",
                           json.dumps({"operation": "upload", "objects": [{"oid": "a" * 64, "size": [1]}]}).encode(),
                           {"Content-Type": "application/vnd.git-lfs+json"})
    assert status == 400
    status, headers, _ = request(server, "POST", f"{base}/branch/new", json.dumps({"startingPoint": "main\0"}).encode())
    assert status == 404 and headers["X-Error-Code"] == "RevisionNotFound"
    lines = [{"key": "header", "value": {"summary": "x", "parentCommit": "HEAD\n--all"}},
             {"key": "file", "value": {"path": "ok.txt", "content": "eA==", "encoding": "base64"}}]
    status, _, _ = request(server, "POST", f"{base}/commit/main", "\n".join(map(json.dumps, lines)).encode(),
                           {"Content-Type": "application/x-ndjson"})
    assert status == 412
    assert set(repo_of(server).branches()) == {"main"}
    assert tree(repo_of(server)) == ["100644 .gitattributes"]
