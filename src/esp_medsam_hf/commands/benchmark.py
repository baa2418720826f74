"""``esp-medsam benchmark``: parameters, FLOPs, latency, throughput and peak memory of ESP-MedSAM and its peers."""

from __future__ import annotations

import argparse
import sys

from ..benchmark.settings import ALL_MODELS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, help="folder for benchmark.json, benchmark.md and benchmark.png")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument(
        "--models", nargs="+", choices=ALL_MODELS, metavar="MODEL",
        help=f"models to measure (default: all that fit the device; choices: {', '.join(ALL_MODELS)})",
    )
    parser.add_argument("--batch-sizes", nargs="+", type=int, help="default: 1 8 on the CPU, 1 8 32 on a GPU")
    parser.add_argument(
        "--dtypes", nargs="+", choices=("fp32", "bf16"), help="default: fp32 on the CPU, fp32 bf16 (autocast) on a GPU"
    )
    parser.add_argument("--image-size", type=int, help="ESP-MedSAM and SAM input size (default 1024; quick: 64)")
    parser.add_argument("--warmup", type=int, help="untimed calls before timing (default 1 on the CPU, 5 on a GPU)")
    parser.add_argument("--iterations", type=int, help="timed calls (default 3 on the CPU, 20 on a GPU)")
    parser.add_argument(
        "--compile", choices=("auto", "on", "off"), default="auto",
        help="torch.compile the fast configuration (auto: on a GPU only; inductor's C++ build is slow on small CPUs)",
    )
    parser.add_argument(
        "--compile-mode", default=None,
        help="torch.compile mode of the fast configuration (default: reduce-overhead on a GPU, default on the CPU)",
    )
    parser.add_argument("--channels-last", action="store_true", help="run the fast configuration channels-last")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument(
        "--backend", choices=("auto", "onnxruntime", "eager"),
        help="backend of esp-medsam-user, the path users take (default: $ESP_MEDSAM_BACKEND, else auto)",
    )
    parser.add_argument("--onnx-threads", type=int, help="onnxruntime intra-op threads (default: all cores)")
    parser.add_argument(
        "--tiling", action="store_true",
        help="measure only tiled inference: a 1024x1024 image at native scale (16 tiles of 256 px) through "
        "prediction.predict against the 16 tiles' single forwards, interleaved; writes tiling.json and tiling.md",
    )
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved repeats of the tiling measurement (default 5 with --tiling, 3 with --cpu-paths)")
    parser.add_argument(
        "--cpu-paths", action="store_true",
        help="the CPU paths in one run: the official release (esp-medsam-plain), our PyTorch forward, ONNX float32, "
        "ONNX int8 and the users' path at batch 1, then the tiling measurement, then (with --model) int8 against "
        "float32 on the real test sets; writes cpu_paths.md with each target",
    )
    parser.add_argument("--model", help="--cpu-paths: a trained model folder for the int8 comparison on real images: "
                        "a release (the demo's summary.json final_model, stage-3-esp-medsam/release), whose image "
                        "processor holds the calibrated inference settings; a stage's final/ folder lacks them")
    parser.add_argument("--real-data", help="--cpu-paths: prepared real domains (default: prepared from the archives)")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an earlier run in --output")
    parser.add_argument(
        "--quick", action="store_true",
        help="CI mode: tiny ESP-MedSAM and SAM configurations at 64 px, batch 1 and 2, one timed call each; "
        "LiteMedSAM (real, 256 px) only if named in --models",
    )


def settings_from_args(args: argparse.Namespace):
    """``BenchmarkSettings`` from the parsed arguments, with device-dependent defaults."""
    from ..benchmark import BenchmarkSettings

    gpu = args.device.startswith("cuda")
    if args.quick:
        defaults = dict(batch_sizes=(1, 2), dtypes=("fp32",), image_size=64, warmup=1, iterations=1)
    elif gpu:
        defaults = dict(batch_sizes=(1, 8, 32), dtypes=("fp32", "bf16"), image_size=1024, warmup=5, iterations=20)
    else:
        defaults = dict(batch_sizes=(1, 8), dtypes=("fp32",), image_size=1024, warmup=1, iterations=3)
    skip = {"litemedsam", "sam-vit-h"} if args.quick else ({"esp-medsam-onnx", "esp-medsam-onnx-int8"} if gpu else {"sam-vit-h"})
    models = tuple(args.models) if args.models else tuple(m for m in ALL_MODELS if m not in skip)
    compile_on = args.compile == "on" or (args.compile == "auto" and gpu)
    return BenchmarkSettings(
        device=args.device,
        batch_sizes=tuple(args.batch_sizes or defaults["batch_sizes"]),
        dtypes=tuple(args.dtypes or defaults["dtypes"]),
        models=models,
        warmup=defaults["warmup"] if args.warmup is None else args.warmup,
        iterations=args.iterations or defaults["iterations"],
        image_size=args.image_size or defaults["image_size"],
        quick=args.quick,
        compile=compile_on,
        channels_last=args.channels_last,
        compile_mode=args.compile_mode or ("reduce-overhead" if gpu and compile_on else None),
        onnx_threads=args.onnx_threads,
        backend=args.backend,
    )


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from ..benchmark import format_table, run_benchmark

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {args.device}: CUDA is not available on this machine", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    from ..benchmark.cpu_paths import OUTPUTS, check_output

    written = OUTPUTS if args.cpu_paths else (("tiling.json", "tiling.md") if args.tiling else OUTPUTS[:3])
    try:
        check_output(args.output, written, args.overwrite)
    except FileExistsError as error:
        print(error, file=sys.stderr)
        return 2
    if args.tiling:
        return run_tiling(args)
    if args.cpu_paths:
        return run_cpu_paths(args)
    settings = settings_from_args(args)
    with tqdm(desc="benchmark", unit="step") as bar:
        report = run_benchmark(settings, args.output, progress=lambda message: (bar.set_postfix_str(message), bar.update()))
    print(format_table(report))
    print(f"wrote {args.output}/benchmark.json, benchmark.md, benchmark.png")
    return 0


def run_tiling(args: argparse.Namespace) -> int:
    """``--tiling``: the tiled-inference measurement (``benchmark.tiling``), printed and written to ``--output``."""
    import json
    from pathlib import Path

    from ..benchmark.tiling import measure_tiling, tiling_markdown
    from ..models.esp_medsam.fileio import atomic_file

    repeats = 5 if args.repeats is None else args.repeats
    if repeats < 1:
        print(f"--repeats must be at least 1, got {repeats}", file=sys.stderr)
        return 2
    size, tile = (128, 64) if args.quick else (1024, 256)
    result = measure_tiling(size, tile, repeats=repeats, backend=args.backend, device=args.device,
                            quick=args.quick)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    with atomic_file(output / "tiling.json") as path:
        Path(path).write_text(json.dumps(result, indent=2) + "\n")
    with atomic_file(output / "tiling.md") as path:
        Path(path).write_text(tiling_markdown(result))
    print(tiling_markdown(result))
    print(f"wrote {output}/tiling.json, tiling.md")
    return 0


def run_cpu_paths(args: argparse.Namespace) -> int:
    """``--cpu-paths``: ``benchmark.cpu_paths`` at batch 1 in float32 (``--models`` narrows the rows), then with
    ``--model`` ``data.int8_accuracy`` on the real test sets; printed and written to ``--output``."""
    import json
    from dataclasses import replace
    from pathlib import Path

    from tqdm.auto import tqdm

    from ..benchmark.cpu_paths import MODELS, run_cpu_paths as measure, write_summary
    from ..models.esp_medsam.fileio import atomic_file

    repeats = 3 if args.repeats is None else args.repeats
    if repeats < 1:
        print(f"--repeats must be at least 1, got {repeats}", file=sys.stderr)
        return 2
    if args.model is not None and not Path(args.model).is_dir():
        print(f"--model {args.model}: not a folder (expected a saved ESP-MedSAM model)", file=sys.stderr)
        return 2
    settings = replace(settings_from_args(args), models=tuple(args.models or MODELS),
                       batch_sizes=tuple(args.batch_sizes or (1,)), dtypes=("fp32",))
    output = Path(args.output)
    with tqdm(desc="cpu paths", unit="step") as bar:
        report, tiling = measure(settings, output, repeats=repeats,
                                 progress=lambda message: (bar.set_postfix_str(message), bar.update()))
    accuracy, markdown = None, ""
    if args.model is not None:
        from ..data.int8_accuracy import int8_accuracy_markdown, measure_int8_accuracy

        accuracy = measure_int8_accuracy(args.model, args.real_data)
        markdown = int8_accuracy_markdown(accuracy)
        for name, text in (("int8_accuracy.json", json.dumps(accuracy, indent=2) + "\n"),
                           ("int8_accuracy.md", markdown)):
            with atomic_file(output / name) as path:
                Path(path).write_text(text)
    write_summary(output, report, tiling, accuracy, markdown)
    print((output / "cpu_paths.md").read_text())
    print(f"wrote {output}/cpu_paths.md, cpu_paths.json, benchmark.*, tiling.*"
          + (", int8_accuracy.*" if args.model else " (no --model: int8 on real images not measured)"))
    return 0
