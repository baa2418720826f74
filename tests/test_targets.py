"""Targets as first-class citizens: a target added to a modality has its own bag and query, starts as its
modality's own target, survives saving and reloading, and training it alone leaves every other target bit-identical."""

import numpy as np
import pytest
import torch
from _inference_helpers import TARGET_SIZE, base_model, masks, model_with_disc

from esp_medsam_hf import EspMedSamConfig, EspMedSamModel
from esp_medsam_hf.training import EspMedSamStageConfig, train
from esp_medsam_hf.training.loop import parameter_groups
from esp_medsam_hf.training.stages import espmedsam_task
from esp_medsam_hf.training.targets import add_target, freeze_all_but_target

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = TARGET_SIZE


def test_added_target_starts_as_its_modality_and_is_named():
    model, images = base_model(), torch.randn(3, 3, SIZE, SIZE)
    grown = add_target(model, "optic disc", "fundus").eval()
    assert grown.config.all_target_names[-1] == "optic disc"
    assert grown.config.id2label[7] == "optic disc" and grown.config.targets_of("fundus") == ["retinal vessels",
                                                                                               "optic disc"]
    every = torch.tensor([0, 3, 4])
    assert torch.equal(masks(model, images, modality=every), masks(grown, images, modality=every))
    disc = grown(images, target=torch.tensor([6, 3, 6]))
    assert disc.target.tolist() == [6, 3, 6] and disc.modality.tolist() == [3, 3, 3]
    torch.testing.assert_close(disc.pred_masks[0], masks(model, images[:1], modality=3)[0], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="already has a target named 'optic disc'"):
        add_target(grown, "optic disc", "fundus")
    with pytest.raises(ValueError, match="unknown modality 'retina'"):
        add_target(model, "optic cup", "retina")
    with pytest.raises(ValueError, match="target index 7 is out of range"):
        grown(images, target=7)
    with pytest.raises(ValueError, match="not both"):
        grown(images, modality=3, target=6)


def test_targets_survive_save_and_reload(tmp_path):
    grown = model_with_disc()
    grown.save_pretrained(tmp_path)
    reloaded = EspMedSamModel.from_pretrained(tmp_path).eval()
    assert reloaded.config.extra_targets == [{"name": "optic disc", "modality": "fundus"}]
    images = torch.randn(2, 3, SIZE, SIZE)
    assert torch.equal(masks(grown, images, target=6), masks(reloaded, images, target=6))


def test_a_model_without_extra_targets_is_unchanged():
    model = base_model()
    assert not hasattr(model.mask_decoder, "target_queries") and len(model.modality_controller.bags) == 6
    assert "extra_targets" in model.config.to_dict() and model.config.num_targets == 6


def test_predict_decodes_the_target_in_the_whole_view_and_in_tiles():
    from esp_medsam_hf import EspMedSamImageProcessor, EspMedSamProcessor
    from esp_medsam_hf.models.esp_medsam.prediction import predict

    grown = model_with_disc()
    processor = EspMedSamProcessor(
        EspMedSamImageProcessor(size={"height": SIZE, "width": SIZE}), grown.config.modality_names
    )
    images = [np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for seed in (0, 1)]
    whole = predict(grown, processor, images, "dermoscopy", scale="whole", target="optic disc")
    inputs = processor(images=images, return_tensors="pt")
    direct = processor.image_processor.post_process_masks(
        masks(grown, inputs["pixel_values"], target=6), inputs["original_sizes"], binarize=False
    )
    assert whole.modality == [3, 3] and whole.scales == [None, None]
    torch.testing.assert_close(whole.logits[0], direct[0], rtol=0, atol=1e-4)
    own = predict(grown, processor, images, "fundus", scale="whole")
    assert not torch.allclose(whole.logits[0], own.logits[0])
    tiled = predict(grown, processor, images, scale=2.0, target=6)
    own_tiled = predict(grown, processor, images, "fundus", scale=2.0)
    assert tiled.scales == [2.0, 2.0] and tiled.modality == [3, 3]
    assert not torch.allclose(tiled.logits[0], own_tiled.logits[0])
    fundus_by_target = predict(grown, processor, images, scale=2.0, target="retinal vessels")
    torch.testing.assert_close(fundus_by_target.logits[0], own_tiled.logits[0], rtol=0, atol=1e-5)


def test_a_model_with_an_added_target_runs_on_onnxruntime_as_in_pytorch():
    """The exported graph of a grown model (an extra target: one more decoder query) gives its modalities' masks as
    the PyTorch model does; the target itself is decoded by the PyTorch model on every backend."""
    pytest.importorskip("onnxruntime")
    from esp_medsam_hf.models.esp_medsam.backends import run_inference

    model = model_with_disc()
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, TARGET_SIZE, TARGET_SIZE)
    modality = torch.tensor([3, 4])
    eager = run_inference(model, pixels, modality, backend="eager")
    exported = run_inference(model, pixels, modality, backend="onnxruntime", int8=False)
    torch.testing.assert_close(exported.pred_masks, eager.pred_masks, rtol=1e-4, atol=1e-4)
    disc = model.config.target_index("optic disc")
    on_onnx = run_inference(model, pixels, backend="onnxruntime", target=disc).pred_masks
    torch.testing.assert_close(on_onnx, masks(model, pixels, target=torch.full((2,), disc)), rtol=1e-5, atol=1e-6)


def test_prompts_decode_the_targets_query():
    grown, images = model_with_disc(), torch.rand(2, 3, SIZE, SIZE)
    points, labels = torch.tensor([[[[20.0, 30.0]]]] * 2), torch.ones(2, 1, 1, dtype=torch.long)
    with torch.no_grad():
        prompted = grown(images, target=6, input_points=points, input_labels=labels)
        embeddings = grown.get_image_embeddings(images, target=6)
        cached = grown(image_embeddings=embeddings, target=6, input_points=points, input_labels=labels)
        own = grown(images, modality=3, input_points=points, input_labels=labels)
    assert prompted.target.tolist() == [6, 6] and prompted.modality.tolist() == [3, 3]
    torch.testing.assert_close(cached.pred_masks, prompted.pred_masks, rtol=0, atol=1e-5)
    assert not torch.allclose(prompted.pred_masks, own.pred_masks)
    with pytest.raises(ValueError, match="not both"):
        grown(image_embeddings=embeddings, modality=3, target=6, input_points=points, input_labels=labels)


def test_training_only_the_new_target_leaves_the_others_bit_identical(tmp_path, data):
    model, images = base_model(), torch.randn(4, 3, SIZE, SIZE)
    others = torch.tensor([0, 3, 4, 5])
    before = masks(model, images, modality=others)
    config = EspMedSamStageConfig(
        output_dir=str(tmp_path), batch_size=3, epochs=2, validate=False, init_from="unused", model_size="tiny",
        image_size=SIZE, progress=False, synthetic_valid_images=1, learning_rate=1e-2, new_target="optic disc",
        target_modality="fundus", augment=False,
    )
    task, _, _ = espmedsam_task(config, model, data)
    trained = task.model.model
    start = masks(trained, images, target=6)
    train(config, task)
    trained.eval()
    assert torch.equal(before, masks(trained, images, modality=others))
    assert not torch.allclose(start, masks(trained, images, target=6))
    reloaded = EspMedSamModel.from_pretrained(tmp_path / "final").eval()
    assert torch.equal(before, masks(reloaded, images, modality=others))


def _norm_statistics(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.named_buffers() if "running_" in name}


def test_training_all_for_a_new_target_keeps_every_batch_norm(tmp_path, data):
    """--train-all: the shared encoder and decoder train on the new target's images, but the batch norms (weights and
    statistics, shared by every modality), the classifier and the self-patch prompt generator stay."""
    model = base_model()
    before = _norm_statistics(model)
    config = EspMedSamStageConfig(
        output_dir=str(tmp_path), batch_size=3, epochs=2, validate=False, init_from="unused", model_size="tiny",
        image_size=SIZE, progress=False, synthetic_valid_images=1, learning_rate=1e-2, new_target="optic disc",
        target_modality="fundus", augment=False, only_new_target=False,
    )
    task, _, _ = espmedsam_task(config, model, data)
    trained = task.model.model
    shared = trained.aggregator.stages[-1].blocks[0].attn.qkv.weight.clone()
    kept = {name: tensor.clone() for name, tensor in trained.state_dict().items()
            if name.startswith(("prompt_generator.", "modality_classifier."))}
    train(config, task)
    assert before and all(torch.equal(before[name], tensor) for name, tensor in _norm_statistics(trained).items())
    assert kept and all(torch.equal(kept[name], trained.state_dict()[name]) for name in kept)
    assert not torch.equal(shared, trained.aggregator.stages[-1].blocks[0].attn.qkv.weight)


def test_keeping_the_others_holds_the_modalitys_own_target_while_the_shared_parts_train(tmp_path, data):
    """--train-all with keep_others_weight (learning without forgetting): the term is 0 before anything moved, the
    starting copy is neither trained nor saved, and the fundus target's masks move far less than without it. (A
    tiny random model's masks are nearly constant, so the old and new targets pull one output bias: the weight
    here is large; docs/training.md measures the real model.)"""
    images = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    drift = {}
    for keep in (0.0, 200.0):
        model = base_model()
        before = masks(model, images, modality=torch.full((3,), 3))
        config = EspMedSamStageConfig(
            output_dir=str(tmp_path / f"keep{keep:g}"), batch_size=3, epochs=3, validate=False, init_from="unused",
            model_size="tiny", image_size=SIZE, progress=False, synthetic_valid_images=1, learning_rate=1e-2,
            new_target="optic disc", target_modality="fundus", augment=False, only_new_target=False,
            keep_others_weight=keep, shared_lr_scale=1.0,
        )
        task, _, _ = espmedsam_task(config, model, data)
        batch = task.collate_fn([task.train_dataset[i] for i in range(3)])
        with torch.no_grad():
            first = task.model(batch["pixel_values"], batch["labels"])
        train(config, task)
        task.model.eval()
        drift[keep] = (first, float((masks(task.model.model, images, modality=torch.full((3,), 3)) - before).abs().mean()))
        assert set(task.model.state_dict()) == {f"model.{name}" for name in task.model.model.state_dict()}
    torch.testing.assert_close(drift[200.0][0], drift[0.0][0], rtol=0, atol=1e-5)  # nothing has moved yet
    assert drift[200.0][1] < 0.5 * drift[0.0][1]
    with pytest.raises(ValueError, match="keep_others_weight"):
        EspMedSamStageConfig(init_from="x", new_target="optic disc", target_modality="fundus", keep_others_weight=1.0)
    with pytest.raises(ValueError, match="keep_others_weight must be"):
        EspMedSamStageConfig(init_from="x", only_new_target=False, keep_others_weight=-1.0)


def test_the_shared_parts_train_at_their_own_learning_rate_with_train_all(tmp_path, data, caplog):
    """--train-all with shared_lr_scale: the new target's bag and query take Adam's steps at the learning rate, the
    shared encoder and decoder at that rate times the scale (Adam's steps scale with the rate, so the shared weights
    move about 100 times less at 0.01), and the optimizer has one group each."""
    moved = {}
    for scale in (1.0, 0.01):
        config = EspMedSamStageConfig(
            output_dir=str(tmp_path / f"scale{scale:g}"), batch_size=3, max_steps=2, validate=False,
            init_from="unused", model_size="tiny", image_size=SIZE, progress=False, synthetic_valid_images=1,
            learning_rate=1e-3, new_target="optic disc", target_modality="fundus", augment=False,
            only_new_target=False, keep_others_weight=0.0, shared_lr_scale=scale, cache_features=scale < 1,
            frozen_encoder_stages=1,
        )
        with caplog.at_level("WARNING"):
            task, _, _ = espmedsam_task(config, base_model(), data)
        assert ("cache_features is not used" in caplog.text) == (scale < 1)
        shared = task.model.model.aggregator.stages[-1].blocks[0].attn.qkv.weight
        query = task.model.model.mask_decoder.target_queries[0]
        start, query_start = shared.detach().clone(), query.detach().clone()
        groups = parameter_groups(task, [p for p in task.model.parameters() if p.requires_grad], 1e-3)
        assert [group["lr"] for group in groups] == [1e-3, 1e-3 * scale]
        assert any(p is query for p in groups[0]["params"]) and any(p is shared for p in groups[1]["params"])
        train(config, task)
        moved[scale] = (float((shared.detach() - start).abs().max()),
                        float((query.detach() - query_start).abs().max()))
    assert moved[0.01][0] < 0.05 * moved[1.0][0]
    assert moved[0.01][1] > 0.5 * moved[1.0][1]
    with pytest.raises(ValueError, match="shared_lr_scale sets"):
        EspMedSamStageConfig(init_from="x", new_target="optic disc", target_modality="fundus", shared_lr_scale=0.1)
    with pytest.raises(ValueError, match="shared_lr_scale must be"):
        EspMedSamStageConfig(init_from="x", only_new_target=False, shared_lr_scale=0.0)


def test_a_frozen_stage_keeps_its_batch_norm_statistics_while_trained_ones_move(tmp_path, data):
    model = base_model()
    before = _norm_statistics(model)
    config = EspMedSamStageConfig(
        output_dir=str(tmp_path), batch_size=3, epochs=1, validate=False, init_from="unused", model_size="tiny",
        image_size=SIZE, progress=False, synthetic_valid_images=1, frozen_encoder_stages=1, augment=False,
    )
    task, _, _ = espmedsam_task(config, model, data)
    train(config, task)
    after = _norm_statistics(model)
    frozen = [name for name in before if name.startswith(("aggregator.patch_embed.", "aggregator.stage0."))]
    moved = [name for name in before if name not in frozen and not torch.equal(before[name], after[name])]
    assert frozen and all(torch.equal(before[name], after[name]) for name in frozen)
    assert moved


def test_only_an_added_target_can_train_alone():
    with pytest.raises(ValueError, match="modality's own target"):
        freeze_all_but_target(base_model(), "retinal vessels")
    with pytest.raises(ValueError, match="new_target and target_modality go together"):
        EspMedSamStageConfig(init_from="x", new_target="optic disc")


def test_train_flags_reach_the_config_and_image_size_comes_from_init_from(tmp_path):
    import argparse

    from esp_medsam_hf.commands.train import add_arguments, stage_config

    base_model().save_pretrained(tmp_path)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--stage", "espmedsam", "--init-from", str(tmp_path), "--lr-decay", "0.5",
                              "--keep-checkpoints", "1", "--new-target", "optic disc", "--modality", "fundus"])
    config = stage_config(args)
    assert (config.image_size, config.lr_decay, config.keep_checkpoints) == (SIZE, 0.5, 1)
    assert (config.new_target, config.target_modality, config.only_new_target) == ("optic disc", "fundus", True)
    args = parser.parse_args(["--stage", "espmedsam", "--init-from", str(tmp_path), "--image-size", "128"])
    assert stage_config(args).image_size == 128


def test_a_typo_in_a_domain_name_suggests_the_closest():
    from esp_medsam_hf.data.domains import resolve_domains

    with pytest.raises(KeyError, match="did you mean 'vascx'"):
        resolve_domains(["vasxc"])
