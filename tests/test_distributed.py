"""Scale-out: two CPU processes (``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2``: gloo;
``accelerate launch --cpu --num_processes 2`` starts one process only) train to the same weights as one process
with the same global batch; feature encoding and evaluation are shared between the processes, and only the main
process prints the train command's final line."""

from __future__ import annotations

import json
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
    temporary = tmp_path / "launcher-tmp"  # torchelastic's folders die with the test's folder
    temporary.mkdir()
    env = {
        **os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "TMPDIR": str(temporary),
        "PYTHONPATH": os.pathsep.join(sys.path),
    }
    command = [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(free_port()), str(HELPER), str(tmp_path / "two"),
        str(tiny_run.GLOBAL_BATCH // 2),
    ]
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    try:
        stdout, stderr = launcher.communicate(timeout=300)
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
        # Two half batches all-reduced against one batch: the gradients are summed in other orders, and Adam divides
        # each update by its gradient's own scale, so rounding shows at its size even where gradients are tiny
        # (measured up to 3.1e-6 on a bag's MLP weights of magnitude 0.075 after two steps at lr 1e-3).
        torch.testing.assert_close(two[name], one[name], atol=5e-6, rtol=1e-5, msg=name)
        moved += int(not torch.equal(one[name], initial[name])) if name in initial else 0
    assert moved > 50  # training changed the weights, so agreeing means something
    assert "step-00000002" in os.listdir(tmp_path / "two" / "checkpoints")
    # each process encoded half of the six images and segmented its share of each domain's three (2 and 1);
    # together they give what one process gives
    work = [json.loads((tmp_path / "two" / f"work-{rank}.json").read_text()) for rank in (0, 1)]
    assert work == [{"encoded": 3, "segmented": 4}, {"encoded": 3, "segmented": 2}]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = tiny_run.shared_work(tmp_path / "alone")
    finally:
        torch.set_num_threads(threads)
    shared = torch.load(tmp_path / "two" / "work.pt")
    torch.testing.assert_close(shared["features"], alone["features"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared["pooled"], alone["pooled"], atol=1e-5, rtol=1e-5)
    assert shared["dice"] == pytest.approx(alone["dice"], abs=1e-6)
    # the train command's final line, once; no "None" metrics from another process
    finals = [line for line in stdout.splitlines() if line.startswith("espmedsam: release folder")]
    assert len(finals) == 1 and "None" not in finals[0], stdout[-2000:]


def test_processes_that_accelerate_did_not_join_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu"):
        tiny_run.run(tmp_path / "alone", tiny_run.GLOBAL_BATCH)
