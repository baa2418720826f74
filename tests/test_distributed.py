"""Scale-out: two CPU processes (``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2``: gloo;
``accelerate launch --cpu --num_processes 2`` starts one process only) train to the same weights as one process
with the same global batch."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import _distributed_training as tiny_run

HELPER = Path(__file__).with_name("_distributed_training.py")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_give_the_weights_of_one_process_with_the_same_global_batch(tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    assert accelerate, "the accelerate command is not installed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(free_port()), str(HELPER), str(tmp_path / "two"),
        str(tiny_run.GLOBAL_BATCH // 2),
    ]
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    try:
        _, stderr = launcher.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)  # the launcher and both workers
        launcher.communicate()
        raise
    assert launcher.returncode == 0, stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = torch.load(tiny_run.run(tmp_path / "one", tiny_run.GLOBAL_BATCH) / "state.pt")
    finally:
        torch.set_num_threads(threads)
    two = torch.load(tmp_path / "two" / "final" / "state.pt")
    initial = tiny_run.initial_model().state_dict()
    assert one.keys() == two.keys()
    moved = 0
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=2e-6, rtol=1e-5, msg=name)
        moved += int(not torch.equal(one[name], initial[name])) if name in initial else 0
    assert moved > 50  # training changed the weights, so agreeing means something
    assert "step-00000002" in os.listdir(tmp_path / "two" / "checkpoints")


def test_processes_that_accelerate_did_not_join_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu"):
        tiny_run.run(tmp_path / "alone", tiny_run.GLOBAL_BATCH)
