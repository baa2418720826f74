"""Every accepted input layout: a small replica is found, split as the official lists say, labelled and merged."""

from __future__ import annotations

import numpy as np
import pytest

from _data_helpers import NATIVE_LAYOUTS, build_replica
from esp_medsam_hf.data.domains import DOMAIN_NAMES, MODALITY_NAMES, get_domain
from esp_medsam_hf.data.layouts import LAYOUTS, LayoutError, detect_layout
from esp_medsam_hf.data.prepare import build_domain
from esp_medsam_hf.data.schema import mask_to_bool


def _check(dataset_dict, report, domain, names, expected, unlisted):
    spec = get_domain(domain)
    assert set(dataset_dict) == {"train", "validation", "test"}
    for split, split_names in names.items():
        dataset = dataset_dict[split]
        assert dataset["file_name"] == split_names
        assert set(dataset["domain"]) == {domain}
        assert set(dataset["modality"]) == {MODALITY_NAMES.index(spec.modality)}
        for row in dataset:
            assert row["image"].mode == "RGB"
            assert row["image"].size == row["mask"].size
            assert set(np.unique(np.asarray(row["mask"]))) <= {0, 255}
            np.testing.assert_array_equal(mask_to_bool(row["mask"]), expected[row["file_name"]])
    assert report.unlisted == unlisted
    found = {name for split_names in names.values() for name in split_names}
    assert set(report.missing) == spec.all_file_names() - found
    assert report.rows == {split: len(split_names) for split, split_names in names.items()}
    assert report.skipped == []


@pytest.mark.parametrize("layout", sorted(NATIVE_LAYOUTS))
def test_native_layout(tmp_path, layout):
    domain = NATIVE_LAYOUTS[layout][0]
    names, expected, unlisted = build_replica(tmp_path / "raw", layout)
    detected, _ = detect_layout(tmp_path / "raw", domain)
    assert detected.name == layout
    dataset_dict, report = build_domain(domain, tmp_path / "raw", cache_dir=tmp_path / "cache", progress=False)
    assert report.layout == layout
    _check(dataset_dict, report, domain, names, expected, unlisted)


@pytest.mark.parametrize("domain", DOMAIN_NAMES)
def test_official_layout(tmp_path, domain):
    names, expected, unlisted = build_replica(tmp_path / "raw", "official", domain)
    # detected, although some native layouts also match the PNG names (twice: image_1024 and mask_1024)
    dataset_dict, report = build_domain(domain, tmp_path / "raw", cache_dir=tmp_path / "cache", progress=False)
    assert report.layout == "official"
    _check(dataset_dict, report, domain, names, expected, unlisted)


def test_official_layout_in_domain_subfolder_and_shared_folder(tmp_path):
    names, expected, _ = build_replica(tmp_path / "raw" / "ph2", "official", "ph2")
    dataset_dict, report = build_domain("ph2", tmp_path / "raw", cache_dir=tmp_path / "cache", progress=False)
    assert dataset_dict["test"]["file_name"] == names["test"]
    # a shared image_1024 folder holding another domain's files: they are not "unlisted" for this domain
    names_isic, _, _ = build_replica(tmp_path / "raw" / "ph2", "official", "isic", seed=1)
    dataset_dict, report = build_domain("ph2", tmp_path / "raw", cache_dir=tmp_path / "cache2", progress=False)
    assert report.unlisted == ["unlisted_case.png"]
    assert not any(name.startswith("ISIC") for name in dataset_dict["train"]["file_name"])


def test_every_domain_accepts_the_official_layout_and_lists_its_layouts():
    assert set(LAYOUTS) == set(DOMAIN_NAMES)
    native = {layout.name for layouts in LAYOUTS.values() for layout in layouts} - {"official"}
    assert native == set(NATIVE_LAYOUTS)
    for domain, layouts in LAYOUTS.items():
        assert layouts[0].name == "official"
        assert all(layout.description for layout in layouts)


def test_no_layout_found_names_the_folder_and_the_accepted_layouts(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LayoutError, match=r"empty.*no image of domain 'busi'.*official.*busi"):
        detect_layout(tmp_path / "empty", "busi")
    with pytest.raises(LayoutError, match="not a folder"):
        build_domain("isic", tmp_path / "nowhere", cache_dir=tmp_path / "cache", layout="isic2018")
    with pytest.raises(LayoutError, match="accepted: official, plain$"):
        build_domain("nih", tmp_path / "empty", cache_dir=tmp_path / "cache", layout="isic2018")
