"""Sub-commands of the ``esp-medsam`` command line (see ``esp_medsam_hf.cli``)."""

from __future__ import annotations

import argparse


def error_message(error: BaseException) -> str:
    """One line for a user's mistake: an ``OSError`` as ``FILE: reason`` (not its errno, "error: 20"), a
    ``KeyError`` as its text, anything else as ``str(error)``."""
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename is not None else ""
        return f"{where}{error.strerror}"
    if isinstance(error, KeyError) and error.args:
        return str(error.args[0])
    return str(error)


def add_backend_argument(parser: argparse.ArgumentParser) -> None:
    """``--backend``, as ``segment`` and ``evaluate`` take it (``backends.resolve_backend`` reads it)."""
    parser.add_argument(
        "--backend",
        choices=("auto", "onnxruntime", "eager"),
        help="inference backend (default: $ESP_MEDSAM_BACKEND, else auto: onnxruntime for fp32 on the CPU when "
        "installed, exported once and cached, int8 where it holds; else the PyTorch model)",
    )
