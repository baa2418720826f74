#!/usr/bin/env python
"""The main job's stage 3 on the CPU before and after issue 25's training changes, in one run: its feature encoding
and its training step under the settings training ran with before (float32, Adam's per-parameter implementation)
against today's defaults (``mixed_precision: auto``, bf16 autocast where the CPU computes bf16 natively; fused Adam).

Each repeat runs the main job's stage-3 configuration (``training.demo.stage_configs``: its data, zoom views,
batch size, frozen stages and feature cache) for ``--steps`` steps once per setting, interleaved, each in a child
process of its own, so that a shared machine's load falls on both alike. Timing does not depend on the weights: the
student starts from ``--init-from`` (a main job's ``stage-2-distill/release``) or, by default, freshly initialised.
It prints the seconds and the ratios after / before, and writes ``stage3_speed.json`` in ``--output``.

Examples:
    python scripts/benchmark_stage3.py --output runs/stage3-speed
    python scripts/benchmark_stage3.py --output runs/stage3-speed --init-from outputs/demo/stage-2-distill/release
    python scripts/benchmark_stage3.py --output /tmp/smoke --quick --steps 2 --repeats 1   # tiny model, a smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import subprocess
import sys
from pathlib import Path

SETTINGS = {
    "before": {"mixed_precision": "no", "fused_optimizer": False},
    "after": {"mixed_precision": "auto", "fused_optimizer": True},
}
"""The two settings compared: training as it ran before issue 25, and today's defaults."""


class EncodingTimes(logging.Handler):
    """Collects ``training.features.cache_features``'s encoding seconds by what was encoded (its log record's first
    argument, e.g. "espmedsam: encoding training images", and its ``encoding_seconds``)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.seconds: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "encoding_seconds"):
            self.seconds[str(record.args[0])] = record.encoding_seconds


def step_seconds(log_jsonl: Path) -> list[float]:
    """The wall seconds of each training step after the first (which also builds the optimizer's state), from the
    run's ``log.jsonl``: the differences of its ``train`` events' times."""
    times = [event["time"] for event in map(json.loads, log_jsonl.read_text().splitlines())
             if event.get("event") == "train"]
    return [b - a for a, b in zip(times, times[1:])]


def run_setting(setting: str, run_dir: Path, steps: int, init_from: str | None, quick: bool) -> dict:
    """One stage-3 run of the main job's configuration under ``SETTINGS[setting]``; its encoding and step times."""
    from esp_medsam_hf.training import demo
    from esp_medsam_hf.training.stages import run_espmedsam

    handler = EncodingTimes()
    logging.getLogger("esp_medsam_hf.training.features").addHandler(handler)
    logging.getLogger("esp_medsam_hf.training.features").setLevel(logging.INFO)
    settings = demo.DemoSettings.quick() if quick else demo.DemoSettings.full()
    settings = dataclasses.replace(settings, espmedsam_steps=steps)
    data = demo.build_data(run_dir, settings, seed=0, progress=False)
    _, _, config = demo.stage_configs(run_dir, settings, seed=0, progress=False, threads=None)
    config = dataclasses.replace(config, init_from=init_from, model_size="tiny" if quick else "official",
                                 calibrate_object_size=False, classifier_domains=[], **SETTINGS[setting])
    run_espmedsam(config, data=data.train)  # no classifier fit, no calibration: not what is timed
    steps_s = step_seconds(Path(config.output_dir) / "log.jsonl")
    training = [seconds for what, seconds in handler.seconds.items() if "training images" in what]
    return {"setting": setting, **SETTINGS[setting], "encoding_s": training[0],
            "step_s_median": statistics.median(steps_s), "steps_timed": len(steps_s)}


def main() -> None:
    from esp_medsam_hf.models.esp_medsam.fileio import atomic_file

    parser = argparse.ArgumentParser(prog="benchmark_stage3.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="a new folder for the runs and stage3_speed.json")
    parser.add_argument("--steps", type=int, default=35, help="training steps per run (35: one epoch of the main job)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--init-from", default=None, help="a stage-2 release to start from (default: fresh weights)")
    parser.add_argument("--quick", action="store_true", help="the demo's quick sizes and the tiny model (smoke test)")
    parser.add_argument("--child", choices=sorted(SETTINGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    output = Path(args.output)
    if args.child:
        print(json.dumps(run_setting(args.child, output, args.steps, args.init_from, args.quick)))
        return
    if output.exists():
        parser.error(f"--output {output} exists: give a new folder (nothing is overwritten)")
    runs = []
    for repeat in range(args.repeats):
        for setting in SETTINGS:
            command = [sys.executable, __file__, "--child", setting, "--output", str(output / f"{setting}-{repeat}"),
                       "--steps", str(args.steps), *(["--quick"] if args.quick else []),
                       *(["--init-from", args.init_from] if args.init_from else [])]
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            runs.append({"repeat": repeat, **json.loads(done.stdout.strip().splitlines()[-1])})
            print(f"repeat {repeat + 1} {setting}: encoding {runs[-1]['encoding_s']:.1f} s, "
                  f"step {runs[-1]['step_s_median']:.3f} s (median of {runs[-1]['steps_timed']})", flush=True)
    pairs = list(zip(runs[0::2], runs[1::2]))  # (before, after) of each repeat
    result = {"steps": args.steps, "init_from": args.init_from, "quick": args.quick, "runs": runs,
              "encoding_ratio": [a["encoding_s"] / b["encoding_s"] for b, a in pairs],
              "step_ratio": [a["step_s_median"] / b["step_s_median"] for b, a in pairs]}
    with atomic_file(output / "stage3_speed.json") as temporary:
        Path(temporary).write_text(json.dumps(result, indent=1))
    for key in ("encoding_ratio", "step_ratio"):
        values = result[key]
        print(f"{key.replace('_', ' ')} after / before: median {statistics.median(values):.3f} "
              f"(per repeat {', '.join(f'{v:.3f}' for v in values)}); issue 25's target: at most 0.70")
    print(f"wrote {output / 'stage3_speed.json'}")


if __name__ == "__main__":
    main()
