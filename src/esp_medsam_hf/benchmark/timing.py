"""Parameters, FLOPs, and the time and peak memory of a call."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import torch


def count_flops(step: Callable[[], Any]) -> int:
    """FLOPs of one call of ``step`` (matrix products and convolutions, as ``FlopCounterMode`` counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        step()
    return counter.get_total_flops()


def autocast(device: str, dtype: str):
    """bf16 autocast on ``device`` for ``dtype == "bf16"``, else a no-op context."""
    if dtype == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _RssSampler:
    """Peak growth of the process's resident memory while active (CPU peak memory; sampled every 2 ms)."""

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()
        self._stop = threading.Event()
        self.base = self._process.memory_info().rss
        self.peak = self.base
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(0.002)

    def __enter__(self) -> "_RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        return (self.peak - self.base) / 2**20


def time_step(
    step: Callable[[], Any], device: str, warmup: int, iterations: int
) -> tuple[list[float], float | None, list[float]]:
    """Seconds of each timed call of ``step`` after ``warmup`` calls, the peak memory in MiB, and the process CPU
    seconds of each call (on a shared machine the CPU time is steadier than the wall-clock time).

    Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA, and the growth of the process's resident memory
    over the timed calls on the CPU (operator workspaces included; memory freed and reused is not counted twice).
    """
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with torch.no_grad():
        for _ in range(warmup):
            step()
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times, cpu_times = [], []
        sampler = _RssSampler() if not cuda else contextlib.nullcontext()
        with sampler:
            for _ in range(iterations):
                start, cpu_start = time.perf_counter(), time.process_time()
                step()
                sync()
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu_start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else sampler.peak_mib
    return times, peak, cpu_times
