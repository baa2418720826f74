"""A new target from end to end: a prepared domain records it (``target`` in ``domain.json``), training adds it
from there (on cached features too, the other targets bit-identical), evaluation and the pipeline decode it and
name it."""

import argparse
import json

import numpy as np
import pytest
import torch
from _inference_helpers import TARGET_SIZE as SIZE
from _inference_helpers import base_model, masks, save_pretrained_with_pipeline
from transformers import pipeline

from esp_medsam_hf import EspMedSamConfig, EspMedSamImageProcessor, EspMedSamModel, EspMedSamProcessor
from esp_medsam_hf.data.domains import Domain, custom_domain
from esp_medsam_hf.models.esp_medsam.pipeline_esp_medsam import TASK, EspMedSamSegmentationPipeline
from esp_medsam_hf.models.esp_medsam.prediction import predict
from esp_medsam_hf.training import EspMedSamStageConfig, train
from esp_medsam_hf.training.stages import espmedsam_task, with_domains_target
from esp_medsam_hf.training.targets import add_target

pytestmark = pytest.mark.usefixtures("one_thread")


def fake_prepared(root, records: dict) -> str:
    """A prepared-looking folder: per domain its ``domain.json`` and a shard name (only names and records are read)."""
    for name, record in records.items():
        (root / name / "data").mkdir(parents=True)
        (root / name / "data" / "train-00000-of-00001.parquet").touch()
        (root / name / "domain.json").write_text(json.dumps(record))
    return str(root)


def test_the_domain_records_its_target_and_the_modality_default_is_not_written():
    disc = custom_domain("disc", "fundus", target="optic disc")
    assert disc.target == "optic disc" and disc.to_dict()["target"] == "optic disc"
    assert Domain.from_dict(disc.to_dict()) == disc
    vessels = custom_domain("vessels", "fundus", target="retinal vessels")  # the modality's own: nothing recorded
    assert vessels.target_name is None and "target" not in vessels.to_dict() and vessels.target == "retinal vessels"
    with pytest.raises(ValueError, match="target must be a non-empty name"):
        Domain.from_dict({"name": "x", "modality": "fundus", "target": " "})


def test_prepare_takes_target_only_with_a_new_domain():
    from esp_medsam_hf.commands.prepare import _domains, add_arguments
    from esp_medsam_hf.data.prepare import PreparationError

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--domains", "disc", "--modality", "fundus", "--target", "optic disc", "--output", "o"])
    assert _domains(args)[0].target_name == "optic disc"
    with pytest.raises(PreparationError, match="--target names what the masks"):
        _domains(parser.parse_args(["--domains", "vascx", "--target", "optic disc", "--output", "o"]))


def test_training_takes_the_target_from_domain_json(tmp_path):
    disc = {"name": "disc", "modality": "fundus", "target": "optic disc"}
    root = fake_prepared(tmp_path / "data", {"disc": disc, "vessels": {"name": "vessels", "modality": "fundus"}})
    config = EspMedSamStageConfig(data=root, domains=["disc"], init_from="x", output_dir=str(tmp_path / "run"))
    resolved = with_domains_target(config)
    assert (resolved.new_target, resolved.target_modality, resolved.only_new_target) == ("optic disc", "fundus", True)
    assert with_domains_target(EspMedSamStageConfig(data=root, domains=["vessels"], init_from="x")).new_target is None
    with pytest.raises(ValueError, match="record different targets"):
        with_domains_target(EspMedSamStageConfig(data=root, domains=["disc", "vessels"], init_from="x"))
    with pytest.raises(ValueError, match="differs from the target the training domains record"):
        with_domains_target(EspMedSamStageConfig(data=root, domains=["disc"], init_from="x", new_target="optic cup",
                                                 target_modality="fundus"))


def test_evaluate_decodes_the_recorded_target_and_refuses_a_model_without_it(tmp_path):
    from esp_medsam_hf.commands.evaluate import domain_targets

    root = fake_prepared(tmp_path, {"disc": {"name": "disc", "modality": "fundus", "target": "optic disc"},
                                    "nuclei": {"name": "nuclei", "modality": "microscopy"}})
    args = argparse.Namespace(data=root)
    grown = add_target(base_model(), "optic disc", "fundus")
    assert domain_targets(args, ["disc", "nuclei"], grown.config) == {"disc": "optic disc"}
    with pytest.raises(ValueError, match="records the target 'optic disc', which the model does not have"):
        domain_targets(args, ["disc"], base_model().config)


def test_training_the_target_on_cached_features_leaves_the_others_bit_identical(tmp_path, data):
    model, images = base_model(), torch.randn(4, 3, SIZE, SIZE)
    others = torch.tensor([0, 3, 4, 5])
    before = masks(model, images, modality=others)
    config = EspMedSamStageConfig(
        output_dir=str(tmp_path), batch_size=3, epochs=2, init_from="unused", model_size="tiny", image_size=SIZE,
        progress=False, synthetic_valid_images=1, learning_rate=1e-2, new_target="optic disc",
        target_modality="fundus", cache_features=True, frozen_encoder_stages=2, feature_views=1,
    )
    task, _, _ = espmedsam_task(config, model, data)
    trained = task.model.model
    bags = trained.modality_controller.bags
    prefix = len(trained.aggregator.stages[0].blocks)  # bag blocks of the frozen TinyViT stage 1
    start = masks(trained, images, target=6)
    result = train(config, task)
    trained.eval()
    assert result.best_metric is not None  # validated as the target, on cached validation features
    assert torch.equal(before, masks(trained, images, modality=others))
    for index, (own, fundus) in enumerate(zip(bags[6].blocks, bags[3].blocks)):  # the cached prefix: still fundus's
        same = all(torch.equal(a, b) for a, b in zip(own.parameters(), fundus.parameters()))
        assert same == (index < prefix), index
    assert not torch.allclose(start, masks(trained, images, target=6))
    reloaded = EspMedSamModel.from_pretrained(tmp_path / "final").eval()
    assert torch.equal(before, masks(reloaded, images, modality=others))


def test_the_pipeline_decodes_and_names_the_target(tmp_path):
    grown = add_target(base_model(), "optic disc", "fundus").eval()
    with torch.no_grad():
        grown.mask_decoder.target_queries[0].add_(0.5)
    processor = EspMedSamProcessor(EspMedSamImageProcessor(size={"height": SIZE, "width": SIZE}),
                                   grown.config.modality_names)
    folder = save_pretrained_with_pipeline(grown, processor, tmp_path / "model")
    pipe = pipeline(TASK, model=str(folder), pipeline_class=EspMedSamSegmentationPipeline)
    image = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    [segment] = pipe(image, target="optic disc", scale="whole", backend="eager")
    assert (segment["label"], segment["modality"], segment["modality_source"]) == ("optic disc", "fundus", "given")
    expected = predict(pipe.model, pipe.image_processor, [image], "fundus", scale="whole", target="optic disc")
    np.testing.assert_array_equal(np.array(segment["mask"]) > 0, expected.masks[0])  # predict's own mask
    [own] = pipe(image, modality="fundus", scale="whole", backend="eager")
    assert own["label"] == "retinal vessels"
    assert not np.array_equal(np.array(own["mask"]), np.array(segment["mask"]))
    with pytest.raises(ValueError, match="target 'optic disc' is a target of 'fundus' images"):
        pipe(image, target="optic disc", modality="x-ray")
    with pytest.raises(ValueError, match="unknown target 'optic cup'"):
        pipe(image, target="optic cup")


def test_the_processor_turns_target_names_into_what_the_model_decodes(tmp_path):
    grown = add_target(base_model(), "optic disc", "fundus").eval()
    processor = EspMedSamProcessor(EspMedSamImageProcessor(size={"height": SIZE, "width": SIZE}))
    processor.target_names = grown.config.all_target_names
    processor.save_pretrained(tmp_path)
    reloaded = EspMedSamProcessor.from_pretrained(tmp_path)
    assert reloaded.target_names[-1] == "optic disc"
    images = [np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for seed in (0, 1)]
    inputs = reloaded(images, target=["optic disc", "retinal vessels"])
    assert inputs["target"].tolist() == [6, 3] and "modality" not in inputs
    outputs = grown(pixel_values=inputs["pixel_values"], target=inputs["target"])
    assert outputs.target.tolist() == [6, 3] and outputs.modality.tolist() == [3, 3]
    with pytest.raises(ValueError, match="not both"):
        reloaded(images, modality="fundus", target="optic disc")
    with pytest.raises(ValueError, match="unknown target 'optic cup'"):
        reloaded(images, target="optic cup")
    with pytest.raises(ValueError, match="got 3 targets for 2 images"):
        reloaded(images, target=[6, 6, 6])
