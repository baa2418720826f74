"""Synthetic domains: schema, determinism, domain shift, labelling; the registry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from esp_medsam_hf.data.domains import (
    DOMAIN_NAMES,
    DOMAINS,
    SOURCE_DOMAINS,
    UNSEEN_DOMAINS,
    get_domain,
    resolve_domains,
)
from esp_medsam_hf.data.schema import features, mask_to_bool
from esp_medsam_hf.data.synthetic import synthetic_domain, synthetic_domains, synthetic_example


def test_registry_matches_the_design_table():
    modality_index = {d.name: d.modality_index for d in DOMAINS}
    assert modality_index == {
        "isic": 0, "ph2": 0, "lung": 1, "nih": 1, "ultrasound": 2, "busi": 2,
        "retinal": 3, "stare": 3, "dsb": 4, "tnbc": 4, "cvccdb": 5, "colon": 5,
    }
    assert SOURCE_DOMAINS == ("isic", "lung", "ultrasound", "retinal", "dsb", "cvccdb")
    assert UNSEEN_DOMAINS == ("ph2", "nih", "busi", "stare", "tnbc", "colon")
    assert get_domain("busi").paper.dice == 61.62 and get_domain("lung").paper.hd == 40.68
    assert [d.name for d in resolve_domains(["unseen", "isic", "ph2"])] == list(UNSEEN_DOMAINS) + ["isic"]
    with pytest.raises(KeyError, match="unknown domain 'kvasir'"):
        get_domain("kvasir")


def test_official_splits_are_kept_exactly_and_p_is_not_a_split():
    dsb = get_domain("dsb").splits()
    assert {k: len(v) for k, v in dsb.items()} == {"train": 536, "validation": 67, "test": 67}
    isic = get_domain("isic").splits()
    assert {k: len(v) for k, v in isic.items()} == {"train": 2594, "validation": 100, "test": 1000}
    assert isic["test"][0] == "ISIC_0018960.png"
    stare = get_domain("stare").splits()
    assert stare["test"] == ["im0239.png", "im0255.png"]
    seen: set[str] = set()
    for domain in DOMAINS:
        names = domain.all_file_names()
        assert sum(len(v) for v in domain.splits().values()) == len(names)  # no overlap between splits
        assert not names & seen  # names are unique across domains
        seen |= names


def test_synthetic_is_deterministic_by_seed_and_differs_between_seeds():
    first = synthetic_domain("isic", 2, seed=3, size=64)
    second = synthetic_domain("isic", 2, seed=3, size=64)
    other = synthetic_domain("isic", 2, seed=4, size=64)
    for split in first:
        assert first[split].data.table.equals(second[split].data.table)
    assert not np.array_equal(np.asarray(first["train"][0]["image"]), np.asarray(other["train"][0]["image"]))
    image, mask = synthetic_example("isic", 1, split="train", seed=3, size=64)
    np.testing.assert_array_equal(np.asarray(first["train"][1]["image"]), image)
    np.testing.assert_array_equal(mask_to_bool(first["train"][1]["mask"]), mask)


def test_synthetic_domains_schema_labels_and_targets():
    domains = synthetic_domains(n_per_split={"train": 2, "test": 1}, size=64)
    assert list(domains) == list(DOMAIN_NAMES)
    for name, dataset_dict in domains.items():
        spec = get_domain(name)
        assert set(dataset_dict) == {"train", "test"}
        test = dataset_dict["test"]
        assert test.features == features()
        assert test["file_name"] == [f"synthetic_{name}_test_0000.png"]
        assert test["domain"] == [spec.name] and test["modality"] == [spec.modality_index]
        assert "SYNTHETIC" in test.info.description
        image, mask = test[0]["image"], mask_to_bool(test[0]["mask"])
        assert image.mode == "RGB" and image.size == (64, 64)
        assert set(np.unique(np.asarray(test[0]["mask"]))) <= {0, 255}
        fraction = mask.mean()
        assert 0.005 < fraction < 0.6, (name, fraction)


def test_source_and_unseen_domains_of_a_modality_look_different():
    for source, unseen in zip(SOURCE_DOMAINS, UNSEEN_DOMAINS):
        assert get_domain(source).modality == get_domain(unseen).modality
        a = np.stack([synthetic_example(source, i, size=64)[0] for i in range(4)]).astype(float)
        b = np.stack([synthetic_example(unseen, i, size=64)[0] for i in range(4)]).astype(float)
        colour_shift = np.abs(a.mean(axis=(0, 1, 2)) - b.mean(axis=(0, 1, 2))).max()
        contrast_shift = abs(a.std() - b.std())
        assert colour_shift > 8 or contrast_shift > 8, (source, unseen, colour_shift, contrast_shift)


def test_targets_are_recognisable():
    _, lungs = synthetic_example("lung", 0, size=128)
    from scipy.ndimage import label

    assert label(lungs)[1] == 2  # two lung fields
    assert lungs[:, :64].any() and lungs[:, 64:].any()
    _, nuclei = synthetic_example("dsb", 0, size=128)
    assert label(nuclei)[1] >= 10  # many small nuclei
    _, vessels = synthetic_example("retinal", 0, size=128)
    assert label(vessels, np.ones((3, 3)))[1] <= 3 and 0.02 < vessels.mean() < 0.25  # a connected thin tree
    image, lesion = synthetic_example("isic", 0, size=128)
    assert image[lesion].mean() < image[~lesion].mean() - 40  # pigmented lesion darker than skin
    image, mass = synthetic_example("ultrasound", 0, size=128)
    assert image[mass].mean() < image[~mass].mean()  # dark mass


def test_synthetic_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown split"):
        synthetic_example("isic", 0, split="valid")
    with pytest.raises(ValueError, match="at least 32"):
        synthetic_example("isic", 0, size=8)
    with pytest.raises(ValueError, match="unknown split"):
        synthetic_domain("isic", {"val": 2})


def test_contact_sheet_script(tmp_path):
    """scripts/synthetic_contact_sheet.py (docs/data.md), loaded by path."""
    from PIL import Image

    from _script_helpers import load_script

    script = load_script("synthetic_contact_sheet")
    path = tmp_path / "sheet.png"
    assert script.main([str(path), "--size", "64"]) == 0
    with Image.open(path) as sheet:
        assert sheet.size[0] == 4 * 160 and sheet.size[1] > 6 * 160
