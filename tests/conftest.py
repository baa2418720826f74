"""Session-wide test settings: exported ONNX graphs are cached in a temporary folder, never in the user's cache."""

from __future__ import annotations

import os
import shutil
import tempfile


def pytest_configure(config):
    # Set before any test (and inherited by the subprocesses tests start), removed at the end of the session.
    folder = tempfile.mkdtemp(prefix="esp_medsam_onnx_cache_")
    config._esp_medsam_onnx_cache = folder
    os.environ["ESP_MEDSAM_ONNX_CACHE"] = folder


def pytest_unconfigure(config):
    folder = getattr(config, "_esp_medsam_onnx_cache", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
