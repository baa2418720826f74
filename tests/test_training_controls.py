"""Small-data training controls (issue 24, item 3): validation and checkpoints every N steps or only at the end,
never twice at one step; early stopping; warmup + cosine schedules; every option on the command line; trackers
checked before training; a clean Ctrl-C with the command that resumes."""

from __future__ import annotations

import argparse
import dataclasses
import shlex

import pytest
import torch

from esp_medsam_hf import EspMedSamConfig, EspMedSamModel
from esp_medsam_hf.training import STAGES, EspMedSamStageConfig, latest_checkpoint, load_config, train
from esp_medsam_hf.training import loop
from esp_medsam_hf.training.stages import espmedsam_task

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 64
# the data fixture: 2 domains x 3 training images; batch 2 -> 3 optimizer steps per epoch
COMMON = dict(model_size="tiny", image_size=SIZE, progress=False, synthetic_valid_images=1, learning_rate=1e-3,
              init_from=None, batch_size=2, epochs=3, augment=False, keep_checkpoints=20)


def student() -> EspMedSamModel:
    torch.manual_seed(0)
    return EspMedSamModel(EspMedSamConfig.tiny(image_size=SIZE))


@pytest.fixture
def saves(monkeypatch) -> list[int]:
    """The step of every checkpoint the loop saves."""
    steps: list[int] = []
    original = loop.save_checkpoint

    def counting(accelerator, output_dir, step, *args, **kwargs):
        steps.append(step)
        return original(accelerator, output_dir, step, *args, **kwargs)

    monkeypatch.setattr(loop, "save_checkpoint", counting)
    return steps


def run(config: EspMedSamStageConfig, data, **hooks):
    task, _, _ = espmedsam_task(config, student(), data)
    for name, value in hooks.items():
        setattr(task, name, value)
    return train(config, task)


def validated_steps(result) -> list[int]:
    return [event["step"] for event in result.history if event["event"] == "validation"]


@pytest.mark.parametrize("eval_every, checkpoint_every, validated, saved", [
    (4, 2, [4, 8, 9], [2, 4, 6, 8, 9]),
    ("end", 0, [9], [9]),
    (0, 0, [9], [9]),
    ("epoch", 3, [3, 6, 9], [3, 6, 9]),  # the periodic save at an epoch's end is the epoch's save, not a second one
])
def test_validation_and_checkpoints_every_n_steps_or_at_the_end_never_twice(
    tmp_path, data, saves, eval_every, checkpoint_every, validated, saved
):
    config = EspMedSamStageConfig(output_dir=str(tmp_path), eval_every=eval_every, checkpoint_every=checkpoint_every,
                                  **COMMON)
    result = run(config, data)
    assert result.global_step == 9
    assert validated_steps(result) == validated
    assert saves == saved
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [f"step-{s:08d}" for s in saved]


def test_early_stopping_stops_after_patience_validations_without_improvement(tmp_path, data, caplog):
    scores = iter([50.0, 60.0, 55.0, 59.0, 70.0, 80.0])
    config = EspMedSamStageConfig(output_dir=str(tmp_path), eval_every=1, early_stopping_patience=2, **COMMON)
    with caplog.at_level("INFO", logger="esp_medsam_hf.training.loop"):
        result = run(config, data, validate=lambda model: {"dice": next(scores)})
    assert result.global_step == 4 and result.best_metric == 60.0
    assert validated_steps(result) == [1, 2, 3, 4]
    assert "early stopping at step 4" in caplog.text
    assert latest_checkpoint(tmp_path).name == "step-00000004"
    # resuming the stopped run finds it finished: no step is trained, nothing validated again
    resumed = run(dataclasses.replace(config, resume="latest"), data, validate=lambda model: {"dice": next(scores)})
    assert resumed.global_step == 4 and next(scores) == 70.0


def test_warmup_and_cosine_come_from_transformers_and_step_with_the_optimizer(tmp_path, data):
    from transformers import get_cosine_schedule_with_warmup

    config = EspMedSamStageConfig(output_dir=str(tmp_path), lr_schedule="cosine", warmup_steps=3, validate=False,
                                  **COMMON)
    logged = [event["lr"] for event in run(config, data).history if event["event"] == "train"]
    reference = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    schedule = get_cosine_schedule_with_warmup(reference, num_warmup_steps=3, num_training_steps=9)
    expected = []
    for _ in range(9):
        expected.append(schedule.get_last_lr()[0])
        reference.step()
        schedule.step()
    assert logged == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert logged[0] == 0.0 and logged[3] == pytest.approx(1e-3) and logged[-1] < 1e-4


def test_the_exponential_default_decays_once_per_epoch(tmp_path, data):
    config = EspMedSamStageConfig(output_dir=str(tmp_path), lr_decay=0.5, validate=False, **COMMON)
    logged = [event["lr"] for event in run(config, data).history if event["event"] == "train"]
    assert logged == pytest.approx([1e-3] * 3 + [5e-4] * 3 + [2.5e-4] * 3)


def test_a_moving_average_of_the_weights_is_what_is_validated_and_saved(tmp_path, data):
    """``ema_decay``: final/ is e_1 = w_1, e_k = d e_(k-1) + (1 - d) w_k over the trained weights w_k of every step
    (each step's checkpoint holds them), validation sees the average, and a resumed run gives the same average."""
    from safetensors.torch import load_file

    decay = 0.6
    config = EspMedSamStageConfig(output_dir=str(tmp_path / "run"), ema_decay=decay, checkpoint_every=1, **COMMON)
    validated = []
    result = run(config, data, validate=lambda module: validated.append(
        {k: v.detach().clone() for k, v in module.state_dict().items()}) or {"dice": 0.0})
    steps = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert len(steps) == result.global_step == 9
    trained = [load_file(step / "model.safetensors") for step in steps]
    final = load_file(tmp_path / "run" / "final" / "model.safetensors")
    moved = [name for name in final if final[name].is_floating_point()
             and not torch.equal(trained[0][name], trained[-1][name])]
    assert moved
    for name in moved:
        average = trained[0][name].clone()
        for weights in trained[1:]:
            average = decay * average + (1 - decay) * weights[name]
        torch.testing.assert_close(final[name], average, rtol=1e-5, atol=1e-7)
    # not the last step's weights
    assert sum(not torch.allclose(final[name], trained[-1][name], rtol=1e-3, atol=1e-6) for name in moved) > len(moved) / 2
    # the validation after the last epoch saw the average: its weights are final/'s
    last = {k.removeprefix("model."): v for k, v in validated[-1].items()}
    assert all(torch.equal(last[name], final[name]) for name in moved if name in last)
    assert sum(name in last for name in moved) == len(moved)
    with pytest.raises(ValueError, match="ema_decay"):
        EspMedSamStageConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="ema_decay"):
        EspMedSamStageConfig(ema_decay=-0.1)


def test_a_resumed_run_continues_the_moving_average(tmp_path, data):
    from _training_helpers import assert_resume_matches_straight

    config = EspMedSamStageConfig(output_dir="unused", ema_decay=0.6, checkpoint_every=1, validate=False,
                                  **{**COMMON, "epochs": 2})
    assert_resume_matches_straight(config, lambda c: espmedsam_task(c, student(), data)[0], tmp_path)


def test_schedule_options_are_checked():
    with pytest.raises(ValueError, match="warmup_steps needs a step schedule"):
        EspMedSamStageConfig(warmup_steps=10)
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        EspMedSamStageConfig(lr_schedule="cosinus")
    with pytest.raises(ValueError, match="eval_every must be"):
        EspMedSamStageConfig(eval_every="often")
    with pytest.raises(ValueError, match="early_stopping_patience needs validation"):
        EspMedSamStageConfig(early_stopping_patience=3, validate=False)
    assert EspMedSamStageConfig(eval_every=0).eval_every == "end"
    assert load_config("espmedsam", eval_every="25").eval_every == 25


def parser() -> argparse.ArgumentParser:
    from esp_medsam_hf.commands.train import add_arguments

    built = argparse.ArgumentParser()
    add_arguments(built)
    return built


def test_every_option_of_every_stage_has_a_flag():
    from esp_medsam_hf.training.config import STAGE_CONFIGS

    dests = {action.dest for action in parser()._actions}
    for stage in STAGES:
        missing = {option.name for option in dataclasses.fields(STAGE_CONFIGS[stage])} - dests
        assert not missing, f"{stage}: no flag for {sorted(missing)}"


def test_generated_flags_reach_the_config_and_another_stages_flag_is_refused():
    from esp_medsam_hf.commands.train import stage_config

    args = parser().parse_args([
        "--stage", "espmedsam", "--weight-decay", "0.1", "--no-augment", "--zoom", '{"isic": {"scale": [1, 2]}}',
        "--eval-every", "end", "--lr-schedule", "cosine", "--warmup-steps", "5", "--early-stopping-patience", "3",
        "--classifier-domains", "isic", "dsb", "--validation-images", "4",
    ])
    config = stage_config(args)
    assert (config.weight_decay, config.augment, config.zoom) == (0.1, False, {"isic": {"scale": [1, 2]}})
    assert (config.eval_every, config.lr_schedule, config.warmup_steps) == ("end", "cosine", 5)
    assert (config.early_stopping_patience, config.classifier_domains, config.validation_images) == (
        3, ["isic", "dsb"], 4)
    assert stage_config(parser().parse_args(["--stage", "espmedsam", "--eval-every", "7"])).eval_every == 7
    with pytest.raises(ValueError, match="--natural-repeats: not an option of stage espmedsam"):
        stage_config(parser().parse_args(["--stage", "espmedsam", "--natural-repeats", "2"]))


def test_a_tracker_that_is_not_installed_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    import accelerate.tracking

    from esp_medsam_hf.cli import main

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    code = main(["train", "--stage", "espmedsam", "--model-size", "tiny", "--image-size", str(SIZE),
                 "--output-dir", str(tmp_path / "out"), "--report-to", "tensorboard"])
    assert code == 1
    assert "report_to: tensorboard is not installed (pip install tensorboard)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="unknown tracker 'tensorbord'"):
        EspMedSamStageConfig(report_to=["tensorbord"])


def test_ctrl_c_prints_one_line_with_the_resume_command_and_exits_130(tmp_path, capsys, monkeypatch):
    from esp_medsam_hf.cli import main

    student().save_pretrained(tmp_path / "init")
    output = tmp_path / "run"
    steps, original = [], loop._training_step

    def interrupted_on_the_third_batch(run, batch, epoch):
        steps.append(1)
        if len(steps) == 3:
            raise KeyboardInterrupt
        return original(run, batch, epoch)

    monkeypatch.setattr(loop, "_training_step", interrupted_on_the_third_batch)
    command = ["train", "--stage", "espmedsam", "--init-from", str(tmp_path / "init"), "--data", "synthetic",
               "--domains", "isic", "dsb", "--synthetic-train-images", "3", "--synthetic-valid-images", "1",
               "--batch-size", "2", "--epochs", "2", "--checkpoint-every", "1", "--no-validate", "--no-progress",
               "--output-dir", str(output)]
    assert main(command) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    line = next(line for line in err.splitlines() if "interrupted" in line)
    assert line.startswith("esp-medsam train: interrupted at step 2 (espmedsam); resume with: esp-medsam train ")
    assert not [p for p in output.rglob("*") if p.name.startswith(".tmp")]  # nothing half-written
    assert latest_checkpoint(output).name == "step-00000002"
    resume = shlex.split(line.split("resume with: ")[1])
    assert resume[:2] == ["esp-medsam", "train"] and resume[-2:] == ["--resume", "latest"]
    monkeypatch.setattr(loop, "_training_step", original)
    assert main(resume[1:]) == 0
    assert latest_checkpoint(output).name == "step-00000006" and (output / "release" / "config.json").is_file()


def test_an_existing_run_is_refused_before_any_data_is_loaded(tmp_path, data, monkeypatch):
    from esp_medsam_hf.training import run_stage
    from esp_medsam_hf.training.stages import espmedsam as stage_three

    config = EspMedSamStageConfig(output_dir=str(tmp_path), max_steps=1, validate=False, **COMMON)
    run(config, data)

    def no_work(*args, **kwargs):
        raise AssertionError("the stage loaded its data before checking its run folder")

    monkeypatch.setattr(stage_three, "espmedsam_task", no_work)
    with pytest.raises(FileExistsError, match="already holds a run; pass --resume latest"):
        run_stage(config)
    with pytest.raises(FileNotFoundError, match="checkpoint .*nowhere does not exist"):
        run_stage(dataclasses.replace(config, resume=str(tmp_path / "nowhere")))
    with pytest.raises(Exception, match="cannot resume .* with other options"):
        run_stage(dataclasses.replace(config, resume="latest", learning_rate=0.5))
    with pytest.raises(FileExistsError, match="would delete"):
        run_stage(dataclasses.replace(config, overwrite=True, init_from=str(tmp_path / "final")))
