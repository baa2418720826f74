"""Training on a frozen encoder's cached features: same loss as the full forward, seeded views, frozen parts,
the options' checks, and an ESP-MedSAM teacher with intensity-augmented distillation."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from esp_medsam_hf import EspMedSamConfig, EspMedSamModel
from esp_medsam_hf.training import DistillConfig, EspMedSamStageConfig, TeacherConfig, train
from esp_medsam_hf.training.data import SegmentationDataset
from esp_medsam_hf.training.features import VIEWS, EspMedSamAfterCache, apply_view, cache_features
from esp_medsam_hf.training.stages import espmedsam_task, run_distill, run_espmedsam, run_teacher
from esp_medsam_hf.training.stages.distill import intensity_augment
from esp_medsam_hf.training.stages.shared import make_processor
from esp_medsam_hf.training.stages.student import apply_freeze

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 64
COMMON = dict(model_size="tiny", image_size=SIZE, progress=False, synthetic_valid_images=1, learning_rate=1e-3)


def tiny_model() -> EspMedSamModel:
    torch.manual_seed(0)
    model = EspMedSamModel(EspMedSamConfig.tiny(image_size=SIZE))
    with torch.no_grad():  # bags that do something, so a wrong bag in the cache would show
        for bag in model.modality_controller.bags:
            for block in bag.blocks:
                block.mlp.fc2.weight.normal_(std=0.05)
    return model


def test_views_are_the_flips_and_rotation():
    array = np.arange(6).reshape(2, 3)
    assert [apply_view(array, v).tolist() for v in VIEWS] == [
        [[0, 1, 2], [3, 4, 5]], [[2, 1, 0], [5, 4, 3]], [[3, 4, 5], [0, 1, 2]], [[5, 4, 3], [2, 1, 0]]]
    with pytest.raises(ValueError, match="unknown view"):
        apply_view(array, "rot90")


def test_encoding_logs_the_seconds_it_took(data, caplog):
    """The record scripts/benchmark_stage3.py reads: the encoding's own duration, within the call's wall time
    (a loop variable once shadowed the timer's start, and the clock's reading minus a batch index came out)."""
    import time

    model = tiny_model()
    apply_freeze(model, ["encoder"])
    processor = make_processor(SIZE, model.config.modality_names)
    rows = SegmentationDataset(data, "train")
    began = time.perf_counter()
    with caplog.at_level("INFO", logger="esp_medsam_hf.training.features"):
        cache_features(model, processor.image_processor, rows, views=2, batch_size=4, progress=False)
    took = time.perf_counter() - began
    [record] = [r for r in caplog.records if hasattr(r, "encoding_seconds")]
    assert 0 < record.encoding_seconds <= took
    assert f"{len(rows) * 2} views of {len(rows)} images" in record.getMessage()


def test_heads_on_cached_features_give_the_models_own_loss(data):
    model = tiny_model()
    apply_freeze(model, ["encoder"])
    processor = make_processor(SIZE, model.config.modality_names)
    rows = SegmentationDataset(data, "train", augment=True, seed=0)
    features = cache_features(model, processor.image_processor, rows, views=2, progress=False)
    assert features.features.shape[:2] == (6, 2) and len(features) == 6
    heads = EspMedSamAfterCache(model).eval()
    row = rows.rows[4]
    for view in (0, 1):
        image = apply_view(np.asarray(row["image"].convert("RGB")), VIEWS[view])
        mask = apply_view(np.asarray(row["mask"]) > 0, VIEWS[view]).astype(np.uint8)
        inputs = processor.image_processor([image], segmentation_maps=[mask], return_tensors="pt")
        modality = torch.tensor([row["modality"]])
        with torch.no_grad():
            expected = model(pixel_values=inputs["pixel_values"], modality=modality, labels=inputs["labels"]).loss
            cached = heads(features.features[4:5, view], features.pooled[4:5, view], modality,
                           features.labels[4:5, view])
        torch.testing.assert_close(cached, expected, rtol=1e-4, atol=1e-5)
    # the view an item shows is drawn from (seed, epoch, index): the same again, another epoch may differ
    drawn = [[features[i]["features"] for i in range(6)] for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*drawn))
    picked = set()
    for epoch in range(6):
        features.set_epoch(epoch)
        picked |= {int(torch.equal(features[i]["features"], features.features[i, 1])) for i in range(6)}
    assert picked == {0, 1}


def train_and_compare(config: EspMedSamStageConfig, data) -> tuple[set[str], object, EspMedSamModel]:
    """Train a tiny model with ``config``; (the state-dict keys that changed, the result, the model)."""
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    task, _, _ = espmedsam_task(config, model=model, data=data)
    result = train(config, task)
    after = load_file(result.final_dir / "model.safetensors")
    return {k for k in after if not torch.equal(after[k], before[k])}, result, model


def test_cached_training_moves_only_the_heads(tmp_path, data):
    config = EspMedSamStageConfig(output_dir=str(tmp_path / "run"), init_from=None, epochs=2, batch_size=2,
                                  freeze=["encoder", "modality_classifier"], cache_features=True, feature_views=2,
                                  **COMMON)
    changed, result, _ = train_and_compare(config, data)
    assert changed and all(k.startswith(("prompt_generator.", "mask_decoder.")) for k in changed)
    assert any(k.startswith("prompt_generator.") for k in changed)
    assert result.best_metric is not None and 0 <= result.best_metric <= 100


@pytest.mark.parametrize("frozen_stages", [1, 2, 4])
def test_a_frozen_prefix_cache_gives_the_models_own_loss_and_gradients(data, frozen_stages):
    """Features cached after the first stages give, through the later stages, the full forward's loss and the same
    gradients on every part that still trains; the frozen prefix gets none."""
    model = tiny_model()
    apply_freeze(model, ["modality_classifier"], frozen_stages)
    processor = make_processor(SIZE, model.config.modality_names)
    rows = SegmentationDataset(data, "train", augment=False, seed=0)
    features = cache_features(model, processor.image_processor, rows, views=1, frozen_stages=frozen_stages,
                              progress=False)
    row = rows.rows[4]
    inputs = processor.image_processor([np.asarray(row["image"].convert("RGB"))],
                                       segmentation_maps=[(np.asarray(row["mask"]) > 0).astype(np.uint8)],
                                       return_tensors="pt")
    modality = torch.tensor([row["modality"]])
    trainable = EspMedSamAfterCache(model, frozen_stages).eval()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert {n.split(".")[1] for n in frozen if n.startswith("aggregator.")} == {
        "patch_embed", "stage0", *(["stages"] if frozen_stages > 1 else [])}
    assert any(n.startswith("aggregator.neck.") for n in names)
    expected = model(pixel_values=inputs["pixel_values"], modality=modality, labels=inputs["labels"]).loss
    expected_grads = torch.autograd.grad(expected, [dict(model.named_parameters())[n] for n in names])
    cached = trainable(features.features[4:5, 0], features.pooled[4:5, 0], modality, features.labels[4:5, 0])
    cached_grads = torch.autograd.grad(cached, [dict(model.named_parameters())[n] for n in names])
    torch.testing.assert_close(cached, expected, rtol=1e-4, atol=1e-5)
    for name, a, b in zip(names, cached_grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=name)


def test_prefix_cached_training_leaves_the_prefix_untouched(tmp_path, data):
    config = EspMedSamStageConfig(output_dir=str(tmp_path / "run"), init_from=None, epochs=1, batch_size=2,
                                  frozen_encoder_stages=2, cache_features=True, feature_views=2, **COMMON)
    changed, _, model = train_and_compare(config, data)
    blocks_before = len(model.aggregator.stages[0].blocks)  # stage 1's blocks are the bags' first blocks
    prefix = ("aggregator.patch_embed.", "aggregator.stage0.", "aggregator.stages.0.")
    assert not {k for k in changed if k.startswith(prefix)}
    assert not {k for k in changed if k.startswith("modality_controller.") and
                int(k.split(".")[4]) < blocks_before}
    assert any(k.startswith("aggregator.stages.1.") for k in changed)
    assert any(k.startswith("aggregator.neck.") for k in changed)
    assert any(k.startswith("mask_decoder.") for k in changed)


def test_a_stage_called_directly_is_seeded_by_its_config(tmp_path, data):
    """The main job calls the stages directly (not through run_stage): whatever the global RNG was before, one seed
    gives one model (torch's initial seed differs between processes)."""
    hashes = []
    for run, noise in enumerate((1, 2)):
        torch.manual_seed(noise)
        config = EspMedSamStageConfig(output_dir=str(tmp_path / f"run{run}"), init_from=None, epochs=1, batch_size=2,
                                      frozen_encoder_stages=2, cache_features=True, feature_views=1, **COMMON)
        result = run_espmedsam(config, data=data)
        hashes.append(load_file(result.release_dir / "model.safetensors"))
    assert hashes[0].keys() == hashes[1].keys()
    assert all(torch.equal(hashes[0][k], hashes[1][k]) for k in hashes[0])


def test_options_are_checked():
    with pytest.raises(ValueError, match="needs the encoder frozen"):
        EspMedSamStageConfig(cache_features=True, freeze=["aggregator"])
    assert EspMedSamStageConfig(cache_features=True, freeze=["aggregator", "bags"]).cache_features
    with pytest.raises(ValueError, match="unknown part"):
        TeacherConfig(freeze=["neck"])
    with pytest.raises(ValueError, match="feature_views"):
        EspMedSamStageConfig(feature_views=5)
    with pytest.raises(ValueError, match="frozen_encoder_stages"):
        EspMedSamStageConfig(frozen_encoder_stages=5)
    assert EspMedSamStageConfig(cache_features=True, frozen_encoder_stages=3).cache_point == 3
    assert EspMedSamStageConfig(cache_features=True, freeze=["encoder"], frozen_encoder_stages=3).cache_point is None
    with pytest.raises(ValueError, match="threads"):
        EspMedSamStageConfig(threads=0)


def test_intensity_augment_stays_in_range_and_is_seeded():
    processor = make_processor(SIZE, ("a",) * 6).image_processor
    pixels = processor([np.full((SIZE, SIZE, 3), v, dtype=np.uint8) for v in (0, 128, 255)],
                       return_tensors="pt")["pixel_values"]
    first = intensity_augment(pixels, processor, torch.Generator().manual_seed(1))
    again = intensity_augment(pixels, processor, torch.Generator().manual_seed(1))
    assert torch.equal(first, again) and not torch.allclose(first, pixels)
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    values = (first * std + mean)
    assert values.min() >= -1e-5 and values.max() <= 1 + 1e-5


def test_esp_medsam_teacher_then_intensity_distillation(tmp_path, data):
    """Stage 1 with an ESP-MedSAM teacher on cached features, stage 2 distilling it into the bags under intensity
    shifts (the main job's path, with a tiny random model instead of LiteMedSAM's weights)."""
    teacher_dir = tmp_path / "init"
    tiny_model().save_pretrained(teacher_dir)
    teacher_config = TeacherConfig(output_dir=str(tmp_path / "teacher"), init_from=str(teacher_dir), epochs=1,
                                   batch_size=2, freeze=["encoder"], cache_features=True, feature_views=1, **COMMON)
    teacher = run_teacher(teacher_config, data=data)
    assert teacher.release_dir == tmp_path / "teacher" / "release"
    assert (teacher.release_dir / "model.safetensors").is_file()
    distill_config = DistillConfig(output_dir=str(tmp_path / "distill"), teacher=str(teacher.release_dir),
                                   init_from=str(teacher.release_dir), common_max_steps=0, specific_max_steps=2,
                                   intensity_augment=True, batch_size=2, **COMMON)
    distill = run_distill(distill_config, data=data)
    assert not (tmp_path / "distill" / "common").exists() and distill.metrics["common_mse"] is None
    assert distill.metrics["specific_mse"] > 0  # the student sees shifted images: it must learn, not copy
    before = load_file(teacher.release_dir / "model.safetensors")
    after = load_file(distill.release_dir / "model.safetensors")
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith("modality_controller.") for k in changed)
    touched = {int(k.split(".")[2]) for k in changed}
    assert touched <= {0, 4}  # isic (dermoscopy) and dsb (microscopy) bags only


def test_bf16_encoding_stays_close_to_float32_and_is_stored_in_float32(data):
    """The main job encodes under bf16 autocast where the CPU computes bf16 natively: the cached features stay
    float32 and within 5 % of the largest feature of the float32 cache, and encoding twice gives the same bits."""
    model = tiny_model()
    apply_freeze(model, [], 2)
    processor = make_processor(SIZE, model.config.modality_names)
    rows = SegmentationDataset(data, "train", augment=False, seed=0)
    exact = cache_features(model, processor.image_processor, rows, views=1, frozen_stages=2, progress=False)
    fast = [cache_features(model, processor.image_processor, rows, views=1, frozen_stages=2, bf16=True,
                           progress=False) for _ in range(2)]
    assert fast[0].features.dtype == torch.float32
    assert torch.equal(fast[0].features, fast[1].features)
    scale = exact.features.abs().max()
    assert (fast[0].features - exact.features).abs().max() <= 0.05 * scale
    assert not torch.equal(fast[0].features, exact.features)


def test_auto_mixed_precision_is_bf16_only_where_the_cpu_has_it(monkeypatch):
    from esp_medsam_hf.training.config import resolve_mixed_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for avx512_bf16, amx, expected in ((True, False, "bf16"), (False, True, "bf16"), (False, False, "no")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert resolve_mixed_precision("auto") == expected
        assert resolve_mixed_precision("no") == "no"
    with pytest.raises(ValueError, match="mixed_precision"):
        EspMedSamStageConfig(mixed_precision="bf17")


def test_auto_mixed_precision_trains_on_cached_features(tmp_path, data):
    config = EspMedSamStageConfig(output_dir=str(tmp_path / "run"), init_from=None, epochs=1, batch_size=2,
                                  frozen_encoder_stages=2, cache_features=True, feature_views=1,
                                  mixed_precision="auto", **COMMON)
    changed, result, _ = train_and_compare(config, data)
    assert any(k.startswith("mask_decoder.") for k in changed)
    assert result.best_metric is not None and 0 <= result.best_metric <= 100
