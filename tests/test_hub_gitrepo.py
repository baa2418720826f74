"""The local Hub's git layer on its own (no servers): commits, LFS objects, branch safety, bad paths."""

from __future__ import annotations

import hashlib
import subprocess

import pytest

from esp_medsam_hf.testing.localhub.gitrepo import (
    GITATTRIBUTES,
    CommitConflict,
    FileAdd,
    GitRepo,
    PathDelete,
    check_repo_path,
    lfs_pointer,
)


@pytest.fixture
def repo(tmp_path) -> GitRepo:
    return GitRepo.create(tmp_path / "models" / "esp" / "unit")


def show(repo: GitRepo, rev: str, path: str) -> bytes:
    cmd = ["git", "-C", str(repo.path), "show", f"{rev}:{path}"]
    return subprocess.run(cmd, capture_output=True, check=True).stdout


def test_create_starts_main_with_gitattributes(repo):
    assert set(repo.branches()) == {"main"}
    assert show(repo, "main", ".gitattributes").decode() == GITATTRIBUTES
    assert "*.safetensors filter=lfs" in GITATTRIBUTES


def test_commit_adds_regular_and_lfs_files_without_touching_the_work_tree(repo):
    data = bytes(range(256)) * 64
    oid = hashlib.sha256(data).hexdigest()
    repo.store_lfs_object(oid, len(data), [data[:1000], data[1000:]])
    head = repo.branch_head("main")
    commit = repo.commit("main", [FileAdd("config.json", content=b"{}"),
                                  FileAdd("w/model.safetensors", lfs_oid=oid, lfs_size=len(data))], "add", head)
    assert repo.branch_head("main") == commit
    assert show(repo, "main", "config.json") == b"{}"
    assert show(repo, "main", "w/model.safetensors") == lfs_pointer(oid, len(data))
    assert repo.lfs_object(oid).read_bytes() == data
    oids = repo.file_oids(commit)
    assert oids["w/model.safetensors"] == oid  # LFS files are reported by their sha256, like the Hub
    assert repo.has_path(commit, "w/model.safetensors") and not repo.has_path(commit, "missing.bin")
    assert sorted(p.name for p in repo.path.iterdir()) == [".git"]  # nothing was checked out


def test_lfs_object_with_wrong_content_is_refused_and_not_kept(repo):
    oid = hashlib.sha256(b"expected").hexdigest()
    with pytest.raises(ValueError, match="expected 8 bytes"):
        repo.store_lfs_object(oid, 8, [b"tampered"])
    assert not repo.lfs_object(oid).exists()
    assert list(repo.lfs_object(oid).parent.iterdir()) == []  # no temp file left behind


def test_commit_of_an_lfs_file_that_was_never_uploaded_fails(repo):
    with pytest.raises(FileNotFoundError, match="was not uploaded"):
        repo.commit("main", [FileAdd("m.safetensors", lfs_oid="a" * 64, lfs_size=3)], "x", repo.branch_head("main"))


def test_delete_file_and_folder(repo):
    head = repo.commit("main", [FileAdd("a/x.txt", content=b"x"), FileAdd("a/y.txt", content=b"y"),
                                FileAdd("b.txt", content=b"b")], "add", repo.branch_head("main"))
    head = repo.commit("main", [PathDelete("b.txt"), PathDelete("a", folder=True)], "delete", head)
    assert set(repo.file_oids(head)) == {".gitattributes"}
    with pytest.raises(FileNotFoundError, match="no such file"):
        repo.commit("main", [PathDelete("b.txt")], "again", head)


def test_branch_moves_only_from_its_expected_parent(repo):
    start = repo.branch_head("main")
    repo.create_branch("stage-1-teacher", start)
    repo.commit("stage-1-teacher", [FileAdd("a.txt", content=b"1")], "first", start)
    with pytest.raises(CommitConflict):
        repo.commit("stage-1-teacher", [FileAdd("a.txt", content=b"2")], "stale parent", start)
    assert show(repo, "stage-1-teacher", "a.txt") == b"1"
    assert repo.branch_head("main") == start


@pytest.mark.parametrize("bad", ["../escape.txt", "/", "a/../../b", ".git/config", "a\\b", ""])
def test_paths_that_escape_the_repository_are_refused(bad):
    with pytest.raises(ValueError, match="invalid path"):
        check_repo_path(bad)


def test_resolve_rejects_unknown_and_option_like_revisions(repo):
    assert repo.resolve("main") == repo.branch_head("main")
    assert repo.resolve("no-such-branch") is None
    assert repo.resolve("--all") is None
