"""Training throughput of the ESP-MedSAM student and a SAM ViT-B teacher at 1024 px: images/s and peak memory.

    python scripts/benchmark_training.py                                   # CPU, batch 1, both models
    python scripts/benchmark_training.py --device cuda --bf16 --batch-size 4 --json OUT.json
    python scripts/benchmark_training.py --device cuda --bf16 --batch-size 16 --models student --compile \
        --data synthetic --workers 8 --json OUT.json

One training step = forward with labels, backward of the model's loss (mask focal + dice, patch BCE, and for the
student the modality cross-entropy), Adam step (fused on CUDA unless ``--fused-adam off``), optionally compiled
(``--compile``: ``torch.compile`` of the model; the warm-up steps, compile included, are timed separately).
``--data tensors`` (default) feeds one fixed batch already on the device; ``--data synthetic`` feeds the training
pipeline (synthetic domains -> ``SegmentationDataset`` -> ``Collator`` with the image processor -> DataLoader with
``--workers`` processes, pinned memory on CUDA), and the time spent waiting for the next batch and copying it to
the device is reported apart from the step time.

One training step = forward with labels, backward of the model's loss (mask focal + dice, patch BCE, and for the
student the modality cross-entropy), Adam step. The teacher's SAM encoder is frozen as in stage 1, so only its
medical tokens, MLPs and heads are updated. Each model runs in its own child process so that the CPU peak memory
(maximum resident set size) is that model's alone; on CUDA the peak is ``torch.cuda.max_memory_allocated``.
Weights are random (throughput does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path


def build(model_name: str, image_size: int, tiny: bool = False):
    import torch

    from esp_medsam_hf import EspMedSamConfig, EspMedSamModel
    from esp_medsam_hf.models.esp_medsam.configuration_esp_medsam_teacher import EspMedSamTeacherConfig
    from esp_medsam_hf.models.esp_medsam.modeling_esp_medsam_teacher import EspMedSamTeacherModel

    torch.manual_seed(0)
    if model_name == "student":
        return EspMedSamModel((EspMedSamConfig.tiny if tiny else EspMedSamConfig)(image_size=image_size))
    config = EspMedSamTeacherConfig.from_preset("vit-b", image_size=image_size, random_init=True)
    return EspMedSamTeacherModel(config)


def measure(model_name: str, args: argparse.Namespace) -> dict:
    """Time ``args.steps`` training steps after ``args.warmup`` untimed ones, in this process."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build(model_name, args.image_size, args.tiny).to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    fused = args.fused_adam == "on" or (args.fused_adam == "auto" and device.type == "cuda")
    optimizer = torch.optim.Adam(trainable, lr=1e-4, fused=fused or None)
    forward = torch.compile(model) if args.compile else model
    batch = args.batch_size
    batches = batch_source(args, device, args.warmup + args.steps)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def step(inputs: dict) -> torch.Tensor:
        with autocast:
            loss = forward(pixel_values=inputs["pixel_values"], modality=inputs["modality"],
                           labels=inputs["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    warmup_start = time.perf_counter()
    for _ in range(args.warmup):
        step(next(batches))
    synchronize()
    warmup_seconds = time.perf_counter() - warmup_start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, data_times = [], []
    cpu_start = time.process_time()
    for _ in range(args.steps):
        start = time.perf_counter()
        inputs = next(batches)
        synchronize()
        loaded = time.perf_counter()
        loss = float(step(inputs))
        synchronize()
        times.append(time.perf_counter() - loaded)
        data_times.append(loaded - start)
    seconds = sum(times) / len(times)
    data_seconds = sum(data_times) / len(data_times)
    # CPU time of this process per step: with one thread, what the wall time would be on an otherwise idle machine
    cpu_seconds = (time.process_time() - cpu_start) / args.steps
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
        peak_kind = "cuda max_memory_allocated"
        device_name = torch.cuda.get_device_name(device)
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
        peak_kind = "process max RSS"
        device_name = platform.processor() or platform.machine()
    return {
        "model": model_name,
        "device": args.device,
        "device_name": device_name,
        "dtype": "bf16 autocast" if args.bf16 else "fp32",
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "image_size": args.image_size,
        "batch_size": batch,
        "steps": args.steps,
        "data": args.data,
        "fused_adam": fused,
        "compiled": args.compile,
        "warmup_steps": args.warmup,
        "warmup_seconds": warmup_seconds,
        "seconds_per_step": seconds,
        "data_seconds_per_step": data_seconds,
        "cpu_seconds_per_step": cpu_seconds,
        "images_per_second": batch / seconds,
        "images_per_second_with_data": batch / (seconds + data_seconds),
        "peak_memory_mb": peak_mb,
        "peak_memory_kind": peak_kind,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "last_loss": loss,
    }


def batch_source(args: argparse.Namespace, device, count: int):
    """An iterator of ``count`` training batches on ``device``: one fixed random batch (``--data tensors``), or the
    training data pipeline on synthetic domains (``--data synthetic``)."""
    import torch

    size, batch = args.image_size, args.batch_size
    if args.data == "tensors":
        generator = torch.Generator().manual_seed(0)
        fixed = {
            "pixel_values": torch.randn(batch, 3, size, size, generator=generator).to(device),
            "labels": (torch.rand(batch, 1, size, size, generator=generator) > 0.5).float().to(device),
            "modality": (torch.arange(batch) % 6).to(device),
        }
        return iter([fixed] * count)

    from esp_medsam_hf import EspMedSamImageProcessor
    from esp_medsam_hf.training.data import Collator, SegmentationDataset, load_domains

    images_per_domain = -(-batch * count // 6)
    domains = load_domains("synthetic", None, splits={"train": images_per_domain}, size=size)
    dataset = SegmentationDataset(domains, "train", augment=True)
    processor = EspMedSamImageProcessor(size={"height": size, "width": size})
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, shuffle=True, drop_last=True, collate_fn=Collator(processor),
        num_workers=args.workers, pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
    )

    def batches():
        while True:
            for inputs in loader:
                yield {k: v.to(device, non_blocking=True) for k, v in inputs.items()}

    return batches()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (GPU)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 1 on CPU, 4 on CUDA (the paper's)")
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=2, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--models", nargs="+", default=["student", "teacher"], choices=["student", "teacher"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--data", choices=["tensors", "synthetic"], default="tensors",
                        help="a fixed batch on the device, or the training data pipeline on synthetic domains")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (--data synthetic)")
    parser.add_argument("--fused-adam", choices=["auto", "on", "off"], default="auto",
                        help="torch's fused Adam (auto: on CUDA)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model for the training step")
    parser.add_argument("--tiny", action="store_true", help="the student's tiny configuration (smoke runs)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--single", help=argparse.SUPPRESS)  # child-process mode: one model, JSON on stdout
    args = parser.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = 4 if args.device.startswith("cuda") else 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.single:
        print("RESULT " + json.dumps(measure(args.single, args)))
        return 0
    forwarded = list(argv if argv is not None else sys.argv[1:])
    results = []
    for model_name in args.models:
        print(f"benchmarking {model_name} at {args.image_size} px, batch {args.batch_size}, {args.device}"
              f"{' bf16' if args.bf16 else ''} ...", flush=True)
        child = subprocess.run([sys.executable, __file__, *forwarded, "--single", model_name],
                               capture_output=True, text=True)
        if child.returncode != 0:
            print(child.stderr[-3000:], file=sys.stderr)
            return child.returncode
        result = json.loads(next(l for l in child.stdout.splitlines() if l.startswith("RESULT "))[7:])
        results.append(result)
        print(f"  {result['images_per_second']:.3f} images/s ({result['seconds_per_step']:.2f} s/step; data "
              f"{result['data_seconds_per_step']:.3f} s/step apart; warm-up {result['warmup_seconds']:.1f} s), peak "
              f"memory {result['peak_memory_mb']:.0f} MB ({result['peak_memory_kind']}), "
              f"{result['trainable_parameters'] / 1e6:.2f} M of {result['parameters'] / 1e6:.2f} M parameters trained",
              flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        temporary = args.json.with_name(f".{args.json.name}.tmp")
        temporary.write_text(json.dumps({"results": results}, indent=2) + "\n")
        temporary.replace(args.json)
        print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
