"""Inference backends for the entry points users take (the pipelines, ``esp-medsam segment``, the Space).

- ``"onnxruntime"``: the model's inference graph exported once to ONNX (``export.export_onnx``: BatchNorm folded,
  SDPA) and run by onnxruntime's CPU provider, which fuses what eager PyTorch runs as separate kernels. The
  export is cached on disk, keyed by a hash of the configuration and the weights (``$ESP_MEDSAM_ONNX_CACHE``,
  default ``$HF_HOME/esp_medsam_hf/onnx``), and its session is kept per model object, so a model is exported once
  and loaded once per process. Outputs agree with the PyTorch forward within 1e-4 (tests/test_backends.py).
- ``"eager"``: the PyTorch model itself.
- ``"auto"`` (default): onnxruntime for an fp32 model on the CPU when ``onnxruntime`` is installed
  (``pip install esp-medsam-hf[onnx]``), else eager.

The choice is overridden by an argument (``backend=``, ``--backend``) or by ``$ESP_MEDSAM_BACKEND``.
A modality of ``-1`` in :func:`run_inference` means "the modality classifier chooses"; one call serves given,
automatic and mixed batches.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import sys
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "eager")
BACKEND_ENV = "ESP_MEDSAM_BACKEND"
CACHE_ENV = "ESP_MEDSAM_ONNX_CACHE"
AUTOMATIC_MODALITY = -1
_CACHE_FORMAT = 1  # bump when the exported graph changes so older cached files are not reused

_sessions: "weakref.WeakKeyDictionary[nn.Module, _CachedSession]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


@dataclass
class _CachedSession:
    fingerprint: tuple
    path: Path
    session: Any


@dataclass
class InferenceOutput:
    """What the entry points need from one forward: mask logits, classifier logits, modality used (all tensors)."""

    pred_masks: torch.Tensor  # (B, 1, 4g, 4g)
    patch_logits: torch.Tensor  # (B, 1, p, p)
    modality_logits: torch.Tensor  # (B, M)
    modality: torch.LongTensor  # (B,)


def onnxruntime_available() -> bool:
    """Whether onnxruntime and the ONNX exporter's dependency (``onnx``) are installed."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


CPU_INFERENCE_BATCH = 2
"""Images per inference forward on a CPU. The full-resolution MBConv stem's activations (over 60 MB per image at
256 px) make larger batches memory-bound: measured on 2 cores, 1.7 s per image through the encoder at 2, 2.1 s at 4."""


def inference_batch_size(device: torch.device | str, accelerator_batch: int = 8) -> int:
    """How many images an inference forward takes on ``device``: ``CPU_INFERENCE_BATCH`` on a CPU, else
    ``accelerator_batch``."""
    return CPU_INFERENCE_BATCH if torch.device(device).type == "cpu" else accelerator_batch


def _model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    parameter = next(model.parameters())
    return parameter.dtype, parameter.device


def resolve_backend(model: nn.Module, backend: str | None = None) -> str:
    """``"onnxruntime"`` or ``"eager"`` for ``model``: ``backend`` if given, else ``$ESP_MEDSAM_BACKEND``, else auto.

    Raises ``ValueError`` for an unknown name or for onnxruntime asked for a model it cannot run (not fp32 on the
    CPU), and ``ImportError`` when onnxruntime is asked for but not installed.
    """
    requested = (backend or os.environ.get(BACKEND_ENV) or "auto").lower()
    source = f"${BACKEND_ENV}" if not backend and os.environ.get(BACKEND_ENV) else "backend"
    if requested not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}, got {requested!r}")
    if requested == "eager":
        return "eager"
    dtype, device = _model_dtype_device(model)
    runnable = dtype == torch.float32 and device.type == "cpu"
    if requested == "onnxruntime":
        if not onnxruntime_available():
            raise ImportError(
                f"{source}='onnxruntime' needs the onnxruntime and onnx packages: pip install 'esp-medsam-hf[onnx]'"
            )
        if not runnable:
            raise ValueError(
                f"{source}='onnxruntime' runs fp32 models on the CPU; this model is {dtype} on {device} "
                "(use backend='eager' or 'auto')"
            )
        return "onnxruntime"
    return "onnxruntime" if runnable and onnxruntime_available() else "eager"


def cache_dir() -> Path:
    """Where exported graphs are kept: ``$ESP_MEDSAM_ONNX_CACHE``, else ``$HF_HOME/esp_medsam_hf/onnx``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "esp_medsam_hf" / "onnx"


def _state_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return sorted(model.state_dict(keep_vars=True).items())


def _fingerprint(model: nn.Module) -> tuple:
    """Cheap identity of the weights in memory: an in-place update (optimizer step, ``load_state_dict``) changes a
    tensor's version counter, a replaced or moved tensor its storage."""
    return tuple((name, t.data_ptr(), t._version, t.dtype) for name, t in _state_tensors(model))


def weights_hash(model: nn.Module) -> str:
    """SHA-256 of the configuration, the weights and the library versions: the name of the cached export."""
    digest = hashlib.sha256()
    config = model.config.to_dict()
    config.pop("_name_or_path", None)
    header = {"config": config, "torch": torch.__version__, "format": _CACHE_FORMAT, "class": type(model).__name__}
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in _state_tensors(model):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:32]


def onnx_session(model: nn.Module, num_threads: int | None = None):
    """The onnxruntime session of ``model``'s exported graph: from this process's cache, else from the disk cache,
    else exported now (once; logged). Re-exported when the model's weights changed since."""
    from .export import export_onnx, onnxruntime_session

    fingerprint = _fingerprint(model)
    with _lock:
        cached = _sessions.get(model)
        if cached is not None and cached.fingerprint == fingerprint:
            return cached.session
        path = cache_dir() / f"esp_medsam_{weights_hash(model)}.onnx"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            logger.info("exporting the model to ONNX once for onnxruntime: %s", path)
            try:
                export_onnx(model, path)
            except FileExistsError:  # another process exported the same weights meanwhile
                pass
        session = onnxruntime_session(path, num_threads or torch.get_num_threads())
        _sessions[model] = _CachedSession(fingerprint, path, session)
        return session


def check_modality(model: nn.Module, modality: torch.Tensor, batch: int) -> torch.LongTensor:
    """(B,) int64 modality indices on the CPU, ``-1`` allowed for automatic; a clear error otherwise."""
    modality = torch.as_tensor(modality)
    if modality.dim() == 0:
        modality = modality.expand(batch)
    if modality.shape != (batch,) or modality.dtype.is_floating_point:
        raise ValueError(f"modality must be an integer tensor of shape ({batch},), got {tuple(modality.shape)}")
    count = model.config.num_modalities
    if bool(((modality < AUTOMATIC_MODALITY) | (modality >= count)).any()):
        bad = int(modality[(modality < AUTOMATIC_MODALITY) | (modality >= count)][0])
        raise ValueError(f"modality index {bad} is out of range; expected 0..{count - 1}, or -1 for automatic")
    return modality.long()


@torch.no_grad()
def run_inference(
    model: nn.Module, pixel_values: torch.Tensor, modality: torch.Tensor | None = None, backend: str | None = None,
    target: int | None = None,
) -> InferenceOutput:
    """One inference forward of ``model`` (eval mode) on ``pixel_values`` with ``modality`` per image (``-1`` or
    ``None``: the classifier chooses), through the backend :func:`resolve_backend` picks. A ``target`` index (a
    model's extra target) decodes that target for every image, with the PyTorch model."""
    batch = pixel_values.shape[0]
    if target is not None:
        outputs = model(pixel_values=pixel_values, target=torch.full((batch,), target, device=pixel_values.device))
        return InferenceOutput(outputs.pred_masks, outputs.patch_logits, outputs.modality_logits, outputs.modality)
    modality = check_modality(model, AUTOMATIC_MODALITY if modality is None else modality, batch)
    if resolve_backend(model, backend) == "onnxruntime":
        session = onnx_session(model)
        feed = {"pixel_values": pixel_values.detach().float().cpu().numpy(), "modality": modality.numpy()}
        masks, patches, logits, chosen = (torch.from_numpy(a) for a in session.run(None, feed))
        return InferenceOutput(masks, patches, logits, chosen.long())
    modality = modality.to(pixel_values.device)
    automatic = modality == AUTOMATIC_MODALITY
    if bool(automatic.all()):
        outputs = model(pixel_values=pixel_values)
    else:
        if bool(automatic.any()):
            # Given and automatic modalities mixed: the classifier fills the gaps first, so the whole batch still
            # runs through the model in one call.
            modality = torch.where(automatic, model.predict_modality(pixel_values).argmax(-1), modality)
        outputs = model(pixel_values=pixel_values, modality=modality)
    return InferenceOutput(outputs.pred_masks, outputs.patch_logits, outputs.modality_logits, outputs.modality)


def use_backend(model: nn.Module, backend: str | None = None) -> nn.Module:
    """Route ``model(...)``'s own inference calls through :func:`run_inference`, for code that calls the model
    directly, such as transformers' stock "image-segmentation" pipeline. Returns ``model``.

    Only calls that :func:`run_inference` answers exactly go there: eval mode, no gradient, no ``labels``, and a
    model the backend can run (else the PyTorch forward runs, so training is unaffected). ``backend="eager"``
    restores the plain forward.
    """
    model.__dict__.pop("forward", None)
    if (backend or "").lower() == "eager":
        return model
    resolve_backend(model, backend)  # fail now on an unknown name or a backend that is not installed
    plain_forward = model.forward
    output_class = sys.modules[type(model).__module__].EspMedSamOutput  # the model's own (remote code included)

    def forward(pixel_values: torch.Tensor, modality=None, labels=None, **kwargs):
        if labels is not None or model.training or torch.is_grad_enabled() or (
            resolve_backend(model, backend) != "onnxruntime"
        ):
            return plain_forward(pixel_values, modality=modality, labels=labels, **kwargs)
        outputs = run_inference(model, pixel_values, modality, backend="onnxruntime")
        return output_class(**vars(outputs))

    model.forward = forward
    return model


__all__ = [
    "AUTOMATIC_MODALITY",
    "BACKENDS",
    "BACKEND_ENV",
    "CACHE_ENV",
    "CPU_INFERENCE_BATCH",
    "InferenceOutput",
    "cache_dir",
    "check_modality",
    "inference_batch_size",
    "onnx_session",
    "onnxruntime_available",
    "resolve_backend",
    "run_inference",
    "use_backend",
    "weights_hash",
]
