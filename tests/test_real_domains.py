"""Real domains from package archives and a user's own data: reading, splits, mask decoding, preparation."""

from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from esp_medsam_hf.cli import main
from esp_medsam_hf.data.domains import REAL_DOMAIN_NAMES, custom_domain, get_domain, resolve_domains
from esp_medsam_hf.data.layouts import LayoutError, get_layout
from esp_medsam_hf.data.prepare import PreparationError, assign_splits, prepare_domain, read_mask
from esp_medsam_hf.data.prepared import prepared_domain_spec, prepared_domains
from esp_medsam_hf.data.real import MNFINDER_ARCHIVE, VASCX_ARCHIVE, mnfinder_members, unpack_mnfinder, unpack_vascx
from esp_medsam_hf.training.data import load_domains

needs_mnfinder = pytest.mark.skipif(not MNFINDER_ARCHIVE.path().is_file(),
                                    reason="mnfinder's wheel is fetched by scripts/install.sh")
needs_vascx = pytest.mark.skipif(not VASCX_ARCHIVE.path().is_file(),
                                 reason="vascx's sdist is fetched by scripts/install.sh")


def test_registry_holds_the_real_domains_beside_the_official_ones():
    assert REAL_DOMAIN_NAMES == ("mnfinder", "vascx", "dsb-stardist")
    assert [d.name for d in resolve_domains(["real"])] == list(REAL_DOMAIN_NAMES)
    assert get_domain("vascx").modality == "fundus" and "MADE BY VASCX'S MODELS" in get_domain("vascx").description
    assert len(resolve_domains(None)) == 12  # the default is still the paper's 12
    with pytest.raises(ValueError, match="not an official|no official split"):
        get_domain("mnfinder").splits()


def test_custom_domain_names_are_checked():
    assert custom_domain("my-clinic_2", "ultrasound").modality_index == 2
    with pytest.raises(ValueError, match="taken"):
        custom_domain("isic", "dermoscopy")
    with pytest.raises(ValueError, match="letters, digits"):
        custom_domain("../evil", "fundus")
    with pytest.raises(ValueError, match="modality must be one of"):
        custom_domain("mine", "mri")


def test_seeded_split_is_reproducible_and_keeps_every_split():
    names = [f"case{i:02d}.png" for i in range(20)]
    first = assign_splits(names, validation_fraction=0.1, test_fraction=0.2, seed=3)
    assert first == assign_splits(list(reversed(names)), validation_fraction=0.1, test_fraction=0.2, seed=3)
    counts = {split: sum(v == split for v in first.values()) for split in ("train", "validation", "test")}
    assert counts == {"train": 14, "validation": 2, "test": 4}
    assert assign_splits(names, validation_fraction=0.1, test_fraction=0.2, seed=4) != first
    tiny = assign_splits(["a", "b", "c"], validation_fraction=0.1, test_fraction=0.2, seed=0)
    assert sorted(tiny.values()) == ["test", "train", "validation"]  # one each, one left to train
    assert sorted(assign_splits(["a", "b"], validation_fraction=0.1, test_fraction=0.2, seed=0).values()) == [
        "test", "train"]
    with pytest.raises(PreparationError, match="leave images for training"):
        assign_splits(names, validation_fraction=0.5, test_fraction=0.5, seed=0)


def test_masks_rgba_alpha_and_label_maps(tmp_path):
    alpha = np.zeros((6, 7, 4), dtype=np.uint8)
    alpha[1:3, 1:4, 3] = 255
    alpha[1:3, 1:4, 2] = [[1, 1, 2], [1, 2, 2]]  # instance ids in the blue channel
    alpha[4, 5, :3] = 9  # colour where alpha is 0: not foreground
    Image.fromarray(alpha, "RGBA").save(tmp_path / "alpha.png")
    mask = read_mask(tmp_path / "alpha.png")
    assert mask.sum() == 6 and mask[1:3, 1:4].all()

    labels = np.zeros((5, 5), dtype=np.uint16)
    labels[0, 0], labels[2, 2], labels[4, 3] = 1, 2, 300
    Image.fromarray(labels).save(tmp_path / "labels.png")
    with pytest.raises(PreparationError, match="not binary"):
        read_mask(tmp_path / "labels.png")
    assert read_mask(tmp_path / "labels.png", labels=True).sum() == 3
    for values in ((0, 1), (0, 255)):
        binary = np.full((4, 4), values[0], dtype=np.uint8)
        binary[1, 1:3] = values[1]
        Image.fromarray(binary).save(tmp_path / "binary.png")
        assert read_mask(tmp_path / "binary.png").sum() == 2


def _own_data(root, count=6):
    rng = np.random.default_rng(0)
    for index in range(count):
        image = rng.integers(0, 255, (16, 20, 3), dtype=np.uint8)
        mask = np.zeros((16, 20), dtype=np.uint8)
        mask[2 : 4 + index, 3:9] = 255
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "images" / f"case{index}.jpg")
        Image.fromarray(mask).save(root / "masks" / f"case{index}_mask.png")


def test_plain_folders_prepare_a_users_own_domain_through_the_cli(tmp_path, capsys):
    _own_data(tmp_path / "mine", count=10)
    output = tmp_path / "prepared"
    code = main(["prepare", "--domains", "my-clinic", "--modality", "ultrasound", "--layout", "plain",
                 "--data-dir", str(tmp_path / "mine"), "--output", str(output), "--split-seed", "1"])
    assert code == 0, capsys.readouterr().err
    assert prepared_domains(output) == ["my-clinic"]
    spec = prepared_domain_spec(output, "my-clinic")
    assert (spec.modality, spec.origin) == ("ultrasound", "custom")
    data = load_domains(str(output), ["my-clinic"], splits={"train": 0, "validation": 0, "test": 0})["my-clinic"]
    assert {split: len(data[split]) for split in data} == {"train": 7, "validation": 1, "test": 2}
    row = data["train"][0]
    assert row["modality"] == 2 and row["domain"] == "my-clinic"
    assert set(np.unique(np.asarray(row["mask"]))) <= {0, 255}
    assert "my-clinic" in (output / "README.md").read_text()
    # a registered name with --modality, and --modality without one domain, are refused with a reason
    assert main(["prepare", "--domains", "isic", "--modality", "dermoscopy", "--layout", "plain",
                 "--data-dir", str(tmp_path / "mine"), "--output", str(tmp_path / "x")]) == 1
    assert "registered domain" in capsys.readouterr().err


def test_plain_listing_gives_the_splits_and_names_bad_rows(tmp_path):
    _own_data(tmp_path / "files", count=3)
    listing = tmp_path / "files" / "pairs.csv"
    with open(listing, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "mask", "split"])
        writer.writerows([[f"images/case{i}.jpg", f"masks/case{i}_mask.png", s]
                          for i, s in enumerate(("train", "val", "test"))])
    dataset, report = prepare_domain(custom_domain("listed", "fundus"), listing, tmp_path / "out", layout="plain",
                                     progress=False)
    assert report.layout == "plain" and {s: len(dataset[s]) for s in dataset} == {"train": 1, "validation": 1,
                                                                                  "test": 1}
    (tmp_path / "bad.json").write_text(json.dumps([{"image": "nope.png", "mask": "files/masks/case0_mask.png"}]))
    with pytest.raises(LayoutError, match="bad.json, entry 1: image file .*nope.png does not exist"):
        get_layout("listed", "plain").find(tmp_path / "bad.json", "listed")
    with pytest.raises(LayoutError, match="images/ and masks/"):
        get_layout("listed", "plain").find(tmp_path, "listed")


@needs_mnfinder
def test_mnfinder_archive_pairs_and_split():
    with zipfile.ZipFile(MNFINDER_ARCHIVE.path()) as archive:
        pairs = mnfinder_members(archive)
    counts = {split: sum(p[3] == split for p in pairs) for split in ("train", "validation", "test")}
    assert counts == {"train": 30, "validation": 3, "test": 16}
    assert len({p[0] for p in pairs}) == 49


@needs_mnfinder
def test_mnfinder_slice_prepares_with_alpha_masks(tmp_path):
    listing = unpack_mnfinder(tmp_path / "mnfinder", limit=1)
    rows = list(csv.DictReader(open(listing)))
    assert [r["split"] for r in rows] == ["test", "train", "validation"]
    rgba = np.asarray(Image.open(listing.parent / rows[0]["mask"]))
    expected = rgba[..., 3] > 0
    assert rgba.shape[-1] == 4 and len(np.unique(rgba[..., 2][expected])) > 5  # instance ids in the blue channel
    dataset, report = prepare_domain("mnfinder", listing, tmp_path / "out", layout="plain", progress=False)
    assert {s: len(dataset[s]) for s in dataset} == {"train": 1, "validation": 1, "test": 1}
    test_row = dataset["test"][0]
    assert np.array_equal(np.asarray(test_row["mask"]) > 0, expected)
    assert test_row["domain"] == "mnfinder" and test_row["modality"] == 4
    image = np.asarray(test_row["image"])
    assert image.shape[:2] == expected.shape and image.dtype == np.uint8 and image.max() == 255  # 16 bit stretched


@needs_vascx
def test_vascx_fixed_split_and_vessel_masks(tmp_path):
    listing = unpack_vascx(tmp_path / "vascx")
    rows = list(csv.DictReader(open(listing)))
    assert sorted(r["name"] for r in rows if r["split"] == "test") == ["CHASEDB1_12R.png", "DRIVE_40.png"]
    assert sum(r["split"] == "train" for r in rows) == 4
    mask = np.asarray(Image.open(listing.parent / rows[0]["mask"]))
    assert set(np.unique(mask)) == {0, 1} and 0.02 < mask.mean() < 0.3  # vessels, {0,1}
    assert np.asarray(Image.open(listing.parent / rows[0]["image"])).shape == (1024, 1024, 3)


def test_dsb_stardist_image_prepares_from_its_label_map(tmp_path):
    pytest.importorskip("tifffile")
    from scipy.ndimage import label

    from esp_medsam_hf.data.real import unpack_dsb_stardist

    dataset, _ = prepare_domain("dsb-stardist", unpack_dsb_stardist(tmp_path / "dsb"), tmp_path / "out",
                                layout="plain", progress=False)
    assert {s: len(dataset[s]) for s in dataset} == {"train": 0, "validation": 0, "test": 1}
    row = dataset["test"][0]
    assert row["image"].size == (512, 512) and row["modality"] == 4 and row["domain"] == "dsb-stardist"
    mask = np.asarray(row["mask"]) > 0
    assert 100 <= label(mask)[1] <= 125  # 125 annotated nuclei, a few touching ones merge in the binary mask
    assert "hand-annotated" in dataset["test"].info.description


def test_a_cached_listing_whose_files_are_gone_is_unpacked_again(tmp_path, caplog):
    """A cache kept between runs can outlive the environment it names (stardist's image is read in place from
    the installed package): the listing is rebuilt rather than handed on with paths that do not exist."""
    from esp_medsam_hf.assets import DSB2018_IMAGE
    from esp_medsam_hf.data.real import unpack_real_domain

    stale = tmp_path / "cache" / "dsb-stardist"
    stale.mkdir(parents=True)
    gone = tmp_path / "removed-environment" / "img2d.tif"
    (stale / "pairs.csv").write_text(f"name,image,mask,split\na.png,{gone},{gone},test\n")
    with caplog.at_level("WARNING", logger="esp_medsam_hf.data.real"):
        listing = unpack_real_domain("dsb-stardist", tmp_path / "cache")
    rows = list(csv.DictReader(open(listing, newline="")))
    assert [Path(row["image"]) for row in rows] == [DSB2018_IMAGE.path()]
    assert all(Path(row[column]).is_file() for row in rows for column in ("image", "mask"))
    assert "names files that are gone" in caplog.text
    before = listing.stat().st_mtime_ns
    assert unpack_real_domain("dsb-stardist", tmp_path / "cache") == listing  # a whole listing is kept as it is
    assert listing.stat().st_mtime_ns == before
