"""Segmentation metrics of the paper: ``evaluate`` modules shipped with the package (see :func:`metric_path`).

The computations themselves are in :mod:`esp_medsam_hf.metrics.functional` (imported only when used, so that
importing the package stays light).
"""

from __future__ import annotations

from pathlib import Path

METRIC_NAMES = ("dice", "hausdorff")


def metric_path(name: str) -> str:
    """Folder of the ``evaluate`` module ``name`` ("dice" or "hausdorff"): ``evaluate.load(metric_path("dice"))``."""
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {name!r}; expected one of {', '.join(METRIC_NAMES)}")
    return str(Path(__file__).resolve().parent / name)


__all__ = ["METRIC_NAMES", "metric_path"]
