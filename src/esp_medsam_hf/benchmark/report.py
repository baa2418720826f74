"""Benchmark reports: ratios to the baseline, merging runs, the Markdown table, the chart and the files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..models.esp_medsam.fileio import atomic_file
from .settings import ALL_MODELS, BASELINE


def write_report(report: dict[str, Any], output_dir: str | os.PathLike, stem: str = "benchmark") -> None:
    """Ratios, then ``STEM.json``, ``STEM.md`` (the table) and ``STEM.png`` (the chart) in ``output_dir``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    add_ratios(report)
    write_json(report, output_dir / f"{stem}.json")
    _write_text(format_table(report), output_dir / f"{stem}.md")
    if report["results"]:
        plot_benchmark(report, output_dir / f"{stem}.png")


def merge_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from several runs on the same machine (e.g. one run per model): results and models are joined,
    the machine and settings of the first run are kept, each run's settings are listed under ``runs``."""
    if not reports:
        raise ValueError("merge_reports needs at least one report")
    merged: dict[str, Any] = {
        "machine": dict(reports[0]["machine"]),
        "settings": reports[0]["settings"],
        "runs": [r["settings"] for r in reports],
        "models": {},
        "results": [],
        "skipped": {},
    }
    for report in reports:
        merged["models"].update(report["models"])
        merged["results"] += report["results"]
        merged["skipped"].update({k: v for k, v in report["skipped"].items() if k not in merged["models"]})
        if report["machine"].get("load_average_end"):
            merged["machine"]["load_average_end"] = report["machine"]["load_average_end"]
    add_ratios(merged)
    return merged


def add_ratios(report: dict[str, Any]) -> None:
    """Latency of every row divided by the plain configuration's at the same dtype and batch size."""
    plain = {(r["dtype"], r["batch_size"]): r["latency_ms"] for r in report["results"] if r["model"] == BASELINE}
    for row in report["results"]:
        base = plain.get((row["dtype"], row["batch_size"]))
        row["ratio_to_plain"] = None if base is None else round(row["latency_ms"] / base, 3)


def write_json(report: dict[str, Any], path: Path) -> None:
    """``report`` as indented JSON at ``path``, written atomically."""
    _write_text(json.dumps(report, indent=2) + "\n", path)


def _write_text(text: str, path: Path) -> None:
    with atomic_file(path) as temporary:
        temporary.write_text(text)


def format_table(report: dict[str, Any]) -> str:
    """A Markdown table of every measurement, with the machine and the models' size."""
    machine = report["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v)
    lines = [
        f"Machine: {machine['cpu']} ({machine['cpu_cores']} cores, {machine['torch_threads']} torch threads)"
        + (f", GPU {machine['gpu']}" if machine.get("gpu") else "")
        + f"; load average at start {_fmt_load(machine.get('load_average'))}, "
        f"at end {_fmt_load(machine.get('load_average_end'))}",
        f"Versions: {versions}",
        "",
        "| model | params (M) | GFLOPs/image | input | dtype | batch | latency (ms) | images/s | peak memory (MiB) "
        "| latency / plain | process CPU (ms) |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in report["results"]:
        info = report["models"][row["model"]]
        gflops = info["gflops_per_image"]
        peak, ratio, cpu = row["peak_memory_mib"], row["ratio_to_plain"], row.get("process_cpu_ms")
        lines.append(
            f"| {row['model']} | {info['parameters'] / 1e6:.2f} | {'' if gflops is None else f'{gflops:.1f}'} "
            f"| {info['image_size']} | {row['dtype']} | {row['batch_size']} | {row['latency_ms']:.1f} "
            f"| {row['images_per_s']:.2f} | {'' if peak is None else f'{peak:.0f}'} "
            f"| {'' if ratio is None else f'{ratio:.2f}'} | {'' if cpu is None else f'{cpu:.0f}'} |"
        )
    lines.append("")
    for name, info in report["models"].items():
        lines.append(f"- `{name}`: {info['description']}")
    for name, reason in report["skipped"].items():
        lines.append(f"- `{name}` skipped: {reason}")
    return "\n".join(lines) + "\n"


def _fmt_load(load: list[float] | None) -> str:
    return "n/a" if not load else "/".join(f"{x:.1f}" for x in load)


def plot_benchmark(report: dict[str, Any], path: Path) -> None:
    """Two bar charts: batch-1 latency and best throughput of every model and dtype (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    labels = sorted({(r["model"], r["dtype"]) for r in rows}, key=lambda k: (ALL_MODELS.index(k[0]), k[1]))
    smallest = min((r["batch_size"] for r in rows), default=1)
    latency = [
        next((r["latency_ms"] for r in rows if (r["model"], r["dtype"]) == key and r["batch_size"] == smallest), 0.0)
        for key in labels
    ]
    throughput = [max(r["images_per_s"] for r in rows if (r["model"], r["dtype"]) == key) for key in labels]
    names = [f"{m}\n{d}" for m, d in labels]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(labels) * 2), 4.5))
    for ax, values, title in (
        (axes[0], latency, f"latency at batch {smallest} (ms, lower is better)"),
        (axes[1], throughput, "best throughput over batch sizes (images/s)"),
    ):
        bars = ax.bar(range(len(values)), values, color=["#1f77b4" if "esp" in n else "#999999" for n in names])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_xticks(range(len(values)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    machine = report["machine"]
    fig.suptitle(f"{machine.get('gpu') or machine['cpu']} ({report['settings']['device']})", fontsize=10)
    fig.tight_layout()
    with atomic_file(path) as temporary:
        fig.savefig(temporary, dpi=110)
    plt.close(fig)
