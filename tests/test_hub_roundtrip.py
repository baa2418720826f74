"""The Hub round trip on loopback: publish per stage with the real huggingface_hub client to our write server,
read back through olah (refs, snapshot_download, model cards), and the failure cases (unknown revision, missing
repo, server down, interrupted upload). One local Hub is started for the whole module and always stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest
from _hub_helpers import BRANCHES, make_stage_folder, tree_hashes
from huggingface_hub import DatasetCard, HfApi, ModelCard, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

from esp_medsam_hf.hub import (
    DomainResult,
    HubUnavailableError,
    ModelCardInfo,
    PublishError,
    RetryPolicy,
    StageRelease,
    publish_dataset,
    publish_model,
)
from esp_medsam_hf.testing.localhub import LocalHub, LocalHubError
from esp_medsam_hf.testing.localhub.launcher import free_port

FAST = RetryPolicy(attempts=3, base_wait_s=0.05, max_wait_s=0.1)
REPO = "esp/roundtrip"


def card_for(branch: str, index: int) -> ModelCardInfo:
    return ModelCardInfo(
        model_name="esp-medsam-test",
        stage=branch,
        training_config={"epochs": 2 + index, "lr": 1e-4, "stage": branch},
        results=[
            DomainResult("dermoscopy", "ISIC 2018", "isic2018", dice=80.0 + index, hd=90.5 - index,
                         hub_id="esp/isic-2018", hub_config="isic"),
            DomainResult("dermoscopy", "PH2", "ph2", dice=70.25 + index, hd=None, unseen=True, hub_id="esp/ph2"),
        ],
        parameters=28_460_000,
        flops=113.4,
        throughput=12.87,
        throughput_device="A6000",
        image_size=1024,
    )


@pytest.fixture(scope="module")
def api(hub) -> HfApi:
    return HfApi(endpoint=hub.endpoint, token=hub.token)


@pytest.fixture(scope="module")
def published(hub, api, tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    folders = {branch: make_stage_folder(root / branch, seed=i) for i, branch in enumerate(BRANCHES)}
    before = {branch: tree_hashes(folder) for branch, folder in folders.items()}
    releases = [StageRelease(b, folders[b], card_for(b, i)) for i, b in enumerate(BRANCHES)]
    commits = publish_model(REPO, releases, api=api, retry=FAST)
    return {"folders": folders, "before": before, "commits": commits}


def download(hub, tmp_path, repo: str, revision: str, **kwargs) -> Path:
    return Path(snapshot_download(repo, revision=revision, endpoint=hub.endpoint, cache_dir=tmp_path / "cache",
                                  token=hub.token, **kwargs))


def set_faults(hub, *faults: dict) -> None:
    httpx2.post(f"{hub.endpoint}/_local/faults", json={"faults": list(faults)},
                headers={"Authorization": f"Bearer {hub.token}"}).raise_for_status()


def test_refs_list_every_stage_branch(api, published):
    refs = api.list_repo_refs(REPO)
    assert {b.name: b.target_commit for b in refs.branches} == published["commits"]


@pytest.mark.parametrize("branch", BRANCHES)
def test_each_branch_downloads_byte_identical_through_olah(hub, published, tmp_path, branch):
    snapshot = download(hub, tmp_path, REPO, branch)
    folder = published["folders"][branch]
    assert tree_hashes(folder) == published["before"][branch]  # publishing did not touch the local files
    local = tree_hashes(folder)
    remote = {k: v for k, v in tree_hashes(snapshot).items() if k not in ("README.md", ".gitattributes")}
    assert remote == local
    assert snapshot.name == published["commits"][branch]  # the snapshot is the commit the branch points at


@pytest.mark.parametrize("index,branch", list(enumerate(BRANCHES)))
def test_each_card_parses_and_carries_its_metrics(hub, published, tmp_path, index, branch):
    card = ModelCard.load(hf_hub_download(REPO, "README.md", revision=branch, endpoint=hub.endpoint,
                                          cache_dir=tmp_path / "cache"))
    assert card.data.training_stage == branch
    assert card.data.parameters == 28_460_000
    metrics = {(r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert metrics == {
        ("esp/isic-2018", "dice"): 80.0 + index,
        ("esp/isic-2018", "hausdorff_distance"): 90.5 - index,
        ("esp/ph2", "dice"): 70.25 + index,
    }
    assert "not a medical device" in card.text and "arXiv:2407.14153" in card.text
    assert f"epochs: {2 + index}" in card.text


def test_unknown_revision_is_a_clear_error(hub, published, tmp_path):
    with pytest.raises(RevisionNotFoundError, match="stage-9-missing"):
        download(hub, tmp_path, REPO, "stage-9-missing")


def test_missing_repo_is_a_clear_error(hub, api, tmp_path):
    with pytest.raises(RepositoryNotFoundError):
        download(hub, tmp_path, "esp/does-not-exist", "main")
    with pytest.raises(RepositoryNotFoundError):
        api.list_repo_refs("esp/does-not-exist")


def test_missing_file_is_entry_not_found(hub, published, tmp_path):
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "no_such_file.bin", revision="main", endpoint=hub.endpoint, cache_dir=tmp_path)


def test_missing_folder_listing_is_entry_not_found(api, published):
    """transformers lists optional folders (additional_chat_templates) and tolerates only the Hub's 404."""
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree(REPO, path_in_repo="additional_chat_templates", revision="main"))
    listed = {entry.path for entry in api.list_repo_tree(REPO, revision="main")}
    assert "config.json" in listed


def test_transient_faults_are_retried(hub, api, tmp_path):
    folder = make_stage_folder(tmp_path / "retry", seed=42)
    # an LFS upload cut off mid-body (huggingface_hub retries it) and a commit answered 503 (we retry it)
    set_faults(hub, {"route": "lfs-upload", "action": "drop", "times": 1},
               {"route": "commit", "action": "503", "times": 1})
    commits = publish_model("esp/retried", [StageRelease("stage-1-teacher", folder)], api=api, retry=FAST)
    snapshot = download(hub, tmp_path, "esp/retried", "stage-1-teacher")
    assert snapshot.name == commits["stage-1-teacher"]
    assert tree_hashes(folder) == {k: v for k, v in tree_hashes(snapshot).items() if k != ".gitattributes"}


def test_interrupted_upload_says_what_was_uploaded(hub, api, tmp_path):
    folders = {b: make_stage_folder(tmp_path / b, seed=10 + i) for i, b in enumerate(BRANCHES)}
    before = {b: tree_hashes(f) for b, f in folders.items()}
    # the server drops the connection in the middle of every commit to stage-2-distill
    set_faults(hub, {"route": "commit", "action": "drop", "times": 100, "revision": "stage-2-distill"})
    try:
        with pytest.raises(PublishError) as info:
            publish_model("esp/interrupted", [StageRelease(b, folders[b]) for b in BRANCHES], api=api, retry=FAST)
    finally:
        set_faults(hub)
    err = info.value
    assert list(err.uploaded) == ["stage-1-teacher"]
    assert err.not_uploaded == ["stage-2-distill", "stage-3-esp-medsam", "main"]
    assert "Uploaded: stage-1-teacher" in str(err) and "Not uploaded: stage-2-distill" in str(err)
    assert {b: tree_hashes(f) for b, f in folders.items()} == before
    refs = {b.name: b.target_commit for b in api.list_repo_refs("esp/interrupted").branches}
    assert refs["stage-1-teacher"] == err.uploaded["stage-1-teacher"]
    assert refs["stage-2-distill"] == refs["main"]  # created from main, but no commit landed on it
    assert "model.safetensors" not in api.list_repo_files("esp/interrupted", revision="stage-2-distill")


def test_server_down_is_a_clear_error_and_nothing_changes(tmp_path):
    folder = make_stage_folder(tmp_path / "model", seed=3)
    before = tree_hashes(folder)
    api = HfApi(endpoint=f"http://127.0.0.1:{free_port()}", token="hf_local_hub")  # nothing listens there
    with pytest.raises(HubUnavailableError, match="not reachable.*Nothing was uploaded"):
        publish_model("esp/down", [StageRelease("main", folder)], api=api, retry=FAST)
    assert tree_hashes(folder) == before


def test_write_server_killed_midway(tmp_path):
    folders = {b: make_stage_folder(tmp_path / b, seed=20 + i) for i, b in enumerate(BRANCHES[:2])}
    before = {b: tree_hashes(f) for b, f in folders.items()}
    with LocalHub(tmp_path / "hub") as local_hub:
        api = HfApi(endpoint=local_hub.endpoint, token=local_hub.token)
        publish_model("esp/killed", [StageRelease(BRANCHES[0], folders[BRANCHES[0]])], api=api, retry=FAST)
        local_hub.kill_write_server()
        with pytest.raises(HubUnavailableError, match="not reachable"):
            publish_model("esp/killed", [StageRelease(BRANCHES[1], folders[BRANCHES[1]])], api=api, retry=FAST)
    assert {b: tree_hashes(f) for b, f in folders.items()} == before
    assert not (tmp_path / "hub" / "hub.json").exists()


def test_bad_local_input_fails_before_any_request(api, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        publish_model("esp/bad", [StageRelease("main", tmp_path / "missing")], api=api)
    folder = make_stage_folder(tmp_path / "m", seed=1)
    with pytest.raises(ValueError, match="describes stage"):
        publish_model("esp/bad", [StageRelease("main", folder, card_for("stage-2-distill", 0))], api=api)
    with pytest.raises(RepositoryNotFoundError):
        api.list_repo_refs("esp/bad")


def test_dataset_card_and_dataset_repo(hub, api, tmp_path):
    folder = tmp_path / "isic"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "train.parquet").write_bytes(os.urandom(4096))
    (folder / "notes.txt").write_text("not published\n")
    card = DatasetCard("---\nlicense: other\npretty_name: ISIC 2018 (prepared)\n---\n\n# ISIC 2018 (prepared)\n")
    commit = publish_dataset("esp/isic-prepared", folder, card=card, api=api, retry=FAST,
                             allow_patterns=["data/*.parquet"])
    path = Path(snapshot_download("esp/isic-prepared", repo_type="dataset", endpoint=hub.endpoint,
                                  cache_dir=tmp_path / "cache"))
    assert path.name == commit
    assert (path / "data" / "train.parquet").read_bytes() == (folder / "data" / "train.parquet").read_bytes()
    assert not (path / "notes.txt").exists()  # outside allow_patterns
    assert DatasetCard.load(path / "README.md").data.pretty_name == "ISIC 2018 (prepared)"


def test_esp_medsam_model_round_trip_through_olah(hub, tmp_path):
    """Acceptance: tiny EspMedSamModels pushed per branch load with from_pretrained(revision=) and match."""
    env = {**os.environ, **hub.env, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "0"}
    script = Path(__file__).with_name("_hub_helpers.py")
    proc = subprocess.run([sys.executable, str(script), hub.endpoint, str(tmp_path / "work")], env=env,
                          capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["untouched"]
    # the same weights give the same outputs up to float rounding: tensors loaded from safetensors can take other
    # CPU kernels than those built in memory (up to 1.4e-8 on an AMD EPYC, 0 on the Intel CI machine)
    same = 1e-6
    assert all(diff <= same for diff in result["diffs"].values()), result
    assert all(diff > 1e-3 for diff in result["distinct"].values()), result  # each branch has its own weights
    assert result["push_diff"] <= same
    assert result["auto_diff"] <= same
    assert "RepositoryNotFoundError" in result["private_without_token"]  # issue 22, row 7
    assert result["private_diff"] <= same


def listening_tcp_ports(pids: list[int]) -> set[int]:
    """The TCP ports the processes ``pids`` listen on (their socket inodes matched against /proc/net/tcp*)."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            target = os.readlink(fd) if fd.is_symlink() else ""
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_a_private_repository_is_read_only_with_the_token_on_every_port(hub, api, tmp_path):
    """Issue 22, row 7: a private repository was listed public and readable without the token through our server
    and through olah's own port. olah now opens no port at all (a Unix socket in a 0700 folder), and on the one
    port the launcher opens, the repository is read only with the token."""
    folder = make_stage_folder(tmp_path / "m", seed=9)
    publish_model("esp/private-rt", [StageRelease("main", folder)], api=api, private=True, retry=FAST)
    state = json.loads((hub.root / "hub.json").read_text())
    assert listening_tcp_ports([state["olah_pid"]]) == set()
    assert listening_tcp_ports([state["olah_pid"], state["server_pid"]]) == {hub.port}
    assert oct(Path(state["olah_socket"]).parent.stat().st_mode & 0o777) == "0o700"
    for path in ("/esp/private-rt/resolve/main/config.json", "/api/models/esp/private-rt",
                 "/api/models/esp%2Fprivate-rt", "/esp%2Fprivate-rt/resolve/main/config.json"):
        assert httpx2.get(f"{hub.endpoint}{path}").status_code in (401, 404), path
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("esp/private-rt", "config.json", endpoint=hub.endpoint, cache_dir=tmp_path / "c", token=False)
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("esp/private-rt", endpoint=hub.endpoint, cache_dir=tmp_path / "c", token=False)
    snapshot = download(hub, tmp_path, "esp/private-rt", "main")
    assert {k: v for k, v in tree_hashes(snapshot).items() if k != ".gitattributes"} == tree_hashes(folder)
    assert api.model_info("esp/private-rt").private is True
    assert "esp/private-rt" not in {m.id for m in HfApi(endpoint=hub.endpoint, token=False).list_models()}
    assert api.model_info("esp/private-rt").sha == snapshot.name


def test_republish_mirrors_the_folder(hub, api, tmp_path):
    folder = make_stage_folder(tmp_path / "m", seed=5)
    publish_model("esp/mirror", [StageRelease("stage-3-esp-medsam", folder)], api=api, retry=FAST)
    (folder / "sub" / "notes.txt").unlink()
    (folder / "config.json").write_text('{"changed": true}')
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "modeling_esp_medsam.cpython-311.pyc").write_bytes(b"local tool state")
    publish_model("esp/mirror", [StageRelease("stage-3-esp-medsam", folder)], api=api, retry=FAST)
    files = api.list_repo_files("esp/mirror", revision="stage-3-esp-medsam")
    published = {path: digest for path, digest in tree_hashes(folder).items() if not path.startswith("__pycache__")}
    assert sorted(files) == sorted([".gitattributes", *published])  # stale notes.txt deleted, cache left out
    snapshot = download(hub, tmp_path, "esp/mirror", "stage-3-esp-medsam")
    assert (snapshot / "config.json").read_text() == '{"changed": true}'


def test_xet_to_a_server_that_is_not_the_hub_is_refused_before_any_request(api, tmp_path, monkeypatch):
    pytest.importorskip("hf_xet")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)  # as in a process started without the variable
    folder = make_stage_folder(tmp_path / "m", seed=7)
    with pytest.raises(PublishError, match="HF_HUB_DISABLE_XET=1"):
        publish_model("esp/xet", [StageRelease("main", folder)], api=api, retry=FAST)
    with pytest.raises(RepositoryNotFoundError):
        api.list_repo_refs("esp/xet")


def test_write_api_refusals_are_clear(api):
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import BadRequestError, HfHubHTTPError

    with pytest.raises(BadRequestError, match="namespace is required"):
        api.create_repo("no-namespace")
    api.create_repo("esp/refusals")
    with pytest.raises(ValueError, match="Invalid metadata"):
        api.upload_file(path_or_fileobj=b"---\nkey: [unclosed\n---\ntext\n", path_in_repo="README.md",
                        repo_id="esp/refusals")
    with pytest.raises(HfHubHTTPError, match="412") as info:
        api.create_commit("esp/refusals", operations=[CommitOperationAdd("a.txt", b"a")], commit_message="x",
                          parent_commit="0" * 40)
    assert "is not the head of main" in str(info.value)
    with pytest.raises(RevisionNotFoundError):
        api.create_commit("esp/refusals", operations=[CommitOperationAdd("a.txt", b"a")], commit_message="x",
                          revision="no-such-branch")
    assert api.list_repo_files("esp/refusals") == [".gitattributes"]


def test_start_refuses_a_busy_port_or_a_running_root(hub, tmp_path):
    with pytest.raises(LocalHubError, match=f"port {hub.port} .* in use"):
        LocalHub(tmp_path / "other", port=hub.port).start()
    with pytest.raises(LocalHubError, match="already runs"):
        LocalHub(hub.root).start()
    assert httpx2.get(f"{hub.endpoint}/_local/health").json()["status"] == "ok"  # the running hub is unharmed


def test_a_refused_request_does_not_poison_the_keep_alive_connection(hub):
    with httpx2.Client() as client:
        refused = client.post(f"{hub.endpoint}/api/models/esp/nope/preupload/main",
                              json={"files": [{"path": "x", "size": 1, "sample": "eA==" * 5000}]},
                              headers={"Authorization": f"Bearer {hub.token}"})
        assert refused.status_code == 404 and refused.headers["X-Error-Code"] == "RepoNotFound"
        assert client.get(f"{hub.endpoint}/_local/health").json()["status"] == "ok"


def test_a_forged_index_entry_cannot_be_planted_and_the_repo_still_downloads(hub, api, tmp_path):
    """Issue 13: a commit path holding a newline and a tab used to plant a symlink; snapshot_download then gave 500."""
    api.create_repo("esp/planted")
    api.upload_file(path_or_fileobj=b"ok", path_in_repo="ok.txt", repo_id="esp/planted")
    lines = [{"key": "header", "value": {"summary": "attack"}},
             {"key": "file", "value": {"path": "x\n120000 " + "1" * 40 + "\tlink", "content": "eA==",
                                       "encoding": "base64"}}]
    answer = httpx2.post(f"{hub.endpoint}/api/models/esp/planted/commit/main",
                         content="\n".join(json.dumps(line) for line in lines).encode(),
                         headers={"Authorization": f"Bearer {hub.token}", "Content-Type": "application/x-ndjson"})
    assert answer.status_code == 400 and "invalid path" in answer.json()["error"]
    snapshot = download(hub, tmp_path, "esp/planted", "main")
    assert sorted(p.name for p in snapshot.iterdir()) == [".gitattributes", "ok.txt"]


def test_push_to_hub_of_a_remote_code_model_keeps_both_pipelines(hub, api, tmp_path):
    """AutoModel.from_pretrained(repo, trust_remote_code=True).push_to_hub(copy): the copy still serves the custom
    pipeline (its code travels with the model) and the stock image-segmentation pipeline, package hidden."""
    import numpy as np
    from _inference_helpers import run_without_package, save_tiny_model

    saved = save_tiny_model(tmp_path / "saved")
    publish_model("esp/with-pipeline", [StageRelease("main", saved)], api=api, retry=FAST)
    image = (np.arange(40 * 48 * 3) % 251).astype(np.uint8).reshape(40, 48, 3)
    np.save(tmp_path / "image.npy", image)
    run_without_package(
        """
        import json, numpy as np
        from huggingface_hub import HfApi
        from PIL import Image
        from transformers import AutoModel, AutoProcessor, pipeline
        model = AutoModel.from_pretrained("esp/with-pipeline", trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        model.push_to_hub("esp/pushed-copy")
        AutoProcessor.from_pretrained("esp/with-pipeline", trust_remote_code=True).push_to_hub("esp/pushed-copy")
        image = np.load("image.npy")
        results = {}
        for repo in ("esp/with-pipeline", "esp/pushed-copy"):
            custom = pipeline(model=repo, trust_remote_code=True)
            stock = pipeline("image-segmentation", model=repo, trust_remote_code=True)
            segment = custom(image, modality="x-ray")[0]
            results[repo] = {"label": segment["label"], "score": segment["score"],
                             "mask": int((np.asarray(segment["mask"]) > 0).sum()),
                             "stock": [s["label"] for s in stock(Image.fromarray(image), threshold=0.0)]}
        results["files"] = sorted(HfApi().list_repo_files("esp/pushed-copy"))
        json.dump(results, open("result.json", "w"))
        """,
        tmp_path,
        hub_env=hub.env,
    )
    result = json.loads((tmp_path / "result.json").read_text())
    assert {"pipeline_esp_medsam.py", "image_reading.py", "image_intensity.py", "modeling_esp_medsam.py",
            "config.json"} <= set(result["files"])
    assert result["esp/pushed-copy"] == result["esp/with-pipeline"]
    assert result["esp/pushed-copy"]["label"] == "lung fields" and result["esp/pushed-copy"]["stock"]


@pytest.mark.parametrize("branch", ["stage-2-distill", "main"])
def test_model_info_answers_like_the_hub(api, published, branch):
    """model_info: card metadata (pipeline tag, library, tags), safetensors summary, file sizes and LFS info."""
    import hashlib

    folder = published["folders"][branch]
    info = api.model_info(REPO, revision=branch)
    assert info.sha == published["commits"][branch] and info.id == REPO
    assert info.pipeline_tag == "image-segmentation" and info.library_name == "transformers"
    assert {"medical-imaging", "esp-medsam", "safetensors", "license:apache-2.0"} <= set(info.tags)
    assert branch not in info.tags  # the branch is training_stage, not a tag
    assert info.card_data.training_stage == branch and info.card_data.parameters == 28_460_000
    assert info.safetensors.parameters == {"F32": 64 * 96 + 17} and info.safetensors.total == 64 * 96 + 17
    assert {s.rfilename for s in info.siblings} == {".gitattributes", "README.md", *tree_hashes(folder)}
    assert all(s.size is None for s in info.siblings)
    detailed = api.model_info(REPO, revision=branch, files_metadata=True)
    sizes = {s.rfilename: s.size for s in detailed.siblings}
    for path in tree_hashes(folder):
        assert sizes[path] == (folder / path).stat().st_size, path
    weights = next(s for s in detailed.siblings if s.rfilename == "model.safetensors")
    assert weights.lfs.sha256 == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert weights.lfs.size == weights.size


def test_list_repo_commits_newest_first(api, published):
    commits = api.list_repo_commits(REPO, revision="stage-3-esp-medsam")
    assert commits[0].commit_id == published["commits"]["stage-3-esp-medsam"]
    assert commits[-1].title == "initial commit" and all(c.authors for c in commits)
    assert commits[0].created_at >= commits[-1].created_at
    with pytest.raises(RevisionNotFoundError):
        api.list_repo_commits(REPO, revision="no-such-branch")


def test_list_models_and_datasets_filter_like_the_hub(api, published):
    api.create_repo("esp/listed-data", repo_type="dataset", exist_ok=True)
    models = list(api.list_models(search="roundtrip"))
    assert [m.id for m in models] == [REPO] and models[0].pipeline_tag == "image-segmentation"
    assert REPO in {m.id for m in api.list_models(author="esp")}
    assert REPO in {m.id for m in api.list_models(filter="esp-medsam")}
    assert list(api.list_models(author="nobody")) == []
    assert len(list(api.list_models(limit=1))) == 1
    assert [d.id for d in api.list_datasets(search="listed-data")] == ["esp/listed-data"]


def test_whoami_names_the_local_user(api, published):
    me = api.whoami()
    assert me["name"] == "local" and me["auth"]["accessToken"]["role"] == "write"
    assert "esp" in {org["name"] for org in me["orgs"]}


def test_create_tag_and_download_by_tag(hub, api, published, tmp_path):
    from huggingface_hub.errors import HfHubHTTPError

    api.create_tag(REPO, tag="v1.0", revision="stage-2-distill", tag_message="first release")
    assert api.model_info(REPO, revision="v1.0").sha == published["commits"]["stage-2-distill"]
    tags = {t.name: t.target_commit for t in api.list_repo_refs(REPO).tags}
    assert tags["v1.0"] == published["commits"]["stage-2-distill"]
    path = hf_hub_download(REPO, "config.json", revision="v1.0", endpoint=hub.endpoint, cache_dir=tmp_path / "c")
    assert Path(path).read_text() == (published["folders"]["stage-2-distill"] / "config.json").read_text()
    with pytest.raises(HfHubHTTPError, match="already exists") as info:
        api.create_tag(REPO, tag="v1.0", revision="main")
    assert info.value.response.status_code == 409
    api.create_tag(REPO, tag="v1.0", revision="main", exist_ok=True)
    with pytest.raises(RevisionNotFoundError):
        api.create_tag(REPO, tag="v2", revision="no-such-branch")


def test_discussions_are_refused_like_a_repo_without_them(api, published):
    from huggingface_hub.errors import HfHubHTTPError

    with pytest.raises(HfHubHTTPError, match="Discussions are disabled") as info:
        list(api.get_repo_discussions(REPO))
    assert info.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError, match="Discussions are disabled"):
        api.create_discussion(REPO, title="hello")
    with pytest.raises(RepositoryNotFoundError):
        list(api.get_repo_discussions("esp/no-such-repo"))
