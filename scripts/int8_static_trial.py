"""Static QDQ int8 against the shipped dynamic int8, on one float32 ONNX export (issue 25).

The float32 export (``--onnx``, e.g. a file of the onnxruntime cache) is quantised statically
(``onnxruntime.quantization.quantize_static``, QDQ format, int8 convolutions and matrix products, weights per
channel), calibrated on real training images of each modality of a prepared data folder (``--data``, e.g. the main
job's ``<output>/data``) through a ``CalibrationDataReader``; the shipped dynamic copy
(``export.quantize_onnx``) is made beside it. Both are timed per tile (process CPU time and wall time, interleaved
rounds, ``--batch`` tiles per call) against the float32 export at batch 1, and their masks are compared with the
float32 masks on the test images (share of pixels agreeing). It prints a Markdown table; docs/benchmark.md reports
the run that decided to keep the dynamic path.

    python scripts/int8_static_trial.py --onnx CACHE/esp_medsam_<hash>.onnx --processor MODEL_DIR \\
        --data /tmp/mj-out/data --output /tmp/static_trial
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import numpy as np

DOMAINS = ("mnfinder", "dsb-stardist", "vascx")


def _inputs(processor, data: str, split: str, per_domain: int) -> list[dict[str, np.ndarray]]:
    """One feed per image: ``per_domain`` images of each real domain's ``split``, processed as the whole view."""
    from esp_medsam_hf.data.prepared import load_domains
    from esp_medsam_hf.data.schema import image_to_rgb

    domains = load_domains(data, list(DOMAINS), splits={split: 0})
    feeds = []
    for name in DOMAINS:
        dataset = domains[name][split]
        for index in range(min(per_domain, len(dataset))):
            item = dataset[index]
            pixels = processor(images=[image_to_rgb(item["image"])], return_tensors="np")["pixel_values"]
            feeds.append({"pixel_values": pixels.astype(np.float32),
                          "modality": np.array([int(item["modality"])], np.int64)})
    return feeds


def _quantize_static(source: Path, target: Path, feeds: list[dict[str, np.ndarray]]) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class RealImages(CalibrationDataReader):
        def __init__(self):
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

    quantize_static(str(source), str(target), RealImages(), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["Conv", "MatMul", "Gemm"], per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def _time(session, feed: dict[str, np.ndarray], batch: int) -> tuple[float, float]:
    """(wall, process CPU) seconds per tile of one call of ``batch`` copies of ``feed``."""
    batched = {key: np.concatenate([value] * batch) for key, value in feed.items()}
    start, cpu = time.perf_counter(), time.process_time()
    session.run(None, batched)
    return (time.perf_counter() - start) / batch, (time.process_time() - cpu) / batch


def main() -> None:
    from esp_medsam_hf.models.esp_medsam.export import onnxruntime_session, quantize_onnx
    from esp_medsam_hf.models.esp_medsam.image_processing_esp_medsam import EspMedSamImageProcessor

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", required=True, type=Path, help="the float32 export")
    parser.add_argument("--processor", required=True, help="a saved model folder (its image processor)")
    parser.add_argument("--data", required=True, help="a prepared data folder holding mnfinder, dsb-stardist, vascx")
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--calibration-images", type=int, default=8, help="training images per domain")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    args.output.mkdir(parents=True, exist_ok=True)
    processor = EspMedSamImageProcessor.from_pretrained(args.processor)
    static, dynamic = args.output / "static_qdq.onnx", args.output / "dynamic.onnx"
    if not static.exists():
        _quantize_static(args.onnx, static, _inputs(processor, args.data, "train", args.calibration_images))
    if not dynamic.exists():
        quantize_onnx(args.onnx, dynamic)
    sessions = {name: onnxruntime_session(path) for name, path in
                (("float32", args.onnx), ("dynamic int8", dynamic), ("static QDQ int8", static))}
    tests = _inputs(processor, args.data, "test", 16)
    agreement = {name: [] for name in sessions}
    for feed in tests:
        reference = sessions["float32"].run(None, feed)[0] > 0
        for name, session in sessions.items():
            agreement[name].append(float(((session.run(None, feed)[0] > 0) == reference).mean()))
    timings = {name: [] for name in sessions}
    for _ in range(args.rounds):
        for name, session in sessions.items():
            timings[name].append(_time(session, tests[0], 1 if name == "float32" else args.batch))
    print(f"| graph | tiles per call | wall s per tile (median) | process CPU s per tile (median) "
          f"| mask pixels agreeing with float32, {len(tests)} test images % (lowest image) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in sessions:
        wall = statistics.median(t[0] for t in timings[name])
        cpu = statistics.median(t[1] for t in timings[name])
        print(f"| {name} | {1 if name == 'float32' else args.batch} | {wall:.3f} | {cpu:.3f} "
              f"| {100 * statistics.fmean(agreement[name]):.2f} ({100 * min(agreement[name]):.2f}) |")


if __name__ == "__main__":
    main()
