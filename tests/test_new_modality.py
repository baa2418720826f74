"""A new modality for a trained model (issue 24, item 1): its own parameter bag, mask query and classifier class,
initialised from an existing modality's; it starts as that modality, survives saving and reloading (also as remote
code), is named in the labels, the processor, the pipeline and the card, and training it alone leaves every other
modality and target bit-identical."""

import json

import numpy as np
import pytest
import torch
from _inference_helpers import TARGET_SIZE as SIZE
from _inference_helpers import base_model, masks, model_with_disc, run_without_package, save_pretrained_with_pipeline
from transformers import AutoModel, pipeline

from esp_medsam_hf import EspMedSamConfig, EspMedSamImageProcessor, EspMedSamModel, EspMedSamProcessor
from esp_medsam_hf.models.esp_medsam.pipeline_esp_medsam import TASK, EspMedSamSegmentationPipeline
from esp_medsam_hf.training import EspMedSamStageConfig, train
from esp_medsam_hf.training.config import SHARED_LR_SCALE
from esp_medsam_hf.training.loop import parameter_groups
from esp_medsam_hf.training.modalities import ADDED_CLASS_LOGIT_OFFSET, add_modality, add_modality_to_processor
from esp_medsam_hf.training.stages import espmedsam_task
from esp_medsam_hf.training.targets import add_target

pytestmark = pytest.mark.usefixtures("one_thread")
OLD = torch.tensor([0, 1, 3, 5])  # dermoscopy, x-ray (the new one's like), fundus, colonoscopy


def test_adding_a_modality_keeps_every_tensor_and_adds_only_its_own():
    model = model_with_disc()
    grown = add_modality(model, "ct", like="x-ray", target="liver")
    config = grown.config
    assert config.modality_names[-1] == "ct" and config.added_modalities == [{"name": "ct", "like": "x-ray"}]
    assert config.all_target_names == [*model.config.target_names, "liver", "optic disc"]
    assert config.id2label[7] == "liver" and config.id2label[8] == "optic disc" and config.label2id["liver"] == 7
    assert config.extra_targets == model.config.extra_targets and config.target_query_rows[6:] == [1, 3]
    old, new = model.state_dict(), grown.state_dict()
    moved = {"modality_controller.bags.6.": "modality_controller.bags.7.",
             "mask_decoder.target_queries.0": "mask_decoder.target_queries.1"}  # the extra target, one index up
    renamed = {}
    for key in old:
        prefix = next((p for p in moved if key.startswith(p)), None)
        renamed[key] = key if prefix is None else moved[prefix] + key[len(prefix):]
    classifier = {"modality_classifier.fc2.weight", "modality_classifier.fc2.bias"}
    for key, value in old.items():
        kept = new[renamed[key]][: value.shape[0]] if key in classifier else new[renamed[key]]
        assert torch.equal(kept, value), key
    added = set(new) - set(renamed.values())
    like_bag = {f"modality_controller.bags.6.{k}" for k in model.modality_controller.bags[1].state_dict()}
    assert added == like_bag | {"mask_decoder.target_queries.0"}
    for key, value in model.modality_controller.bags[1].state_dict().items():
        assert torch.equal(new[f"modality_controller.bags.6.{key}"], value)
    assert torch.equal(new["mask_decoder.target_queries.0"], old["mask_decoder.mask_queries.weight"][1])
    assert torch.equal(new["modality_classifier.fc2.weight"][6], old["modality_classifier.fc2.weight"][1])
    assert new["modality_classifier.fc2.bias"][6] == old["modality_classifier.fc2.bias"][1] - ADDED_CLASS_LOGIT_OFFSET


def test_the_new_modality_starts_as_its_like_and_the_others_are_unchanged():
    model, images = model_with_disc(), torch.randn(3, 3, SIZE, SIZE)
    grown = add_modality(model, "ct", like="x-ray").eval()
    assert grown.config.target_names[-1] == "ct"  # the target's name defaults to the modality's
    for modality in OLD.tolist():
        assert torch.equal(masks(model, images, modality=modality), masks(grown, images, modality=modality))
    assert torch.equal(masks(model, images, target=6), masks(grown, images, target=7))  # optic disc, one index up
    assert torch.equal(masks(model, images, modality=1), masks(grown, images, modality=6))
    with torch.no_grad():
        before, after = model(images), grown(images)
    torch.testing.assert_close(after.modality_logits[:, :6], before.modality_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(after.modality_logits.softmax(-1)[:, :6], before.modality_logits.softmax(-1),
                               rtol=0, atol=1e-6)
    assert torch.equal(after.modality, before.modality) and torch.equal(after.pred_masks, before.pred_masks)
    ct = grown(images, modality=6)
    assert ct.modality.tolist() == [6, 6, 6] and ct.target.tolist() == [6, 6, 6]


def test_the_errors_name_what_is_wrong():
    model = base_model()
    with pytest.raises(ValueError, match="already has a modality named 'fundus'"):
        add_modality(model, "fundus", like="x-ray")
    with pytest.raises(ValueError, match="unknown modality 'retina'"):
        add_modality(model, "ct", like="retina")
    with pytest.raises(ValueError, match="already has a target named 'polyp'"):
        add_modality(model, "ct", like="x-ray", target="polyp")
    grown = add_modality(model, "ct", like="x-ray")
    with pytest.raises(ValueError, match="already has a modality named 'ct'"):
        add_modality(grown, "ct", like="x-ray")
    with pytest.raises(ValueError, match="modality index 7 is out of range"):
        grown(torch.randn(1, 3, SIZE, SIZE), modality=7)
    data = grown.config.to_dict()
    with pytest.raises(ValueError, match="like must be a modality before it"):
        EspMedSamConfig.from_dict({**data, "added_modalities": [{"name": "ct", "like": "mri"}]})
    with pytest.raises(ValueError, match="added_modalities must be the last modality_names"):
        EspMedSamConfig.from_dict({**data, "added_modalities": [{"name": "x-ray", "like": "dermoscopy"}]})
    with pytest.raises(ValueError, match="new_modality and like_modality go together"):
        EspMedSamStageConfig(init_from="x", new_modality="ct")
    with pytest.raises(ValueError, match="one modality or one target at a time"):
        EspMedSamStageConfig(init_from="x", new_modality="ct", like_modality="x-ray", new_target="a",
                             target_modality="fundus")


def test_the_modality_and_a_target_added_to_it_survive_save_and_reload(tmp_path):
    grown = add_target(add_modality(model_with_disc(), "ct", like="x-ray", target="liver"), "spleen", "ct").eval()
    assert grown.config.target_query_rows[-1] == 1  # a target of ct decodes in x-ray's row too
    images = torch.randn(4, 3, SIZE, SIZE)
    assert torch.equal(masks(grown, images, target=8), masks(grown, images, modality=6))  # spleen starts as ct
    with torch.no_grad():
        grown.mask_decoder.target_queries[0].add_(0.3)  # ct's own query
    grown.save_pretrained(tmp_path)
    for reloaded in (EspMedSamModel.from_pretrained(tmp_path), AutoModel.from_pretrained(tmp_path)):
        reloaded.eval()
        assert reloaded.config.added_modalities == [{"name": "ct", "like": "x-ray"}]
        assert reloaded.config.all_target_names[6:] == ["liver", "optic disc", "spleen"]
        for kwargs in ({"modality": 6}, {"target": 7}, {"target": 8}, {"modality": OLD}):
            assert torch.equal(masks(grown, images, **kwargs), masks(reloaded, images, **kwargs)), kwargs


def test_train_all_for_a_new_modality_trains_its_own_parts_at_the_rate_and_the_shared_at_the_scale(tmp_path, data):
    """--train-all with a new modality: its bag and query (shared_lr_scale's "new target's parts") take the learning
    rate, every other trainable part the rate times the scale (the default, SHARED_LR_SCALE), and it trains."""
    config = EspMedSamStageConfig(
        output_dir=str(tmp_path), batch_size=3, max_steps=1, validate=False, init_from="unused", model_size="tiny",
        image_size=SIZE, progress=False, synthetic_valid_images=1, learning_rate=1e-2, new_modality="ct",
        like_modality="x-ray", augment=False, only_new_target=False,
    )
    task, _, _ = espmedsam_task(config, model_with_disc(), data)
    trained = task.model.model
    own = {id(p) for p in [*trained.modality_controller.bags[6].parameters(), trained.mask_decoder.target_queries[0]]}
    first, shared = parameter_groups(task, [p for p in task.model.parameters() if p.requires_grad], 1e-2)
    assert {id(p) for p in first["params"]} == own and first["lr"] == 1e-2
    assert shared["lr"] == pytest.approx(1e-2 * SHARED_LR_SCALE) and not own & {id(p) for p in shared["params"]}
    assert any(p is trained.aggregator.stages[-1].blocks[0].attn.qkv.weight for p in shared["params"])
    train(config, task)


def test_training_only_the_new_modality_leaves_the_others_bit_identical(tmp_path, data):
    model, images = model_with_disc(), torch.randn(4, 3, SIZE, SIZE)
    before, disc = masks(model, images, modality=OLD), masks(model, images, target=6)
    config = EspMedSamStageConfig(
        output_dir=str(tmp_path), batch_size=3, epochs=2, validate=False, init_from="unused", model_size="tiny",
        image_size=SIZE, progress=False, synthetic_valid_images=1, learning_rate=1e-2, new_modality="ct",
        like_modality="x-ray", augment=False,
    )
    task, processor, _ = espmedsam_task(config, model, data)
    trained = task.model.model
    assert processor.modality_names[-1] == "ct" and processor.target_names[6] == "ct"
    start, state = masks(trained, images, modality=6), {k: v.clone() for k, v in trained.state_dict().items()}
    labels = (torch.rand(4, 1, SIZE, SIZE) > 0.5).float()
    with torch.no_grad():  # the segmentation loss alone: not the frozen classifier's (about 30 on the new class)
        ct = torch.full((4,), 6)
        assert task.model(images, labels) == trained.decode_embeddings(trained.encode(images, ct)[0], ct,
                                                                          labels).loss < 5
    train(config, task)
    trained.eval()
    changed = {key for key, value in trained.state_dict().items() if not torch.equal(value, state[key])}
    assert changed and all(key.startswith(("modality_controller.bags.6.", "mask_decoder.target_queries.0"))
                           for key in changed)
    reloaded = EspMedSamModel.from_pretrained(tmp_path / "final").eval()
    for checked in (trained, reloaded):
        assert torch.equal(before, masks(checked, images, modality=OLD))
        assert torch.equal(disc, masks(checked, images, target=7))
        assert not torch.allclose(start, masks(checked, images, modality=6))
    assert EspMedSamProcessor.from_pretrained(tmp_path / "final").modality_names[-1] == "ct"


def test_the_pipeline_and_the_processor_name_the_new_modality(tmp_path):
    grown = add_modality(base_model(), "ct", like="x-ray", target="liver").eval()
    with torch.no_grad():
        grown.mask_decoder.target_queries[0].add_(0.5)
    image_processor = EspMedSamImageProcessor(size={"height": SIZE, "width": SIZE},
                                              modality_object_sizes={"x-ray": 40.0},
                                              modality_min_object_fractions={"x-ray": 0.25})
    processor = add_modality_to_processor(EspMedSamProcessor(image_processor), grown.config)
    assert processor.image_processor.modality_object_sizes == {"x-ray": 40.0, "ct": 40.0}
    assert processor.image_processor.modality_min_object_fractions == {"x-ray": 0.25, "ct": 0.25}
    assert processor(np.zeros((SIZE, SIZE, 3), np.uint8), modality="ct")["modality"].tolist() == [6]
    folder = save_pretrained_with_pipeline(grown, processor, tmp_path / "model")
    pipe = pipeline(TASK, model=str(folder), pipeline_class=EspMedSamSegmentationPipeline)
    image = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    [segment] = pipe(image, modality="ct", scale="whole", backend="eager")
    assert (segment["label"], segment["modality"], segment["modality_source"]) == ("liver", "ct", "given")
    [xray] = pipe(image, modality="x-ray", scale="whole", backend="eager")
    assert xray["label"] == "lung fields" and not np.array_equal(np.array(xray["mask"]), np.array(segment["mask"]))
    [automatic] = pipe(image, scale="whole", backend="eager")
    assert automatic["modality"] != "ct"  # the classifier does not pick the new modality: name it
    np.save(tmp_path / "image.npy", image)
    np.save(tmp_path / "expected.npy", np.array(segment["mask"]))
    run_without_package(
        f"""
        import json, numpy as np
        from transformers import pipeline
        pipe = pipeline(model={str(folder)!r}, trust_remote_code=True)
        assert type(pipe.model).__module__.startswith("transformers_modules"), type(pipe.model).__module__
        [segment] = pipe(np.load("image.npy"), modality="ct", scale="whole", backend="eager")
        np.save("remote.npy", np.array(segment["mask"]))
        json.dump([segment["label"], segment["modality"], pipe.model.config.added_modalities], open("r.json", "w"))
        """,
        tmp_path,
    )
    assert json.loads((tmp_path / "r.json").read_text()) == ["liver", "ct", [{"name": "ct", "like": "x-ray"}]]
    assert (np.load(tmp_path / "remote.npy") == np.load(tmp_path / "expected.npy")).mean() >= 0.9999


def test_train_new_modality_from_the_command_line(tmp_path, capsys):
    from _inference_helpers import save_tiny_model

    from esp_medsam_hf.cli import main
    from esp_medsam_hf.hub.cards import ModelCardInfo

    save_tiny_model(tmp_path / "init")
    run = tmp_path / "ct-run"
    common = ["train", "--stage", "espmedsam", "--init-from", str(tmp_path / "init"), "--data", "synthetic",
              "--domains", "isic", "--synthetic-train-images", "2", "--synthetic-valid-images", "1",
              "--batch-size", "2", "--max-steps", "1", "--no-progress", "--output-dir", str(run)]
    assert main([*common, "--new-modality", "ct", "--like", "x-ray", "--new-modality-target", "liver"]) == 0, \
        capsys.readouterr().err
    release = EspMedSamModel.from_pretrained(run / "release")
    assert release.config.modality_names[-1] == "ct" and release.config.all_target_names[-1] == "liver"
    assert EspMedSamProcessor.from_pretrained(run / "release").modality_names[-1] == "ct"
    info = ModelCardInfo.from_json(run / "card.json")
    assert info.usage_modality == "ct" and info.targets[-1] == "liver"
    assert 'Adds the modality "ct" (segmenting "liver"), started from x-ray' in info.notes
    capsys.readouterr()
    again = [*common[:-1], str(tmp_path / "again"), "--init-from", str(run / "release")]
    assert main([*again, "--new-modality", "ct", "--like", "fundus"]) == 1
    assert "already has modality 'ct', added like 'x-ray', not 'fundus'" in capsys.readouterr().err
    assert main([*again, "--new-modality", "fundus", "--like", "x-ray"]) == 1
    assert "already has modality 'fundus'" in capsys.readouterr().err
    assert main([*again, "--new-modality", "mri", "--like", "retina"]) == 1
    assert "unknown modality 'retina'" in capsys.readouterr().err
    assert main([*again, "--new-modality", "mri"]) == 1
    assert "--new-modality NAME --like MODALITY" in capsys.readouterr().err


def test_training_the_new_modality_on_cached_features(tmp_path, data):
    model, images = model_with_disc(), torch.randn(4, 3, SIZE, SIZE)
    before = masks(model, images, modality=OLD)
    config = EspMedSamStageConfig(
        output_dir=str(tmp_path), batch_size=3, epochs=2, init_from="unused", model_size="tiny", image_size=SIZE,
        progress=False, synthetic_valid_images=1, learning_rate=1e-2, new_modality="ct", like_modality="dermoscopy",
        cache_features=True, frozen_encoder_stages=2, feature_views=1,
    )
    with pytest.raises(ValueError, match=r"prepared as 'dermoscopy' images \(--like\), they record \['dermoscopy', "
                                         r"'microscopy'\]"):
        espmedsam_task(config, model, data)
    task, _, _ = espmedsam_task(config, model, {"isic": data["isic"]})  # dermoscopy images: encoded with its bag
    trained = task.model.model
    start = masks(trained, images, modality=6)
    assert train(config, task).best_metric is not None  # validated as the new modality on cached features
    trained.eval()
    assert torch.equal(before, masks(trained, images, modality=OLD))
    prefix = len(trained.aggregator.stages[0].blocks)  # bag blocks of the frozen TinyViT stage 1: still like's
    bags = trained.modality_controller.bags
    for index, (own, like) in enumerate(zip(bags[6].blocks, bags[0].blocks)):
        assert all(torch.equal(a, b) for a, b in zip(own.parameters(), like.parameters())) == (index < prefix)
    assert not torch.allclose(start, masks(trained, images, modality=6))


def test_evaluate_decodes_the_new_modality_by_its_target(tmp_path, data):
    import argparse

    from test_target_domains import fake_prepared

    from esp_medsam_hf.commands.evaluate import domain_targets
    from esp_medsam_hf.data.evaluation import evaluate_model

    grown = add_modality(base_model(), "ct", like="x-ray", target="liver").eval()
    root = fake_prepared(tmp_path, {"scans": {"name": "scans", "modality": "x-ray", "new_modality": "ct",
                                              "target": "liver"}})
    args = argparse.Namespace(data=root)
    assert domain_targets(args, ["scans"], grown.config) == {"scans": "liver"}
    with pytest.raises(ValueError, match="records the new modality 'ct', which the model does not have .* train it "
                                         "with --new-modality ct --like x-ray first"):
        domain_targets(args, ["scans"], base_model().config)
    processor = EspMedSamProcessor(EspMedSamImageProcessor(size={"height": SIZE, "width": SIZE},
                                                           inference_scale="whole"), grown.config.modality_names)
    scores = [evaluate_model(grown, processor, {"isic": data["isic"]}, split="validation", compute_hausdorff=False,
                             progress=False, target=target)["domains"]["isic"]["dice"] for target in (6, 1)]
    assert scores[0] == scores[1]  # before training, ct segments as x-ray
    with torch.no_grad():
        grown.modality_classifier.fc2.bias[6] += 1000  # a classifier that picks ct for every image
    report = evaluate_model(grown, processor, {"isic": data["isic"]}, split="validation", compute_hausdorff=False,
                            progress=False)
    assert report["domains"]["isic"]["classifier_accuracy"] == 0.0  # named from the model's modalities: no error


def test_a_model_saved_without_the_field_loads_unchanged(tmp_path):
    model, images = model_with_disc(), torch.randn(2, 3, SIZE, SIZE)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved.pop("added_modalities") == []
    (tmp_path / "config.json").write_text(json.dumps(saved))  # as a checkpoint from before added modalities
    reloaded = EspMedSamModel.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_query_rows == 6 and reloaded.config.target_query_rows == [0, 1, 2, 3, 4, 5, 3]
    for kwargs in ({"modality": torch.tensor([0, 5])}, {"target": 6}):
        assert torch.equal(masks(model, images, **kwargs), masks(reloaded, images, **kwargs))


def test_a_prepared_domain_records_the_new_modality_and_training_takes_it(tmp_path):
    import argparse

    from test_target_domains import fake_prepared

    from esp_medsam_hf.commands.prepare import _domains, add_arguments
    from esp_medsam_hf.data.domains import Domain, custom_domain
    from esp_medsam_hf.data.prepare import PreparationError
    from esp_medsam_hf.training.stages import with_domains_target

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    [scans] = _domains(parser.parse_args(["--domains", "scans", "--modality", "ct", "--like", "x-ray",
                                          "--output", "o"]))
    assert (scans.modality, scans.new_modality, scans.target) == ("x-ray", "ct", "ct")
    assert scans.to_dict()["new_modality"] == "ct" and Domain.from_dict(scans.to_dict()) == scans
    assert "new_modality" not in custom_domain("plain", "x-ray").to_dict()
    with pytest.raises(ValueError, match="for a new modality give the one it is like"):
        _domains(parser.parse_args(["--domains", "scans", "--modality", "ct", "--output", "o"]))
    with pytest.raises(PreparationError, match="--like names the modality"):
        _domains(parser.parse_args(["--domains", "isic", "--like", "x-ray", "--output", "o"]))
    with pytest.raises(ValueError, match="new_modality must be a name that is none of the six"):
        custom_domain("scans", "x-ray", new_modality="fundus")
    scans = {"name": "scans", "modality": "x-ray", "new_modality": "ct", "target": "liver"}
    root = fake_prepared(tmp_path / "data", {"scans": scans, "chest": {"name": "chest", "modality": "x-ray"}})
    resolved = with_domains_target(EspMedSamStageConfig(data=root, domains=["scans"], init_from="x"))
    assert (resolved.new_modality, resolved.like_modality, resolved.new_modality_target) == ("ct", "x-ray", "liver")
    assert with_domains_target(resolved) == resolved
    with pytest.raises(ValueError, match="record different modalities"):
        with_domains_target(EspMedSamStageConfig(data=root, domains=["scans", "chest"], init_from="x"))
    with pytest.raises(ValueError, match="differs from what the training domains record"):
        with_domains_target(EspMedSamStageConfig(data=root, domains=["scans"], init_from="x", new_modality="mri",
                                                 like_modality="x-ray"))
    with pytest.raises(ValueError, match="--new-target adds a target to a modality the model has"):
        with_domains_target(EspMedSamStageConfig(data=root, domains=["scans"], init_from="x", new_target="liver",
                                                 target_modality="x-ray"))


def test_prepare_train_evaluate_a_new_modality_from_the_command_line(tmp_path, capsys):
    """The researcher's path: ``prepare --modality ct --like x-ray``, ``train`` (the modality from ``domain.json``),
    ``evaluate`` decoding it; a model without the modality is refused by ``evaluate`` with the command that adds it."""
    from _inference_helpers import save_tiny_model
    from PIL import Image

    from esp_medsam_hf.cli import main

    raw = tmp_path / "raw"
    for folder in ("images", "masks"):
        (raw / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(6):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(raw / "images" / f"s{index}.png")
        mask = np.zeros((32, 32), np.uint8)
        mask[8:20, 6 + index : 18 + index] = 255
        Image.fromarray(mask).save(raw / "masks" / f"s{index}.png")
    prepared = tmp_path / "prepared"
    assert main(["prepare", "--domains", "scans", "--modality", "ct", "--like", "x-ray", "--target", "liver",
                 "--layout", "plain", "--data-dir", str(raw), "--output", str(prepared)]) == 0, \
        capsys.readouterr().err
    assert json.loads((prepared / "scans" / "domain.json").read_text())["new_modality"] == "ct"
    base = save_tiny_model(tmp_path / "init")
    run = tmp_path / "run"
    assert main(["train", "--stage", "espmedsam", "--init-from", str(base), "--data", str(prepared), "--domains",
                 "scans", "--batch-size", "2", "--max-steps", "1", "--no-progress", "--output-dir", str(run)]) == 0, \
        capsys.readouterr().err
    release = EspMedSamModel.from_pretrained(run / "release").config
    assert release.added_modalities == [{"name": "ct", "like": "x-ray"}] and release.target_names[-1] == "liver"
    common = ["evaluate", "--data", str(prepared), "--domains", "scans", "--no-references", "--no-hausdorff",
              "--no-scale-table", "--scale", "whole"]
    assert main([*common, "--model", str(run / "release"), "--output", str(tmp_path / "eval")]) == 0, \
        capsys.readouterr().err
    assert "scans" in json.loads((tmp_path / "eval" / "results.json").read_text())["domains"]
    assert main(["segment", str(raw / "images" / "s0.png"), "--model", str(run / "release"), "--modality", "ct",
                 "--scale", "whole", "--output", str(tmp_path / "masks"), "--no-progress"]) == 0, \
        capsys.readouterr().err
    import csv

    with open(tmp_path / "masks" / "segmentation.csv", newline="") as handle:
        [row] = list(csv.DictReader(handle))
    assert (row["modality"], row["modality_source"]) == ("ct", "given")
    capsys.readouterr()
    assert main([*common, "--model", str(base), "--output", str(tmp_path / "refused")]) == 1
    assert "train it with --new-modality ct --like x-ray first" in capsys.readouterr().err
