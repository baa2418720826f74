"""Session-wide test settings: exported ONNX graphs and gradio's files are kept in temporary folders, never in the
user's cache or /tmp, and the onnxruntime path runs the float32 export unless a test asks for int8."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch


def pytest_configure(config):
    # The test session is an entry point: the Auto classes, the pipeline task and the DICOM reader, declared once
    # (tests/test_registration.py checks, in fresh processes, that importing the package declares nothing).
    import esp_medsam_hf

    esp_medsam_hf.register()
    # Set before any test (and inherited by the subprocesses tests start), removed at the end of the session.
    folder = tempfile.mkdtemp(prefix="esp_medsam_onnx_cache_")
    os.environ["ESP_MEDSAM_ONNX_CACHE"] = folder
    # gradio caches the Space's examples and uploads in GRADIO_TEMP_DIR (default /tmp/gradio), kept after the app.
    gradio = tempfile.mkdtemp(prefix="esp_medsam_gradio_")
    os.environ["GRADIO_TEMP_DIR"] = gradio
    config._esp_medsam_temporary = (folder, gradio)
    # The onnxruntime path runs microscopy batches in int8 by default; the suite compares that path with PyTorch at
    # float32 tolerances, so it runs the float32 export. tests/test_int8.py and tests/test_benchmark.py unset this
    # to test the int8 default itself.
    os.environ.setdefault("ESP_MEDSAM_INT8", "0")


def pytest_unconfigure(config):
    for folder in getattr(config, "_esp_medsam_temporary", ()):
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are dominated by per-operator overhead: one torch thread is as fast and immune to a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    """Two synthetic source domains at 64 px, 3 training and 1 validation image each."""
    from esp_medsam_hf.data.synthetic import synthetic_domains

    return synthetic_domains(["isic", "dsb"], {"train": 3, "validation": 1}, seed=0, size=64)


# Stand-ins for modules transformers' common tests import (tests/_transformers_common.py); not tests themselves.
collect_ignore = ["transformers_standins"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A local Hub (olah behind our server) that takes fault injections, online whatever the session says; one per
    test module."""
    from huggingface_hub import constants

    from esp_medsam_hf.testing.localhub import LocalHub

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_OFFLINE", False)
        with LocalHub(tmp_path_factory.mktemp("localhub"), allow_faults=True) as local_hub:
            yield local_hub
