"""Optional SAM-style prompts: model and processor arguments, the prompt-free equivalences, errors, save and reload,
remote code, and the weights the converters keep."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _inference_helpers import IMAGE_SIZE, run_without_package, save_tiny_model, single_thread, tiny_model
from esp_medsam_hf import EspMedSamModel
from esp_medsam_hf.models.esp_medsam.modeling_esp_medsam import PromptRows, edit_patch_map

TOLERANCE = 1e-5
"""Logits of a prompted and a prompt-free decoding that must be the same function (float32 rounding)."""


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from single_thread()


@pytest.fixture(scope="module")
def model_and_processor():
    return tiny_model(seed=3)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (40, 70, 3), dtype=np.uint8), rng.integers(0, 255, (90, 50, 3), dtype=np.uint8)]


def whole_image_boxes(images: list[np.ndarray]) -> list[list[list[int]]]:
    return [[[0, 0, image.shape[1], image.shape[0]]] for image in images]


def test_boxes_rescale_to_each_images_aspect_kept_size(model_and_processor, images):
    _, processor = model_and_processor
    boxed = processor(images, modality=[0, 3], input_boxes=whole_image_boxes(images))
    for i, (height, width) in enumerate(processor.image_processor.resized_sizes(boxed["original_sizes"])):
        assert max(height, width) == IMAGE_SIZE
        assert torch.allclose(boxed["input_boxes"][i, 0], torch.tensor([0.0, 0.0, width, height]), atol=0.5)


def test_whole_image_box_reproduces_the_prompt_free_mask(model_and_processor):
    """Square images fill the model input: a box over the whole image is the whole input and changes nothing. (An
    aspect-kept image is padded; its whole-image box also clears what the self-prompt put in the padding.)"""
    model, processor = model_and_processor
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (48, 48, 3), dtype=np.uint8), rng.integers(0, 255, (80, 80, 3), dtype=np.uint8)]
    plain = processor(images, modality=[0, 3])
    boxed = processor(images, modality=[0, 3], input_boxes=whole_image_boxes(images))
    assert torch.allclose(boxed["input_boxes"][0, 0], torch.tensor([0.0, 0.0, IMAGE_SIZE, IMAGE_SIZE]))
    with torch.no_grad():
        free, prompted = model(**plain), model(**boxed)
    assert prompted.pred_masks.shape == (2, 1, 1, *free.pred_masks.shape[-2:])
    assert prompted.iou_scores.shape == (2, 1, 1)
    assert (prompted.pred_masks[:, 0] - free.pred_masks).abs().max() <= TOLERANCE
    sizes = plain["original_sizes"]
    for a, b in zip(processor.post_process_masks(free.pred_masks, sizes),
                    processor.post_process_masks(prompted.pred_masks, sizes)):
        assert b.shape == (1, 1, *a.shape) and torch.equal(a, b[0, 0])


def test_padding_points_change_nothing(model_and_processor, images):
    model, processor = model_and_processor
    points = [[[[10, 12]]], [[[30, 60]]]]
    padded = [[[[10, 12], [5, 5], [1, 1]]], [[[30, 60], [0, 0], [2, 3]]]]
    with torch.no_grad():
        one = model(**processor(images, modality=1, input_points=points, input_labels=[[[1]], [[0]]]))
        more = model(**processor(images, modality=1, input_points=padded, input_labels=[[[1, -1, -1]], [[0, -1, -1]]]))
        # rows of one batch with different numbers of real points
        mixed = model(**processor(images, modality=1, input_points=padded, input_labels=[[[1, -1, -1]], [[0, 1, -1]]]))
    assert (one.pred_masks - more.pred_masks).abs().max() <= TOLERANCE
    assert (mixed.pred_masks[0] - one.pred_masks[0]).abs().max() <= TOLERANCE
    assert (mixed.pred_masks[1] - one.pred_masks[1]).abs().max() > 0  # the second image's extra click counts


def test_prompts_correct_the_self_patch_map():
    """A box clears the patches outside it, a negative click its connected region, a positive click sets its patch."""
    patches = torch.zeros(1, 1, 8, 8)
    patches[0, 0, 1:3, 1:3] = 1  # a region at the top left
    patches[0, 0, 6, 6] = 1  # another one at the bottom right
    size = 64  # 8 px cells
    negative = PromptRows(torch.tensor([[[12.0, 12.0]]]), torch.tensor([[0]]), None, 1)
    edited = edit_patch_map(patches, negative, size)
    assert edited[0, 0, 1:3, 1:3].sum() == 0 and edited[0, 0, 6, 6] == 1
    positive = PromptRows(torch.tensor([[[36.0, 4.0]]]), torch.tensor([[1]]), torch.tensor([[0.0, 0.0, 40.0, 30.0]]), 1)
    edited = edit_patch_map(patches, positive, size)
    assert edited[0, 0, 0, 4] == 1 and edited[0, 0, 6, 6] == 0 and edited[0, 0, 1:3, 1:3].sum() == 4
    whole = PromptRows(None, None, torch.tensor([[0.0, 0.0, 64.0, 64.0]]), 1)
    assert torch.equal(edit_patch_map(patches, whole, size), patches)


def test_boxes_keep_the_mask_inside(model_and_processor, images):
    model, processor = model_and_processor
    boxes = [[[5, 5, 30, 20], [40, 10, 70, 40]], [[0, 50, 50, 90], [10, 10, 20, 20]]]
    inputs = processor(images, modality=2, input_boxes=boxes)
    with torch.no_grad():
        out = model(**inputs)
    masks = processor.post_process_masks(out.pred_masks, inputs["original_sizes"], binarize=False)
    assert masks[0].shape == (2, 1, 40, 70)
    logits = masks[0][0, 0]
    assert logits[25:, :].max() < -100 and logits[:, 40:].max() < -100  # well outside the first box


def test_cached_embedding_gives_the_same_masks(model_and_processor, images):
    model, processor = model_and_processor
    inputs = processor(images, modality=[4, 5], input_points=[[[[20, 20]]], [[[25, 70]]]], input_labels=[[[1]], [[1]]])
    with torch.no_grad():
        direct = model(**inputs)
        embeddings = model.get_image_embeddings(inputs["pixel_values"], inputs["modality"])
        cached = model(image_embeddings=embeddings, modality=inputs["modality"], input_points=inputs["input_points"],
                       input_labels=inputs["input_labels"], multimask_output=True)
    assert (direct.pred_masks - cached.pred_masks).abs().max() <= TOLERANCE
    with pytest.raises(ValueError, match="modality is required with image_embeddings"):
        model(image_embeddings=embeddings, input_points=inputs["input_points"], input_labels=inputs["input_labels"])
    with pytest.raises(ValueError, match="either pixel_values or image_embeddings"):
        model(inputs["pixel_values"], image_embeddings=embeddings, modality=inputs["modality"])


def test_prompts_outside_the_image_name_the_argument(model_and_processor, images):
    model, processor = model_and_processor
    with pytest.raises(ValueError, match=r"input_points\[1, 0, 0\] = \[60.0, 10.0\] lies outside image 1 \(width 50"):
        processor(images, input_points=[[[[1, 1]]], [[[60, 10]]]], input_labels=[[[1]], [[1]]])
    with pytest.raises(ValueError, match=r"input_boxes.* lies outside image 0"):
        processor(images, input_boxes=[[[0, 0, 71, 40]], [[0, 0, 5, 5]]])
    with pytest.raises(ValueError, match="input_points and input_labels go together"):
        processor(images, input_points=[[[[1, 1]]], [[[6, 10]]]])
    pixel_values = processor(images)["pixel_values"]
    with pytest.raises(ValueError, match="input_boxes has a coordinate outside the image"):
        model(pixel_values, modality=0, input_boxes=torch.tensor([[[0.0, 0, 65, 10]], [[0.0, 0, 5, 5]]]))
    with pytest.raises(ValueError, match=r"input_labels must be 1 \(positive\), 0 \(negative\) or -1"):
        model(pixel_values, modality=0, input_points=torch.ones(2, 1, 1, 2), input_labels=torch.full((2, 1, 1), 2))
    with pytest.raises(ValueError, match=r"input_points must have shape \(2, objects, points, 2\)"):
        model(pixel_values, modality=0, input_points=torch.ones(2, 1, 2), input_labels=torch.ones(2, 1))


def test_saved_and_reloaded_model_keeps_the_prompt_encoder(model_and_processor, tmp_path):
    model, _ = model_and_processor
    with torch.no_grad():
        model.prompt_encoder.point_embed[1].weight.add_(3.0)
    model.save_pretrained(tmp_path / "saved")
    reloaded = EspMedSamModel.from_pretrained(tmp_path / "saved")
    for key, value in model.prompt_encoder.state_dict().items():
        assert torch.equal(reloaded.prompt_encoder.state_dict()[key], value), key
    # the coordinates are encoded by the decoder's one positional-encoding matrix
    assert "prompt_encoder.shared_embedding.positional_embedding" not in reloaded.state_dict()
    points = torch.tensor([[[10.0, 20.0]]])
    expected = reloaded.mask_decoder.positional_encoding.encode_points(points + 0.5, (IMAGE_SIZE, IMAGE_SIZE))
    tokens = reloaded.prompt_encoder.embed_points(points, torch.tensor([[1]]))
    assert torch.allclose(tokens, expected + reloaded.prompt_encoder.point_embed[1].weight)


def test_remote_code_handles_prompts(tmp_path, images):
    saved = save_tiny_model(tmp_path / "model", seed=3)
    np.save(tmp_path / "image.npy", images[0])
    run_without_package(
        f"""
        import numpy as np, torch
        from transformers import AutoModel, AutoProcessor
        model = AutoModel.from_pretrained({str(saved)!r}, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained({str(saved)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        inputs = processor(np.load("image.npy"), modality=1, input_points=[[[[20, 10], [3, 3]]]],
                           input_labels=[[[1, -1]]], input_boxes=[[[0, 0, 60, 35]]])
        with torch.no_grad():
            out = model(**inputs)
        masks = processor.post_process_masks(out.pred_masks, inputs["original_sizes"], binarize=False)
        np.save("masks.npy", masks[0].numpy())
        """,
        tmp_path,
    )
    model, processor = tiny_model(seed=3)
    inputs = processor(images[0], modality=1, input_points=[[[[20, 10], [3, 3]]]], input_labels=[[[1, -1]]],
                       input_boxes=[[[0, 0, 60, 35]]])
    with torch.no_grad():
        expected = processor.post_process_masks(model(**inputs).pred_masks, inputs["original_sizes"], binarize=False)
    remote = np.load(tmp_path / "masks.npy")
    assert remote.shape == (1, 1, 40, 70)
    assert np.abs(remote - expected[0].numpy()).max() <= 1e-4


def test_pipeline_points_and_boxes(model_and_processor, images):
    from esp_medsam_hf.models.esp_medsam.pipeline_esp_medsam import segment

    model, processor = model_and_processor
    square = np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    # prompted segments keep probabilities >= 0.5: the prompt-free one at the same threshold
    free = segment(square, model, processor.image_processor, modality=1, mask_threshold=0.5)
    whole = segment(square, model, processor.image_processor, modality=1, boxes=[[0, 0, 64, 64]])
    assert len(whole) == 1 and np.array_equal(np.asarray(whole[0]["mask"]), np.asarray(free[0]["mask"]))
    image = images[0]
    assert 0.0 <= whole[0]["iou_score"] <= 1.0
    two = segment(image, model, processor.image_processor, modality=1, boxes=[[0, 0, 30, 20], [35, 5, 70, 40]])
    assert len(two) == 2 and not np.asarray(two[0]["mask"])[25:].any()
    clicked = segment(image, model, processor.image_processor, modality=1, points=[[10, 10], [60, 30]],
                      point_labels=[1, 0])
    assert len(clicked) == 1 and clicked[0]["mask"].size == (70, 40)
    with pytest.raises(ValueError, match=r"points\[0, 0, 0\] = \[80.0, 10.0\] lies outside image 0"):
        segment(image, model, processor.image_processor, modality=1, points=[[80, 10]])
    with pytest.raises(ValueError, match="points= refine one object"):
        segment(image, model, processor.image_processor, points=[[1, 1]], boxes=[[0, 0, 5, 5], [1, 1, 6, 6]])
