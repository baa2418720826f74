"""The pipelines end to end: the custom "medical-image-segmentation" one, transformers' stock "image-segmentation"
one, and both through trust_remote_code in a fresh process that cannot import this package."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from _inference_helpers import (
    assert_masks_agree,
    run_without_package,
    save_tiny_model,
    single_thread,
    tiny_model,
    write_dicom,
)
from esp_medsam_hf import EspMedSamImageProcessor, EspMedSamProcessor, assets
from esp_medsam_hf.data.synthetic import synthetic_example
from esp_medsam_hf.models.esp_medsam.pipeline_esp_medsam import TASK, EspMedSamSegmentationPipeline


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from single_thread()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("pipeline") / "model")


@pytest.fixture(scope="module")
def pipe(saved):
    return pipeline(TASK, model=str(saved), pipeline_class=EspMedSamSegmentationPipeline)


@pytest.fixture(scope="module")
def images():
    """Synthetic images of three modalities at three sizes (not square, not the model size)."""
    sizes = {"isic": 40, "lung": 48, "dsb": 36}
    return [synthetic_example(domain, 0, split="test", size=size)[0][:, 3:] for domain, size in sizes.items()]


def _mask(segments) -> np.ndarray:
    return np.asarray(segments[0]["mask"]) > 0


def _reference(pipe, image, modality=None):
    """Mask (logits above 0, SAM's rule and ``prediction.predict``'s), probabilities, modality and its probability
    straight from the model and processor (no pipeline)."""
    processor = EspMedSamProcessor(pipe.image_processor, pipe.model.config.modality_names)
    inputs = processor(images=[image], modality=modality, return_tensors="pt")
    with torch.no_grad():
        outputs = pipe.model(pixel_values=inputs["pixel_values"], modality=inputs.get("modality"))
    logits = processor.post_process_masks(outputs.pred_masks, inputs["original_sizes"], binarize=False)[0]
    modality_probability = outputs.modality_logits.softmax(-1)[0, outputs.modality[0]]
    return (logits > 0).numpy(), torch.sigmoid(logits).numpy(), int(outputs.modality[0]), float(modality_probability)


def test_saved_folder_holds_both_pipelines(saved):
    config = json.loads((saved / "config.json").read_text())
    assert config["custom_pipelines"][TASK]["impl"] == "pipeline_esp_medsam.EspMedSamSegmentationPipeline"
    assert config["auto_map"]["AutoModelForImageSegmentation"] == "modeling_esp_medsam.EspMedSamModel"
    for name in ("pipeline_esp_medsam.py", "image_reading.py", "image_intensity.py", "preprocessor_config.json",
                 "processor_config.json"):
        assert (saved / name).is_file(), name


def test_given_modality_matches_model_and_processor(pipe, images):
    config = pipe.model.config
    for image, modality in zip(images, ["dermoscopy", 1, "microscopy"]):
        segments = pipe(image, modality=modality)
        mask, probs, index, modality_probability = _reference(pipe, image, modality)
        assert len(segments) == 1
        segment = segments[0]
        assert segment["mask"].size == (image.shape[1], image.shape[0]) and segment["mask"].mode == "L"
        np.testing.assert_array_equal(_mask(segments), mask)
        assert segment["modality"] == config.modality_names[index] and segment["modality_source"] == "given"
        assert segment["label"] == config.target_names[index]
        assert segment["modality_probability"] == pytest.approx(modality_probability, abs=1e-6)
        inside = probs[mask]
        # the classifier's own probability of the given modality, never 1 because it was given
        expected = modality_probability * (inside.mean() if inside.size else 0.0)
        assert segment["score"] == pytest.approx(expected, abs=1e-5)


def test_automatic_modality_is_the_classifiers_choice(pipe, images):
    for image in images:
        segment = pipe(image)[0]
        mask, probs, index, modality_probability = _reference(pipe, image)
        assert segment["modality_source"] == "classifier"
        assert segment["modality"] == pipe.model.config.modality_names[index]
        assert segment["modality_probability"] == pytest.approx(modality_probability, abs=1e-6)
        inside = probs[mask]
        expected = modality_probability * (inside.mean() if inside.size else 0.0)
        assert segment["score"] == pytest.approx(expected, abs=1e-5)
        np.testing.assert_array_equal(_mask([segment]), mask)


def test_per_image_modalities_and_batching_agree_with_single_calls(pipe, images):
    modalities = ["fundus", None, 5]
    singles = [pipe(image, modality=m)[0] for image, m in zip(images, modalities)]
    as_list = pipe(images, modality=modalities, batch_size=3)
    as_dicts = pipe([{"image": im, "modality": m} for im, m in zip(images, modalities)], batch_size=2)
    for batched in (as_list, as_dicts):
        assert [s[0]["modality"] for s in batched] == [s["modality"] for s in singles]
        assert [s[0]["modality_source"] for s in batched] == ["given", "classifier", "given"]
        for single, segments in zip(singles, batched):
            assert (_mask([single]) == _mask(segments)).mean() > 0.999
            assert segments[0]["score"] == pytest.approx(single["score"], abs=1e-4)
    by_name = pipe(images[0], modality="colonoscopy")[0]
    assert by_name["modality"] == "colonoscopy" and by_name["label"] == "polyp"
    assert (_mask([by_name]) == _mask(pipe(images[0], modality=5))).all()


def test_forced_modality_the_classifier_disagrees_with_warns_and_scores_its_probability(pipe, images, caplog):
    image = images[0]
    automatic = pipe(image)[0]
    names = pipe.model.config.modality_names
    forced = next(name for name in names if name != automatic["modality"])
    with caplog.at_level("WARNING", logger="esp_medsam_hf.models.esp_medsam.pipeline_esp_medsam"):
        segment = pipe(image, modality=forced)[0]
    mask, probs, _, modality_probability = _reference(pipe, image, forced)
    assert segment["modality"] == forced and segment["classifier_modality"] == automatic["modality"]
    assert segment["modality_probability"] == pytest.approx(modality_probability, abs=1e-6)
    assert modality_probability < automatic["modality_probability"]
    inside = probs[mask]
    assert segment["score"] == pytest.approx(modality_probability * (inside.mean() if inside.size else 0.0), abs=1e-5)
    assert f"modality '{forced}' was given but the modality classifier gives it" in caplog.text
    assert f"prefers '{automatic['modality']}'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="esp_medsam_hf.models.esp_medsam.pipeline_esp_medsam"):
        agreeing = pipe(image, modality=automatic["modality"])[0]
    assert "classifier_modality" not in agreeing and "prefers" not in caplog.text


def test_unknown_keywords_raise_and_threshold_filters_segments(pipe, images):
    with pytest.raises(TypeError, match="unexpected keyword argument.*mask_treshold"):
        pipe(images[0], mask_treshold=0.3)
    with pytest.raises(TypeError, match="unexpected keyword argument.*subtask"):
        pipe(images[0], subtask="panoptic")
    score = pipe(images[0], modality=2)[0]["score"]
    assert pipe(images[0], modality=2, threshold=score + 1e-3) == []
    kept = pipe(images[0], modality=2, threshold=score - 1e-3)
    assert len(kept) == 1 and kept[0]["score"] == pytest.approx(score, abs=1e-6)
    batched = pipe(images, modality=2, threshold=score + 1e-3, batch_size=3)
    assert batched[0] == [] and len(batched) == 3


def test_modality_changes_the_mask(pipe, images):
    masks = {m: _mask(pipe(images[0], modality=m)) for m in range(6)}
    assert len({mask.tobytes() for mask in masks.values()}) > 1


def test_real_images_from_paths_dicom_routed_by_tag(pipe, tmp_path):
    paths = [assets.CHEST_XRAY_DICOM.path(), assets.FUNDUS_IMAGE.path(), assets.NUCLEAR_IMAGE.path(),
             assets.DSB2018_IMAGE.path()]
    results = pipe([str(p) for p in paths], batch_size=4)
    chest = results[0][0]
    assert chest["modality"] == "x-ray" and chest["modality_source"] == "file"
    assert chest["label"] == "lung fields" and chest["mask"].size == (1841, 1955)
    for path, segments in zip(paths[1:], results[1:]):
        assert segments[0]["mask"].size == Image.open(path).size
        assert segments[0]["modality_source"] == "classifier"
    # A modality given in the call wins over the file's tag.
    ultrasound = write_dicom(tmp_path / "us.dcm", np.arange(30 * 20, dtype=np.uint16).reshape(30, 20), Modality="US")
    assert pipe(str(ultrasound))[0]["modality"] == "ultrasound"
    forced = pipe(str(ultrasound), modality="fundus")[0]
    assert forced["modality"] == "fundus" and forced["modality_source"] == "given"


def test_bad_arguments_are_named(pipe, images):
    with pytest.raises(ValueError, match="unknown modality 'mri'"):
        pipe(images[0], modality="mri")
    with pytest.raises(ValueError, match="out of range"):
        pipe(images[0], modality=6)
    with pytest.raises(ValueError, match="2 modalities for 3"):
        pipe(images, modality=["x-ray", "fundus"])
    with pytest.raises(TypeError, match="unsupported image input"):
        pipe(3.5)


def test_stock_pipeline_returns_the_target_at_original_size(saved, pipe, images):
    stock = pipeline("image-segmentation", model=str(saved))
    assert type(stock).__name__ == "ImageSegmentationPipeline"
    for image in images:
        segments = stock(Image.fromarray(image), threshold=0.0)
        automatic = pipe(image, mask_threshold=0.5)[0]  # the stock pipeline's probability threshold
        assert len(segments) == 1 and segments[0]["label"] == automatic["label"]
        assert segments[0]["mask"].size == (image.shape[1], image.shape[0])
        assert_masks_agree(_mask(segments), _mask([automatic]))  # two code paths: rounding may flip a pixel
    batched = stock([Image.fromarray(image) for image in images], batch_size=3, threshold=0.0)
    assert len(batched) == 3


def test_stock_pipeline_gives_one_scored_target_segment(saved, pipe, images):
    stock = pipeline("image-segmentation", model=str(saved))
    for image in images:
        segments = stock(Image.fromarray(image), threshold=0.0)
        automatic = pipe(image, mask_threshold=0.5)[0]  # the stock pipeline's probability threshold
        assert [s["label"] for s in segments] == [automatic["label"]]
        assert segments[0]["score"] == pytest.approx(automatic["score"], abs=1e-5)
        assert_masks_agree(_mask(segments), _mask([automatic]))


def test_stock_pipeline_leaves_out_segments_scoring_below_threshold(saved, pipe, images):
    """transformers' convention: threshold= (0.9 by default) filters segments by score."""
    stock = pipeline("image-segmentation", model=str(saved))
    scores = [pipe(image)[0]["score"] for image in images]
    assert max(scores) > 0
    for image, score in zip(images, scores):
        below, above = stock(Image.fromarray(image), threshold=score + 1e-3), stock(Image.fromarray(image),
                                                                                     threshold=score - 1e-3)
        assert below == [] and len(above) == 1 and above[0]["score"] == pytest.approx(score, abs=1e-5)
        assert stock(Image.fromarray(image)) == ([] if score < 0.9 else stock(Image.fromarray(image), threshold=0.9))


def test_remote_code_in_a_fresh_process(saved, pipe, tmp_path):
    """Both pipelines from the saved folder with trust_remote_code only, on real and synthetic images."""
    synthetic = synthetic_example("colon", 0, split="test", size=48)[0]
    np.save(tmp_path / "synthetic.npy", synthetic)
    retina, chest = str(assets.FUNDUS_IMAGE.path()), str(assets.CHEST_XRAY_DICOM.path())
    run_without_package(
        f"""
        import json, numpy as np
        from PIL import Image
        from transformers import pipeline
        synthetic = np.load("synthetic.npy")
        stock = pipeline("image-segmentation", model={str(saved)!r}, trust_remote_code=True)
        custom = pipeline(model={str(saved)!r}, trust_remote_code=True)   # task from custom_pipelines
        assert type(custom.model).__module__.startswith("transformers_modules"), type(custom.model).__module__
        assert type(custom).__module__.startswith("transformers_modules"), type(custom).__module__
        stock_out = stock(Image.open({retina!r}), threshold=0.0)
        out = custom([{retina!r}, {chest!r}, synthetic], modality=[None, None, "colonoscopy"], batch_size=3)
        for i, (segments,) in enumerate(out):
            np.save(f"mask{{i}}.npy", np.asarray(segments["mask"]) > 0)
        target = [s for s in stock_out if s["label"] != "background"]
        if target:
            np.save("stock.npy", np.asarray(target[0]["mask"]) > 0)
        json.dump({{"labels": [s["label"] for s in stock_out],
                    "custom": [{{k: v for k, v in s.items() if k != "mask"}} for (s,) in out]}},
                  open("result.json", "w"))
        """,
        tmp_path,
    )
    result = json.loads((tmp_path / "result.json").read_text())
    expected = pipe([retina, chest, synthetic], modality=[None, None, "colonoscopy"], batch_size=3)
    for i, (segment,) in enumerate(expected):
        remote = result["custom"][i]
        assert remote["modality"] == segment["modality"] and remote["label"] == segment["label"]
        assert remote["modality_source"] == segment["modality_source"]
        assert remote["score"] == pytest.approx(segment["score"], abs=1e-5)
        assert_masks_agree(np.load(tmp_path / f"mask{i}.npy"), _mask([segment]))
    assert result["custom"][1]["modality"] == "x-ray" and result["custom"][1]["modality_source"] == "file"
    retina_auto = pipe(Image.open(retina), mask_threshold=0.5)[0]  # as the stock pipeline thresholds
    assert retina_auto["label"] in result["labels"] or not _mask([retina_auto]).any()
    if (tmp_path / "stock.npy").exists():
        assert_masks_agree(np.load(tmp_path / "stock.npy"), _mask([retina_auto]))


def test_in_memory_model_without_a_folder(images):
    from esp_medsam_hf.models.esp_medsam.pipeline_esp_medsam import segment

    network, processor = tiny_model(seed=3)
    out = segment(images[:2], network, processor.image_processor, modality="x-ray", batch_size=2)
    assert [s[0]["label"] for s in out] == ["lung fields", "lung fields"]


def test_resaved_model_keeps_the_pipelines_its_config_advertises(saved, pipe, images, tmp_path):
    """save_pretrained of a reloaded model (package class, then remote code) keeps custom_pipelines' code."""
    from esp_medsam_hf import EspMedSamModel

    copy = tmp_path / "copy"
    EspMedSamModel.from_pretrained(saved).save_pretrained(copy)
    EspMedSamProcessor.from_pretrained(saved).save_pretrained(copy)
    assert json.loads((copy / "config.json").read_text())["custom_pipelines"][TASK]["impl"] == (
        "pipeline_esp_medsam.EspMedSamSegmentationPipeline")
    np.save(tmp_path / "image.npy", images[0])
    run_without_package(
        f"""
        import json, numpy as np
        from PIL import Image
        from transformers import AutoModel, AutoProcessor, pipeline
        image = np.load("image.npy")
        remote = AutoModel.from_pretrained({str(copy)!r}, trust_remote_code=True)
        assert type(remote).__module__.startswith("transformers_modules"), type(remote).__module__
        remote.save_pretrained("copy2")
        AutoProcessor.from_pretrained({str(copy)!r}, trust_remote_code=True).save_pretrained("copy2")
        results = {{}}
        for folder in ({str(copy)!r}, "copy2"):
            custom = pipeline(model=folder, trust_remote_code=True)
            stock = pipeline("image-segmentation", model=folder, trust_remote_code=True)
            segment = custom(image, modality="dermoscopy")[0]
            np.save(f"{{len(results)}}.npy", np.asarray(segment["mask"]) > 0)
            stock_labels = [s["label"] for s in stock(Image.fromarray(image), threshold=0.0)]
            results[folder] = [segment["label"], segment["score"], stock_labels]
        json.dump(results, open("result.json", "w"))
        """,
        tmp_path,
    )
    result = json.loads((tmp_path / "result.json").read_text())
    expected = pipe(images[0], modality="dermoscopy")[0]
    automatic = pipe(images[0])[0]["label"]
    for i, (label, score, stock_labels) in enumerate(result.values()):
        assert label == expected["label"] and score == pytest.approx(expected["score"], abs=1e-5)
        np.testing.assert_array_equal(np.load(tmp_path / f"{i}.npy"), _mask([expected]))
        assert stock_labels and set(stock_labels) <= {"background", automatic}
    assert (tmp_path / "copy2" / "pipeline_esp_medsam.py").read_text() == (saved / "pipeline_esp_medsam.py").read_text()


def test_pipeline_class_path_runs_no_remote_code_prompt(saved, monkeypatch):
    """pipeline(..., pipeline_class=...) loads the package's classes without asking about remote code."""
    import builtins

    questions = []

    def answer_no(prompt=""):
        questions.append(prompt)
        return "n"

    monkeypatch.setattr(builtins, "input", answer_no)
    pipe = pipeline(TASK, model=str(saved), pipeline_class=EspMedSamSegmentationPipeline)
    assert questions == []
    assert type(pipe.image_processor).__module__ == "esp_medsam_hf.models.esp_medsam.image_processing_esp_medsam"
    assert type(pipe.model).__module__ == "esp_medsam_hf.models.esp_medsam.modeling_esp_medsam"


def test_stock_pipeline_reads_a_dicom_path_by_content(saved, pipe, tmp_path):
    """pydicom-data's RG1_UNCR.dcm also carries a TIFF header: Pillow must read it as DICOM (windowed pixels)."""
    from esp_medsam_hf.models.esp_medsam.image_reading import load_image

    source = assets.CHEST_XRAY_DICOM.path()
    path = tmp_path / "chest"  # no suffix: recognised by the DICM preamble alone
    path.write_bytes(source.read_bytes())
    opened = Image.open(path)
    pixels, _ = load_image(path)
    assert opened.format == "DICOM" and opened.info["modality"] == "x-ray"
    np.testing.assert_array_equal(np.asarray(opened.convert("RGB")), pixels)
    stock = pipeline("image-segmentation", model=str(saved))
    segments = stock(str(path), threshold=0.0)
    expected = pipe(pixels, mask_threshold=0.5)[0]  # an array: the classifier chooses, as in the stock pipeline
    assert [s["label"] for s in segments] == [expected["label"]]
    assert segments[0]["score"] == pytest.approx(expected["score"], abs=1e-5)
    # the stock post-processing and ours upsample along two code paths: one pixel of 3.6 M differed on an AMD CPU
    assert_masks_agree(_mask(segments), _mask([expected]))
