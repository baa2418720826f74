"""Prompted training (stage 3's ``prompt_fraction``): simulated boxes and clicks, prompted steps that train the
prompt encoder and the decoder, on images and on cached features, prompt_fraction 0 as before, the flag, resume."""

import argparse
import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from esp_medsam_hf import EspMedSamConfig, EspMedSamModel
from _training_helpers import assert_resume_matches_straight
from esp_medsam_hf.training import EspMedSamStageConfig, train
from esp_medsam_hf.training.features import EspMedSamAfterCache, encode
from esp_medsam_hf.training.prompts import (
    EspMedSamPromptedTraining,
    PromptDraw,
    draw_prompt,
    simulate_boxes,
    simulate_clicks,
)
from esp_medsam_hf.training.stages import espmedsam_task
from esp_medsam_hf.training.stages.shared import segmentation_task
from esp_medsam_hf.training.stages.student import apply_freeze, student_processor

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 64
COMMON = dict(model_size="tiny", image_size=SIZE, progress=False, synthetic_valid_images=1, learning_rate=1e-3,
              init_from=None, validate=False)


def student() -> EspMedSamModel:
    torch.manual_seed(0)
    return EspMedSamModel(EspMedSamConfig.tiny(image_size=SIZE))


def objects_image() -> np.ndarray:
    """Three objects, one touching the left border and one the bottom right corner."""
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[10:20, 0:6] = True
    mask[30:41, 25:33] = True
    mask[58:64, 55:64] = True
    return mask


def test_simulated_boxes_contain_their_objects_and_stay_inside_the_image():
    from scipy import ndimage

    many = np.zeros((SIZE, SIZE), dtype=bool)
    for k in range(12):  # 12 separate 2x2 objects
        many[4 + 5 * k : 6 + 5 * k, 10:12] = True
    labels = np.stack([objects_image(), many, np.zeros((SIZE, SIZE), dtype=bool)])
    draw = PromptDraw("boxes", seed=3, max_objects=5, box_jitter=0.2)
    boxes, real = simulate_boxes(labels, draw)
    assert boxes.shape == (3, 5, 4) and real.tolist() == [[1, 1, 1, 0, 0], [1] * 5, [0] * 5]
    assert (boxes >= 0).all() and (boxes <= SIZE).all()
    assert (boxes[~real] == [0, 0, SIZE, SIZE]).all()  # padding rows are whole-image boxes
    for mask, image_boxes, image_real in zip(labels, boxes, real):
        components, _ = ndimage.label(mask, structure=np.ones((3, 3)))
        for box in image_boxes[image_real]:
            x0, y0, x1, y1 = box
            assert x1 - x0 >= 2 and y1 - y0 >= 2
            # the box holds whole objects only: every object pixel whose centre is inside belongs to an object
            # lying entirely inside (pixel c covers [c, c + 1])
            held = {int(components[int(y), int(x)]) for y in np.arange(np.ceil(y0), y1) for x in np.arange(np.ceil(x0), x1)
                    if y < SIZE and x < SIZE and components[int(y), int(x)]}
            assert held
            for label in held:
                rows, columns = np.nonzero(components == label)
                assert x0 <= columns.min() and columns.max() + 1 <= x1 and y0 <= rows.min() and rows.max() + 1 <= y1
    again, _ = simulate_boxes(labels, draw)
    other, _ = simulate_boxes(labels, dataclasses.replace(draw, seed=4))
    assert np.array_equal(boxes, again) and not np.array_equal(boxes, other)  # seeded jitter


def test_clicks_land_in_the_largest_error_region_with_its_label():
    reference = np.zeros((3, SIZE, SIZE), dtype=bool)
    prediction = np.zeros((3, SIZE, SIZE), dtype=bool)
    reference[0, 10:30, 10:30] = True  # image 0: a large miss and a small extra region -> positive in the miss
    prediction[0, 50:53, 50:53] = True
    reference[1, 5:10, 5:10] = True  # image 1: right object, large extra region -> negative in it
    prediction[1, 5:10, 5:10] = True
    prediction[1, 30:50, 20:44] = True
    reference[2, 5:10, 5:10] = True  # image 2: exact -> padding
    prediction[2] = reference[2]
    points, labels = simulate_clicks(prediction, reference)
    assert points.shape == (3, 1, 1, 2) and labels.shape == (3, 1, 1)
    assert labels[:, 0, 0].tolist() == [1, 0, -1]
    x, y = points[0, 0, 0].astype(int)
    assert 15 <= x <= 24 and 15 <= y <= 24  # near the centre of the missed square
    x, y = points[1, 0, 0].astype(int)
    assert prediction[1, y, x] and not reference[1, y, x] and 35 <= y <= 44 and 27 <= x <= 36


def test_draws_are_seeded_and_follow_the_fraction():
    draws = [draw_prompt(0.5, 7, epoch, batch, max_objects=4, box_jitter=0.1) for epoch in range(10)
             for batch in range(20)]
    again = [draw_prompt(0.5, 7, epoch, batch, max_objects=4, box_jitter=0.1) for epoch in range(10)
             for batch in range(20)]
    assert draws == again
    prompted = [d for d in draws if d is not None]
    assert 0.4 < len(prompted) / len(draws) < 0.6
    assert 0.35 < sum(d.kind == "clicks" for d in prompted) / len(prompted) < 0.65
    assert all(draw_prompt(0.0, 7, 0, b, max_objects=4, box_jitter=0.1) is None for b in range(50))


def one_step(module: torch.nn.Module, loss_of) -> dict[str, torch.Tensor]:
    """Gradient of one prompted batch per parameter name (of the wrapped model)."""
    module.zero_grad(set_to_none=True)
    loss_of(module).backward()
    return {name: p.grad for name, p in module.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["boxes", "clicks"])
def test_a_prompted_batch_trains_the_decoder_and_clicks_the_point_embeddings(data, kind):
    config = EspMedSamStageConfig(output_dir="unused", prompt_fraction=1.0, **COMMON)
    model = student()
    apply_freeze(model, [], prompts=True)
    processor = student_processor(model, None)
    images = [np.asarray(row["image"]) for row in data["dsb"]["train"]]
    masks = [np.asarray(row["mask"]).astype(np.uint8) for row in data["dsb"]["train"]]
    inputs = processor.image_processor(images, segmentation_maps=masks, return_tensors="pt")
    modality = torch.tensor([row["modality"] for row in data["dsb"]["train"]])
    labels = inputs["labels"].float()
    draw = PromptDraw(kind, seed=0, max_objects=config.prompt_max_objects, box_jitter=0.1)
    grads = one_step(EspMedSamPromptedTraining(model),
                     lambda m: m(inputs["pixel_values"], modality, labels, draw))
    assert any(name.startswith("mask_decoder.") and g.abs().sum() > 0 for name, g in grads.items())
    point = {"prompt_encoder.point_embed.0.weight", "prompt_encoder.point_embed.1.weight"}
    if kind == "clicks":
        assert any(grads[name].abs().sum() > 0 for name in point if name in grads)
    else:
        assert not any(name.startswith("prompt_encoder.") for name in grads)  # boxes are not tokens here
    # on cached image embeddings (freeze: encoder) the same batch gives the same gradients
    model.aggregator.requires_grad_(False)
    model.modality_controller.requires_grad_(False)
    embeddings, pooled = encode(model, inputs["pixel_values"], modality)
    cached = one_step(EspMedSamAfterCache(model, None).train(),
                      lambda m: m(embeddings, pooled, modality, labels, prompt=draw))
    again = one_step(EspMedSamPromptedTraining(model), lambda m: m(inputs["pixel_values"], modality, labels, draw))
    for name in ("mask_decoder.mask_queries.weight", *sorted(point & cached.keys())):
        assert torch.allclose(cached[name], again[name], atol=1e-5, rtol=1e-4), name


def final_weights(config: EspMedSamStageConfig, task) -> dict[str, torch.Tensor]:
    train(config, task)
    return load_file(f"{config.output_dir}/final/model.safetensors")


def test_prompt_fraction_zero_trains_as_before_and_a_positive_one_moves_the_point_embeddings(tmp_path, data):
    config = EspMedSamStageConfig(output_dir=str(tmp_path / "zero"), batch_size=2, max_steps=3, **COMMON)
    task, _, _ = espmedsam_task(config, student(), data)
    assert task.prepare_batch is None and isinstance(task.model, EspMedSamModel)
    zero = final_weights(config, task)
    # what stage 3 built before prompted training existed
    model = student()
    apply_freeze(model, config.freeze, config.frozen_encoder_stages)
    before = dataclasses.replace(config, output_dir=str(tmp_path / "before"))
    task, _, _ = segmentation_task("espmedsam", model, before, data, student_processor(model, None))
    legacy = final_weights(before, task)
    assert zero.keys() == legacy.keys() and all(torch.equal(zero[k], legacy[k]) for k in zero)

    prompted = dataclasses.replace(config, output_dir=str(tmp_path / "prompted"), prompt_fraction=1.0, seed=3)
    task, _, _ = espmedsam_task(prompted, student(), data)
    kinds = [draw_prompt(1.0, 3, 0, b, max_objects=8, box_jitter=0.1).kind for b in range(3)]
    assert kinds == ["clicks", "boxes", "clicks"]
    weights = final_weights(prompted, task)
    start = student().state_dict()
    points = [f"prompt_encoder.point_embed.{k}.weight" for k in (0, 1)]
    assert any(not torch.equal(weights[name], start[name]) for name in points)
    assert not torch.equal(weights["mask_decoder.mask_queries.weight"], zero["mask_decoder.mask_queries.weight"])
    box_corner = "prompt_encoder.point_embed.2.weight"
    assert torch.equal(weights[box_corner], start[box_corner])  # boxes are not tokens: never trained
    assert all(torch.equal(zero[name], start[name]) for name in points)  # prompt-free: the prompt encoder stays


def test_the_flag_reaches_the_config_and_bad_values_are_refused():
    from esp_medsam_hf.commands.train import add_arguments, stage_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--stage", "espmedsam", "--prompt-fraction", "0.25", "--prompt-max-objects", "4"])
    config = stage_config(args)
    assert (config.prompt_fraction, config.prompt_max_objects, config.prompt_box_jitter) == (0.25, 4, 0.1)
    assert EspMedSamStageConfig().prompt_fraction == 0
    with pytest.raises(ValueError, match="prompt_fraction must be a number in"):
        EspMedSamStageConfig(prompt_fraction=1.5)
    with pytest.raises(ValueError, match="prompt_max_objects"):
        EspMedSamStageConfig(prompt_max_objects=0)


@pytest.mark.parametrize("cached", [False, True])
def test_resume_with_prompts_gives_the_same_parameters(tmp_path, data, cached):
    """Interrupted at step 3, resumed from the step-2 checkpoint: the same parameters as uninterrupted, with half
    of the batches prompted."""
    extra = dict(freeze=["encoder"], cache_features=True, feature_views=1) if cached else {}
    config = EspMedSamStageConfig(output_dir="unused", batch_size=2, epochs=3, max_steps=4, checkpoint_every=1,
                                  keep_checkpoints=3, prompt_fraction=0.5, seed=3, **extra, **COMMON)
    draws = [draw_prompt(0.5, 3, e, b, max_objects=8, box_jitter=0.1) for e, b in [(0, 0), (0, 1), (0, 2), (1, 0)]]
    assert [d and d.kind for d in draws] == ["clicks", "boxes", None, "clicks"]  # 3 batches per epoch
    assert_resume_matches_straight(config, lambda c: espmedsam_task(c, student(), data)[0], tmp_path)
