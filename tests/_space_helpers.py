"""Helpers for the Space tests: the app module, a tiny saved model, and the app running in a subprocess."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

SPACE_DIR = Path(__file__).resolve().parents[1] / "spaces" / "esp-medsam"
APP_PATH = SPACE_DIR / "app.py"
ARTIFACTS_DIR = Path(__file__).resolve().parents[1] / "outputs" / "test-artifacts"

# No telemetry, no version check, no share link, loopback never through a proxy.
OFFLINE_ENV = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GRADIO_SHARE": "False",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}


def import_app():
    """The Space's ``app.py`` as a module (its launch is guarded by ``__main__``, so importing starts nothing)."""
    name = "esp_medsam_space_app"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, APP_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def save_tiny_model(folder: Path, image_size: int = 64, seed: int = 0) -> Path:
    """A randomly initialised tiny ESP-MedSAM with its processor, saved as a Space would load it."""
    import torch

    from esp_medsam_hf import EspMedSamConfig, EspMedSamImageProcessor, EspMedSamModel, EspMedSamProcessor

    torch.manual_seed(seed)
    model = EspMedSamModel(EspMedSamConfig.tiny(image_size=image_size)).eval()
    image_processor = EspMedSamImageProcessor(size={"height": image_size, "width": image_size})
    processor = EspMedSamProcessor(image_processor, modality_names=model.config.modality_names)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_app(env: dict[str, str], log_path: Path, timeout_s: float = 180.0) -> Iterator[str]:
    """Run ``python app.py`` on a free loopback port; yields its URL once ``GET /`` answers 200."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    temporary = log_path.parent / "app-tmp"  # the app's and gradio's temporary files die with the test's folder
    temporary.mkdir(exist_ok=True)
    full_env = {
        **os.environ, **OFFLINE_ENV, **env, "TMPDIR": str(temporary),
        "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
    }
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, str(APP_PATH)], cwd=SPACE_DIR, env=full_env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + timeout_s
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the app exited with code {process.returncode}:\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the app did not answer on {url} in {timeout_s} s:\n{log_path.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                with opener.open(url + "/", timeout=2) as response:
                    if response.status == 200:
                        break
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
