"""Checkpoints you can trust (issue 13): no NaN model is ever a "good" checkpoint, resume unpickles nothing from the
run folder and refuses tampered or mismatched state, broken checkpoints fall back with a message, seeds apply
before the model is built, YAML numbers parse, and the logs do not repeat steps."""

from __future__ import annotations

import csv
import dataclasses
import logging
import pickle
from pathlib import Path

import pytest
import torch
from _training_helpers import interrupt_at_step
from safetensors.torch import load_file

from esp_medsam_hf import EspMedSamConfig, EspMedSamModel
from esp_medsam_hf.training import (
    CheckpointError,
    EspMedSamStageConfig,
    NonFiniteLossError,
    latest_checkpoint,
    latest_intact_checkpoint,
    load_config,
    run_stage,
    train,
)
from esp_medsam_hf.training.checkpoints import save_checkpoint
from esp_medsam_hf.training.stages import espmedsam_task

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 64
COMMON = dict(model_size="tiny", image_size=SIZE, progress=False, synthetic_valid_images=1, learning_rate=1e-3,
              init_from=None, validate=False, batch_size=2)


def student() -> EspMedSamModel:
    torch.manual_seed(0)
    return EspMedSamModel(EspMedSamConfig.tiny(image_size=SIZE))


def run(config, data, **hooks):
    task, _, _ = espmedsam_task(config, student(), data)
    for name, value in hooks.items():
        setattr(task, name, value)
    return task, train(config, task)


def logged_steps(folder) -> list[int]:
    with (folder / "log.csv").open(newline="") as handle:
        return [int(row["step"]) for row in csv.DictReader(handle)]


@pytest.fixture
def finished(tmp_path, data):
    """A run of 4 steps with a checkpoint after every step (the last three kept)."""
    config = EspMedSamStageConfig(output_dir=str(tmp_path / "run"), epochs=2, max_steps=4, checkpoint_every=1,
                                  keep_checkpoints=3, **COMMON)
    run(config, data)
    return config


def poison_gradients_at(step: int):
    calls = []

    def hook(model, modalities):
        calls.append(1)
        if len(calls) == step:
            next(p for p in model.parameters() if p.grad is not None).grad.fill_(float("nan"))

    return hook


def test_parameters_that_became_nan_are_never_checkpointed(tmp_path, data):
    config = EspMedSamStageConfig(output_dir=str(tmp_path), epochs=2, checkpoint_every=1, max_grad_norm=None,
                                  **COMMON)
    with pytest.raises(NonFiniteLossError, match="step 2: not saved as a checkpoint: .* parameters hold NaN"):
        run(config, data, before_optimizer_step=poison_gradients_at(2))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000001"]
    weights = load_file(tmp_path / "checkpoints" / "step-00000001" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert not (tmp_path / "final").exists()


def test_non_finite_gradients_stop_before_the_step_is_applied(tmp_path, data):
    config = EspMedSamStageConfig(output_dir=str(tmp_path), epochs=2, checkpoint_every=1, **COMMON)
    task, _, _ = espmedsam_task(config, student(), data)
    compute, calls = task.compute_loss, []

    def overflow_on_second(model, batch):
        """A finite loss whose gradient overflows to inf (what an unstable run produces)."""
        calls.append(1)
        loss = compute(model, batch)
        if len(calls) == 2:
            weight = next(model.parameters())
            loss = loss + (weight.sum() - weight.sum().detach()) * 1e30 * 1e30
        return loss

    task.compute_loss = overflow_on_second
    with pytest.raises(NonFiniteLossError, match="gradient norm is (nan|inf) .* Last good checkpoint: .*step-00000001"):
        train(config, task)
    assert all(torch.isfinite(p).all() for p in task.model.parameters())


def test_old_checkpoints_are_kept_when_the_new_one_fails_half_way(tmp_path):
    """Rotation deletes the old checkpoints only after the new one is complete (accelerate's deletes first)."""

    class DiesWhileSaving:
        is_main_process = True

        def wait_for_everyone(self) -> None:
            pass

        def save_state(self, folder: str) -> None:
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / "model.safetensors").write_bytes(b"partial")
            raise OSError("disk full")

    old = tmp_path / "checkpoints" / "step-00000001"
    old.mkdir(parents=True)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(DiesWhileSaving(), tmp_path, 2, keep=1)
    assert latest_checkpoint(tmp_path) == old and old.is_dir()


def test_a_checkpoint_with_nan_weights_is_not_the_last_good_one(finished, caplog):
    run_dir = finished.output_dir
    newest = latest_checkpoint(run_dir)
    weights = load_file(newest / "model.safetensors")
    from safetensors.torch import save_file

    save_file({k: v * float("nan") for k, v in weights.items()}, newest / "model.safetensors")
    with caplog.at_level(logging.WARNING):
        intact = latest_intact_checkpoint(run_dir)
    assert intact.name == "step-00000003"
    assert "skipping checkpoint step-00000004" in caplog.text and "hold NaN or inf" in caplog.text


class _Planted:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(MARKER),))


MARKER = ""


def test_a_pickle_planted_in_a_checkpoint_is_never_loaded(finished, data, tmp_path, caplog):
    global MARKER
    MARKER = str(tmp_path / "pwned")
    newest = latest_checkpoint(finished.output_dir)
    with open(newest / "custom_checkpoint_0.pkl", "wb") as handle:
        pickle.dump(_Planted(), handle)
    explicit = dataclasses.replace(finished, resume=str(newest), max_steps=4)
    with pytest.raises(CheckpointError, match="custom_checkpoint_0.pkl: pickled state .* will not load"):
        run(explicit, data)
    with caplog.at_level(logging.WARNING):
        task, result = run(dataclasses.replace(finished, resume="latest"), data)
    assert "skipping checkpoint step-00000004" in caplog.text
    assert result.global_step == 4  # resumed from step 3, trained step 4 again
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("tamper", ["garbage", "wrong-types"])
def test_a_tampered_rng_state_is_refused(finished, data, tamper):
    newest = latest_checkpoint(finished.output_dir)
    path = newest / "random_states_0.pkl"
    if tamper == "garbage":
        path.write_bytes(b"not a torch file")
    else:
        state = torch.load(path, weights_only=False)
        state["torch_manual_seed"] = torch.zeros(3, dtype=torch.uint8)
        torch.save(state, path)
    with pytest.raises(CheckpointError, match="random_states_0.pkl"):
        run(dataclasses.replace(finished, resume=str(newest)), data)


@pytest.mark.parametrize("change", [{"epochs": 5}, {"batch_size": 3}, {"learning_rate": 5e-4}])
def test_resuming_with_other_options_is_refused_and_config_yaml_kept(finished, data, change):
    saved = Path(finished.output_dir) / "config.yaml"
    before = saved.read_text()
    option = next(iter(change))
    with pytest.raises(CheckpointError, match=f"cannot resume .*{option}: .* -> "):
        run(dataclasses.replace(finished, resume="latest", **change), data)
    assert saved.read_text() == before


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(finished, data, caplog):
    run_dir = finished.output_dir
    newest = latest_checkpoint(run_dir)
    model_file = newest / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:1000])
    (newest.parent / "step-zzz").mkdir()
    assert latest_checkpoint(run_dir) == newest  # a stray folder is not a checkpoint
    with caplog.at_level(logging.WARNING):
        _, result = run(dataclasses.replace(finished, resume="latest"), data)
    assert "skipping checkpoint step-00000004" in caplog.text and "unreadable" in caplog.text
    assert result.global_step == 4
    assert logged_steps(Path(finished.output_dir)) == [1, 2, 3, 4]


def test_log_does_not_repeat_steps_after_a_resume(tmp_path, data):
    config = EspMedSamStageConfig(output_dir=str(tmp_path), epochs=2, max_steps=5, checkpoint_every=2, **COMMON)
    task, _, _ = espmedsam_task(config, student(), data)
    interrupt_at_step(task, 4)
    with pytest.raises(KeyboardInterrupt):
        train(config, task)
    assert logged_steps(tmp_path) == [1, 2, 3]  # step 3 is past the step-2 checkpoint
    run(dataclasses.replace(config, resume="latest"), data)
    assert logged_steps(tmp_path) == [1, 2, 3, 4, 5]
    steps = [line for line in (tmp_path / "log.jsonl").read_text().splitlines() if '"train"' in line]
    assert len(steps) == 5


def test_two_fresh_runs_with_one_seed_are_identical(tmp_path):
    results = []
    for index, noise in enumerate((123, 456)):
        torch.manual_seed(noise)  # whatever the global RNG was before, the run starts from its own seed
        config = EspMedSamStageConfig(output_dir=str(tmp_path / f"run{index}"), epochs=1, max_steps=1,
                                      synthetic_train_images=2, **COMMON)
        results.append(load_file(run_stage(config).release_dir / "model.safetensors"))
    assert results[0].keys() == results[1].keys()
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), name


def test_yaml_numbers_parse_and_bad_values_are_refused_before_anything_is_touched(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1e-4\nweight_decay: 5e-5\nepochs: 3\n")
    config = load_config("espmedsam", path)
    assert (config.learning_rate, config.weight_decay, config.epochs) == (1e-4, 5e-5, 3)
    for text, message in (("learning_rate: .nan\n", "learning_rate must be a finite number > 0"),
                          ("learning_rate: -1\n", "learning_rate must be a finite number > 0"),
                          ("learning_rate: fast\n", "learning_rate must be a number"),
                          ("epochs: 2.5\n", "epochs must be an integer"),
                          ("augment: maybe\n", "augment must be true or false")):
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_config("espmedsam", path)


def test_train_overwrite_with_an_invalid_option_keeps_the_old_run(finished, capsys):
    from esp_medsam_hf.cli import main

    run_dir = Path(finished.output_dir)
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    code = main(["train", "--stage", "espmedsam", "--model-size", "tiny", "--image-size", str(SIZE),
                 "--output-dir", str(run_dir), "--overwrite", "--learning-rate", "nan"])
    assert code == 1 and "learning_rate must be a finite number" in capsys.readouterr().err
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before


@pytest.mark.parametrize("tamper", ["other-values", "pickle"])
def test_a_tampered_scheduler_falls_back_like_a_truncated_checkpoint(finished, data, caplog, tamper, tmp_path):
    """Issue 22 row 12: every file of a checkpoint is verified (manifest.json, written last); a tampered
    scheduler.bin raised a raw UnpicklingError advising weights_only=False instead of falling back."""
    global MARKER
    MARKER = str(tmp_path / "pwned")
    run_dir = finished.output_dir
    newest = latest_checkpoint(run_dir)
    target = newest / "scheduler.bin" if (newest / "scheduler.bin").exists() else sorted(newest.glob("*.bin"))[0]
    if tamper == "other-values":  # loads with weights_only: only the manifest tells it from the saved one
        torch.save({"last_epoch": 10**6, "_step_count": 10**6}, target)
    else:
        target.write_bytes(pickle.dumps(_Planted()))
    with caplog.at_level(logging.WARNING):
        assert latest_intact_checkpoint(run_dir).name == "step-00000003"
        _, result = run(dataclasses.replace(finished, resume="latest"), data)
    assert "skipping checkpoint step-00000004" in caplog.text and target.name in caplog.text
    assert result.global_step == 4 and not Path(MARKER).exists()


def test_release_follows_the_overwrite_rule_and_never_deletes_init_from(tmp_path):
    """Issue 22 row 2: ``--output-dir run --init-from run/release`` replaced the user's release/ silently."""
    release = tmp_path / "run" / "release"
    release.mkdir(parents=True)
    (release / "model.safetensors").write_bytes(b"the user's model")
    config = EspMedSamStageConfig(output_dir=str(tmp_path / "run"), init_from=str(release), **{
        k: v for k, v in COMMON.items() if k != "init_from"})
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=r"would delete .*release, which holds init_from"):
            run_stage(dataclasses.replace(config, overwrite=overwrite))
    with pytest.raises(FileExistsError, match=r"release already exists; pass --overwrite"):
        run_stage(dataclasses.replace(config, init_from=None))
    assert (release / "model.safetensors").read_bytes() == b"the user's model"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["release"]
