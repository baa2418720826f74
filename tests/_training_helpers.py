"""Shared by the training tests: an interrupted and resumed run beside an uninterrupted one."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from esp_medsam_hf.training import latest_checkpoint, train


def interrupt_at_step(task, step: int) -> None:
    """Make ``task``'s ``step``-th loss computation raise ``KeyboardInterrupt``, as a Ctrl-C in that step would."""
    compute, calls = task.compute_loss, []

    def interrupted(model, batch):
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt("simulated interruption")
        return compute(model, batch)

    task.compute_loss = interrupted


def assert_resume_matches_straight(config, build_task: Callable, root: Path):
    """Train ``config`` straight into ``root/straight``; train it again into ``root/resumed``, crashing at step 3,
    then resume from the step-2 checkpoint. The final parameters must agree within 1e-6. ``build_task(config)``
    builds a fresh task (as a new process would). Returns the resumed run's result and the straight run's final
    parameters."""
    straight = dataclasses.replace(config, output_dir=str(root / "straight"))
    train(straight, build_task(straight))

    broken = dataclasses.replace(config, output_dir=str(root / "resumed"))
    task = build_task(broken)
    interrupt_at_step(task, 3)
    with pytest.raises(KeyboardInterrupt):
        train(broken, task)
    assert latest_checkpoint(root / "resumed").name == "step-00000002"
    resumed = dataclasses.replace(broken, resume="latest")
    result = train(resumed, build_task(resumed))
    a = load_file(root / "straight" / "final" / "model.safetensors")
    b = load_file(root / "resumed" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=0), name
    return result, a
