"""Preparation: bad input, strictness, saving (save_to_disk, Parquet streaming, card) and the command line."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest

from _data_helpers import as255, build_replica, random_image, run_command, save, write_official
from esp_medsam_hf.commands import prepare as prepare_command
from esp_medsam_hf.data.domains import get_domain
from esp_medsam_hf.data.prepare import PreparationError, build_domain, prepare_domain
from esp_medsam_hf.data.prepared import PreparedDataError
from esp_medsam_hf.hub import push_prepared
from esp_medsam_hf.data.schema import mask_to_bool

DOMAIN = "tnbc"


@pytest.fixture()
def official(tmp_path):
    root = tmp_path / "raw"
    names, expected, _ = build_replica(root, "official", DOMAIN)
    return root, names, expected


def _break(root, names, kind):
    """Make the first train file bad in one way; returns its name and the path the error must name."""
    name = names["train"][0]
    image, mask = root / "image_1024" / name, root / "mask_1024" / name
    if kind == "missing mask":
        mask.unlink()
        return name, image, "no mask found"
    if kind == "size mismatch":
        save(np.zeros((7, 9), np.uint8), mask)
        return name, mask, "mask size 9x7 differs from the image size 24x20"
    if kind == "unreadable image":
        image.write_bytes(b"not a png at all")
        return name, image, "unreadable image"
    save(np.arange(20 * 24, dtype=np.uint8).reshape(20, 24), mask)
    return name, mask, "mask is not binary"


KINDS = ["missing mask", "size mismatch", "unreadable image", "non-binary mask"]


@pytest.mark.parametrize("kind", KINDS)
def test_bad_input_is_an_error_naming_the_file(tmp_path, official, kind):
    root, names, _ = official
    _, path, message = _break(root, names, kind)
    with pytest.raises(PreparationError) as error:
        build_domain(DOMAIN, root, cache_dir=tmp_path / "cache", progress=False)
    assert str(path) in str(error.value) and message in str(error.value)


@pytest.mark.parametrize("kind", KINDS)
def test_bad_input_is_skipped_counted_and_reported_with_the_flag(tmp_path, official, kind):
    root, names, _ = official
    name, path, message = _break(root, names, kind)
    dataset_dict, report = build_domain(DOMAIN, root, cache_dir=tmp_path / "cache", skip_invalid=True, progress=False)
    assert name not in dataset_dict["train"]["file_name"]
    assert dataset_dict["train"]["file_name"] == names["train"][1:]
    assert len(report.skipped) == 1
    assert report.skipped[0]["file_name"] == name and report.skipped[0]["split"] == "train"
    assert str(path) in report.skipped[0]["reason"] and message in report.skipped[0]["reason"]


def test_mask_threshold_binarises_non_binary_masks(tmp_path, official):
    root, names, _ = official
    name = names["train"][0]
    grey = np.arange(20 * 24, dtype=np.uint16).reshape(20, 24) % 256
    save(grey.astype(np.uint8), root / "mask_1024" / name)
    dataset_dict, _ = build_domain(DOMAIN, root, cache_dir=tmp_path / "cache", mask_threshold=127, progress=False)
    row = dataset_dict["train"][0]
    np.testing.assert_array_equal(mask_to_bool(row["mask"]), grey > 127)


def test_strict_makes_missing_and_unlisted_files_an_error(tmp_path, official):
    root, _, _ = official
    with pytest.raises(PreparationError, match=r"listed but not found: TNBC_01_1\.png.*--strict"):
        build_domain(DOMAIN, root, cache_dir=tmp_path / "cache", strict=True, progress=False)


def test_unlisted_file_is_reported_by_name(tmp_path, official, caplog):
    root, _, _ = official
    with caplog.at_level("WARNING"):
        _, report = build_domain(DOMAIN, root, cache_dir=tmp_path / "cache", progress=False)
    assert report.unlisted == ["unlisted_case.png"]
    assert "found but not listed: unlisted_case.png" in caplog.text
    assert "TNBC_01_1.png" in report.missing


def test_resize_option(tmp_path, official):
    root, names, _ = official
    dataset_dict, _ = build_domain(DOMAIN, root, cache_dir=tmp_path / "cache", size=32, progress=False)
    row = dataset_dict["test"][0]
    assert row["image"].size == (32, 32) and row["mask"].size == (32, 32)
    assert set(np.unique(np.asarray(row["mask"]))) <= {0, 255}


def test_prepared_dataset_round_trips_through_disk_and_parquet_streaming(tmp_path, official):
    root, names, expected = official
    output = tmp_path / "out"
    loaded, report = prepare_domain(DOMAIN, root, output, progress=False)
    assert loaded["train"]["file_name"] == names["train"]
    reloaded = datasets.load_from_disk(str(output / DOMAIN / "arrow"))
    assert reloaded["test"].features == loaded["test"].features
    streamed = datasets.load_dataset(
        "parquet",
        data_files={split: str(output / DOMAIN / "data" / f"{split}-*.parquet") for split in names},
        streaming=True,
    )
    for split, split_names in names.items():
        rows = list(streamed[split])
        assert [row["file_name"] for row in rows] == split_names
        for row, stored in zip(rows, reloaded[split]):
            np.testing.assert_array_equal(mask_to_bool(row["mask"]), expected[row["file_name"]])
            np.testing.assert_array_equal(np.asarray(row["image"]), np.asarray(stored["image"]))
            assert row["domain"] == stored["domain"] and row["modality"] == stored["modality"]
    # the card's configs make the folder loadable by name, and the report is next to the data
    by_config = datasets.load_dataset(str(output), DOMAIN, split="test", cache_dir=str(tmp_path / "hf"))
    assert by_config["file_name"] == names["test"]
    assert by_config[0]["domain"] == DOMAIN
    saved_report = json.loads((output / DOMAIN / "preparation_report.json").read_text())
    assert saved_report["rows"] == {split: len(n) for split, n in names.items()}
    assert "Naylor" in (output / "README.md").read_text()
    assert "Naylor" in reloaded["test"].info.citation
    with pytest.raises(FileExistsError, match="already exists"):
        prepare_domain(DOMAIN, root, output, progress=False)
    prepare_domain(DOMAIN, root, output, overwrite=True, progress=False)
    assert not [p.name for p in output.iterdir() if p.name.startswith(".") and p.name != ".synthetic"]


def test_push_to_unreachable_hub_is_a_clear_error(tmp_path, official, monkeypatch):
    from esp_medsam_hf.hub import HubUnavailableError, RetryPolicy

    root, _, _ = official
    prepare_domain(DOMAIN, root, tmp_path / "out", progress=False)
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    with pytest.raises(HubUnavailableError, match=r"127\.0\.0\.1:9 is not reachable.*Nothing was uploaded"):
        push_prepared(
            tmp_path / "out", "someone/esp-medsam-data", token="hf_dummy", endpoint="http://127.0.0.1:9",
            retry=RetryPolicy(attempts=1),
        )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before


def test_push_refuses_a_folder_without_prepared_domains(tmp_path):
    with pytest.raises(PreparedDataError, match="no prepared domain"):
        push_prepared(tmp_path, "someone/esp-medsam-data", token="hf_dummy")


def test_prepare_command(tmp_path, official, capsys):
    root, names, _ = official
    code = run_command(
        prepare_command, ["--domains", DOMAIN, "--data-dir", str(root), "--output", str(tmp_path / "out")]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "tnbc" in printed and "unlisted_case.png" in printed
    assert (tmp_path / "out" / DOMAIN / "data" / "test-00000-of-00001.parquet").is_file()
    # --strict turns the missing files into a failing exit code with the names on stderr
    code = run_command(
        prepare_command, ["--domains", DOMAIN, "--data-dir", str(root), "--output", str(tmp_path / "o2"), "--strict"]
    )
    assert code == 1
    assert "TNBC_01_1.png" in capsys.readouterr().err


def test_prepare_command_synthetic(tmp_path, capsys):
    code = run_command(
        prepare_command, ["--synthetic", "--domains", "dsb", "busi", "--num-per-split", "2", "--size", "64",
         "--output", str(tmp_path / "syn")]
    )
    assert code == 0
    loaded = datasets.load_dataset(str(tmp_path / "syn"), "busi", split="validation", cache_dir=str(tmp_path / "hf"))
    assert loaded["file_name"] == ["synthetic_busi_validation_0000.png", "synthetic_busi_validation_0001.png"]
    assert "SYNTHETIC" in (tmp_path / "syn" / "README.md").read_text()
    # a folder of synthetic domains does not take real ones
    root = tmp_path / "raw"
    save(random_image(np.random.default_rng(0)), root / "image_1024" / "TNBC_01_1.png")
    save(as255(np.ones((20, 24), bool)), root / "mask_1024" / "TNBC_01_1.png")
    args = ["--domains", DOMAIN, "--data-dir", str(root), "--output", str(tmp_path / "syn")]
    assert run_command(prepare_command, args) == 1
    assert "holds synthetic domains" in capsys.readouterr().err
    # a domain already there stops the command before any domain is generated
    again = ["--synthetic", "--domains", "isic", "busi", "--num-per-split", "2", "--size", "64", "--output",
             str(tmp_path / "syn")]
    assert run_command(prepare_command, again) == 1
    assert "syn already holds busi; pass --overwrite to replace it" in capsys.readouterr().err
    assert not (tmp_path / "syn" / "isic").exists()


def test_push_to_the_local_hub(tmp_path, official):
    from huggingface_hub import HfApi, constants, hf_hub_download

    from esp_medsam_hf.testing.localhub import LocalHub

    root, names, _ = official
    prepare_domain(DOMAIN, root, tmp_path / "out", progress=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_OFFLINE", False)
        with LocalHub(tmp_path / "hub") as hub:
            commit = push_prepared(tmp_path / "out", "esp/domains", token=hub.token, endpoint=hub.endpoint)
            api = HfApi(endpoint=hub.endpoint, token=hub.token)
            files = api.list_repo_files("esp/domains", repo_type="dataset", revision="main")
            downloaded = {
                name: hf_hub_download(
                    "esp/domains", name, repo_type="dataset", revision="main", endpoint=hub.endpoint,
                    cache_dir=tmp_path / "cache", token=hub.token,
                )
                for name in ("README.md", f"{DOMAIN}/data/test-00000-of-00001.parquet")
            }
    assert len(commit) == 40
    shards = {f"{DOMAIN}/data/{split}-00000-of-00001.parquet" for split in names}
    assert {name for name in files if name != ".gitattributes"} == shards | {"README.md"}
    local = tmp_path / "out" / DOMAIN / "data" / "test-00000-of-00001.parquet"
    parquet = downloaded[f"{DOMAIN}/data/test-00000-of-00001.parquet"]
    assert open(parquet, "rb").read() == local.read_bytes()
    assert open(downloaded["README.md"]).read() == (tmp_path / "out" / "README.md").read_text()
    rows = list(datasets.load_dataset("parquet", data_files={"test": parquet}, streaming=True)["test"])
    assert [row["file_name"] for row in rows] == names["test"]


def test_empty_splits_are_saved_and_loaded(tmp_path, official):
    root, names, _ = official
    for split in ("train", "validation"):
        for name in names[split]:
            (root / "image_1024" / name).unlink()
    loaded, report = prepare_domain(DOMAIN, root, tmp_path / "out", progress=False)
    assert {split: len(dataset) for split, dataset in loaded.items()} == {"train": 0, "validation": 0, "test": 1}
    assert report.rows == {"train": 0, "validation": 0, "test": 1}
    streamed = datasets.load_dataset(
        "parquet", data_files={"train": str(tmp_path / "out" / DOMAIN / "data" / "train-*.parquet")}, streaming=True
    )
    assert list(streamed["train"]) == []


def test_progress_bar_counts_every_image_of_a_split(tmp_path, capsys):
    rng = np.random.default_rng(0)
    test_names = get_domain(DOMAIN).splits()["test"]
    for name in test_names:
        write_official(tmp_path / "raw", name, random_image(rng), [np.eye(20, 24, dtype=bool)])
    build_domain(DOMAIN, tmp_path / "raw", cache_dir=tmp_path / "cache")
    err = capsys.readouterr().err
    assert f"{DOMAIN}/test: 100%" in err and f"{len(test_names)}/{len(test_names)}" in err


def test_preparing_without_progress_writes_no_bar_and_leaves_datasets_bars_as_they_were(tmp_path, official, capfd):
    root, _, _ = official
    assert datasets.is_progress_bar_enabled()
    prepare_domain(DOMAIN, root, tmp_path / "out", progress=False)
    assert "%|" not in capfd.readouterr().err
    assert datasets.is_progress_bar_enabled()


def test_rebuilding_with_the_same_cache_folder_reads_the_files_again(tmp_path, official):
    root, names, _ = official
    first, _ = build_domain(DOMAIN, root, cache_dir=tmp_path / "cache", progress=False)
    name = names["test"][0]
    save(as255(np.ones((20, 24), bool)), root / "mask_1024" / name)
    second, _ = build_domain(DOMAIN, root, cache_dir=tmp_path / "cache", progress=False)
    assert not mask_to_bool(first["test"][0]["mask"]).all()
    assert mask_to_bool(second["test"][0]["mask"]).all()
