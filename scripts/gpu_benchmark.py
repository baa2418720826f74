#!/usr/bin/env python
"""One bounded GPU benchmark run writing one table (``scripts/gpu_benchmark.sh`` runs it on a lent H200).

Rows, all measured in this run:
- ``ours eager``: the fast configuration (SDPA, BatchNorm folded, channels-last), fp32 and bf16 autocast.
- ``ours compiled``: the same model under ``torch.compile`` (``--compile-mode``, default ``reduce-overhead``: CUDA
  graphs). One compile per dtype: the batch axis is marked dynamic (``torch._dynamo.maybe_mark_dynamic``) at the
  first, largest batch, so the other sizes reuse the graph; batch 1 is bucketed to 2 (PyTorch specialises a size
  of 1, which would cost a second compile). ``compiles`` counts the graphs dynamo built for that dtype.
- ``official stand-in``: the plain configuration (eager attention, BatchNorm unfused, no compile), the baseline of
  every ratio.
- ``training``: ``scripts/benchmark_training.py`` (student, Adam fused on CUDA, the model's loss), images/s, the
  data-loading time apart and peak memory.

Every phase has its own share of ``--budget-s`` and a measurement is skipped, and said so, when the time left
cannot hold it; ``results.json`` is rewritten after every row so a run cut short keeps what it measured.
``--quick`` is the CPU smoke mode (tiny configuration at 64 px, ``--compile-backend aot_eager`` is quick there).

    python scripts/gpu_benchmark.py --device cuda --output runs/gpu --budget-s 300
    python scripts/gpu_benchmark.py --device cpu --quick --compile-backend aot_eager --output /tmp/gpu_smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from esp_medsam_hf import EspMedSamConfig, EspMedSamModel
from esp_medsam_hf.benchmark import machine_info, time_step
from esp_medsam_hf.benchmark.timing import autocast

HERE = Path(__file__).resolve().parent


class Deadline:
    """Seconds left of the run's budget."""

    def __init__(self, budget_s: float):
        self.end = time.monotonic() + budget_s

    def left(self) -> float:
        return self.end - time.monotonic()


def build(args: argparse.Namespace, fast: bool) -> EspMedSamModel:
    config = (EspMedSamConfig.tiny if args.quick else EspMedSamConfig)(image_size=args.image_size)
    config._attn_implementation = "sdpa" if fast else "eager"
    torch.manual_seed(0)
    model = EspMedSamModel(config).eval().requires_grad_(False)
    if fast:
        model.fuse_batchnorm()
    model.to(args.device)
    if fast and args.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def inputs(model: EspMedSamModel, batch: int, device: str, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    size = model.config.image_size
    pixels = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    return pixels, torch.arange(batch, device=device) % model.config.num_modalities


class Report:
    def __init__(self, args: argparse.Namespace):
        self.output = Path(args.output)
        self.output.mkdir(parents=True, exist_ok=True)
        self.data = {"machine": machine_info(args.device), "settings": dict(vars(args)), "rows": [], "skipped": []}

    def add(self, **row) -> None:
        self.data["rows"].append(row)
        self.save()

    def skip(self, what: str, why: str) -> None:
        print(f"skipped {what}: {why}", flush=True)
        self.data["skipped"].append(f"{what}: {why}")
        self.save()

    def save(self) -> None:
        path = self.output / "results.json"
        temporary = path.with_name(".results.json.tmp")
        temporary.write_text(json.dumps(self.data, indent=2) + "\n")
        temporary.replace(path)


def measure(report: Report, args, deadline: Deadline, label: str, mode: str, model_call, batch: int, dtype: str,
            run_batch: int | None = None, **extra) -> float | None:
    """Time ``model_call(pixels, modality)`` at ``batch`` (run as ``run_batch`` when bucketed); returns the
    latency in ms, or None when skipped."""
    model = extra.pop("model")
    run_batch = run_batch or batch
    pixels, modality = inputs(model, run_batch, args.device, args.channels_last and label == "ours")

    def step():
        with autocast(args.device, dtype):
            return model_call(pixels, modality)

    try:
        first = time.perf_counter()
        with torch.no_grad():
            step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        first_s = time.perf_counter() - first
        if deadline.left() < first_s * (args.warmup + args.iterations) + 5:
            report.skip(f"{label} {mode} {dtype} batch {batch}", "not enough time left in this phase")
            return None
        times, peak, _ = time_step(step, args.device, args.warmup, args.iterations)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        report.skip(f"{label} {mode} {dtype} batch {batch}", "out of memory")
        return None
    latency = statistics.median(times) * 1e3
    report.add(model=label, mode=mode, dtype=dtype, batch=batch, run_batch=run_batch, latency_ms=latency,
               images_per_s=batch / latency * 1e3, peak_memory_mib=peak, first_call_s=first_s, **extra)
    print(f"{label} {mode} {dtype} batch {batch}: {latency:.2f} ms (first call {first_s:.1f} s)", flush=True)
    return latency


def eager(report: Report, args, deadline: Deadline) -> EspMedSamModel:
    """Eager rows of ours and of the stand-in; returns our model for the compiled rows."""
    ours, plain = build(args, fast=True), build(args, fast=False)
    eager_share = Deadline(min(deadline.left() * args.eager_share, deadline.left()))
    for dtype in args.dtypes:
        for batch in args.batch_sizes:
            for label, model in (("ours", ours), ("official stand-in", plain)):
                measure(report, args, eager_share, label, "eager", lambda p, m, model=model: model(p, modality=m)
                        .pred_masks, batch, dtype, model=model)
    return ours


def compiled_rows(report: Report, args, deadline: Deadline, ours: EspMedSamModel, dtypes: list[str]) -> None:
    """Compiled rows of ours, one compile per dtype, largest batch first. A dtype is not started when the time
    left is under the previous compile's time plus the training reserve."""
    from torch._dynamo.utils import counters

    for dtype in dtypes:
        previous = [r["first_call_s"] for r in report.data["rows"] if r["mode"].startswith("compiled")]
        if previous and deadline.left() < max(previous) + args.training_reserve_s:
            report.skip(f"ours compiled {dtype}", f"its compile (about {max(previous):.0f} s) does not fit")
            continue
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(ours, backend=args.compile_backend, mode=args.compile_mode, fullgraph=True)

        def call(pixels, modality, compiled=compiled):
            torch._dynamo.maybe_mark_dynamic(pixels, 0)
            torch._dynamo.maybe_mark_dynamic(modality, 0)
            return compiled(pixels, modality=modality).pred_masks

        for batch in sorted(args.batch_sizes, reverse=True):
            if deadline.left() < args.training_reserve_s + 10:
                report.skip(f"ours compiled {dtype} batch {batch}", "budget kept for training")
                continue
            bucket = max(batch, 2)
            phase = Deadline(deadline.left() - args.training_reserve_s)
            measure(report, args, phase, "ours", f"compiled ({args.compile_mode or 'default'})", call, batch, dtype,
                    run_batch=bucket, model=ours, compiles=counters["stats"]["unique_graphs"])
            rows = [r for r in report.data["rows"] if r["mode"].startswith("compiled") and r["dtype"] == dtype]
            for row in rows:  # the graphs built so far for this dtype, including this batch's
                row["compiles"] = counters["stats"]["unique_graphs"]
            report.save()


def training(report: Report, args, deadline: Deadline) -> None:
    limit = int(deadline.left())
    if limit < 20:
        report.skip("training", "no time left")
        return
    out = Path(args.output) / "training.json"
    command = [sys.executable, str(HERE / "benchmark_training.py"), "--device", args.device, "--models", "student",
               "--batch-size", str(args.training_batch_size), "--image-size", str(args.image_size),
               "--steps", str(args.training_steps), "--warmup", "2", "--json", str(out)]
    command += ["--bf16"] if "bf16" in args.dtypes and args.device.startswith("cuda") else []
    command += ["--tiny"] if args.quick else []
    try:
        subprocess.run(command, check=True, timeout=limit)
    except (subprocess.TimeoutExpired, subprocess.CalledProcessError) as error:
        report.skip("training", str(error))
        return
    for result in json.loads(out.read_text())["results"]:
        report.add(model="training student", mode="eager, fused Adam" if result["fused_adam"] else "eager, Adam",
                   dtype=result["dtype"], batch=result["batch_size"], run_batch=result["batch_size"],
                   latency_ms=result["seconds_per_step"] * 1e3, images_per_s=result["images_per_second"],
                   peak_memory_mib=result["peak_memory_mb"], first_call_s=result["warmup_seconds"],
                   data_ms_per_step=result["data_seconds_per_step"] * 1e3)


def table(data: dict) -> str:
    """The Markdown table: every row, and its ratio to the stand-in at the same dtype and batch."""
    base = {(r["dtype"], r["batch"]): r["latency_ms"] for r in data["rows"] if r["model"] == "official stand-in"}
    machine = data["machine"]
    lines = [
        f"Machine: {machine.get('gpu') or machine['cpu']}; torch {machine['versions'].get('torch')}, transformers "
        f"{machine['versions'].get('transformers')}",
        "",
        "| model | mode | dtype | batch | latency (ms) | images/s | peak memory (MiB) | / stand-in | compiles "
        "| first call (s) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in data["rows"]:
        ratio = base.get((r["dtype"], r["batch"])) if r["model"] != "training student" else None
        batch = f"{r['batch']}" + (f" (as {r['run_batch']})" if r["run_batch"] != r["batch"] else "")
        peak = r.get("peak_memory_mib")
        peak_text = "" if peak is None else f"{peak:.0f}"
        ratio_text = "" if not ratio else f"{r['latency_ms'] / ratio:.2f}"
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['dtype']} | {batch} | {r['latency_ms']:.2f} | {r['images_per_s']:.1f} "
            f"| {peak_text} | {ratio_text} | {r.get('compiles', '')} | {r['first_call_s']:.1f} |"
        )
    for r in data["rows"]:
        if "data_ms_per_step" in r:
            lines.append(f"\nTraining: data loading {r['data_ms_per_step']:.1f} ms per step, apart from the step.")
    lines += [f"- skipped {s}" for s in data["skipped"]]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--output", required=True)
    parser.add_argument("--budget-s", type=float, default=300, help="the whole run, training included")
    parser.add_argument("--quick", action="store_true", help="CPU smoke mode: tiny configuration at 64 px")
    parser.add_argument("--batch-sizes", type=int, nargs="+")
    parser.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--iterations", type=int)
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--compile-mode", default=None, help="default: reduce-overhead on CUDA (CUDA graphs)")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--eager-share", type=float, default=0.3, help="share of the budget for the eager rows")
    parser.add_argument("--training-reserve-s", type=float, help="seconds kept for training (default 60; quick 20)")
    parser.add_argument("--training-batch-size", type=int, help="default 16 (quick: 2)")
    parser.add_argument("--training-steps", type=int, default=5)
    args = parser.parse_args(argv)
    args.image_size = 64 if args.quick else 1024
    args.batch_sizes = sorted(args.batch_sizes or ((1, 2, 4) if args.quick else (1, 8, 32)))
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.iterations = args.iterations or (2 if args.quick else 10)
    cuda = args.device.startswith("cuda")
    args.compile_mode = args.compile_mode or ("reduce-overhead" if cuda and args.compile_backend == "inductor" else None)
    args.training_reserve_s = args.training_reserve_s or (20 if args.quick else 60)
    args.training_batch_size = args.training_batch_size or (2 if args.quick else 16)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    deadline = Deadline(args.budget_s)
    report = Report(args)
    ours = eager(report, args, deadline)
    first, *rest = sorted(args.dtypes, key=lambda d: d != "bf16")  # bf16 first: the targets
    compiled_rows(report, args, deadline, ours, [first])
    training(report, args, deadline)
    args.training_reserve_s = 0  # training is done: the rest of the budget goes to the other dtype's compile
    compiled_rows(report, args, deadline, ours, rest)
    text = table(report.data)
    (Path(args.output) / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
