"""Inference backends for the entry points users take (the pipelines, ``esp-medsam segment``, the Space).

- ``"onnxruntime"``: the model's inference graph exported once to ONNX (``export.export_onnx``: BatchNorm folded,
  SDPA) and run by onnxruntime's CPU provider, which fuses what eager PyTorch runs as separate kernels. The
  export is cached on disk, keyed by a hash of the configuration and the weights (``$ESP_MEDSAM_ONNX_CACHE``,
  default ``$HF_HOME/esp_medsam_hf/onnx``), and its sessions are kept per model object, so a model is exported
  once and loaded once per process. Each call checks a fingerprint of the weights (version
  counters, storage addresses, optimizer steps: :func:`_fingerprint`; 11 ms for the full-size model on a loaded
  2-core machine, where comparing every weight with a kept copy took 1.8 s) and hashes the weights again (0.6 s)
  only when it changed; changed weights are exported again. Outputs agree with the PyTorch forward within 1e-4
  (tests/test_backends.py).
  Each export is logged with its path and size. The cache is bounded: least recently used exports are removed
  once it holds more than ``$ESP_MEDSAM_ONNX_CACHE_MB`` megabytes (default 512; the export in use is always kept).
  ``clear_cache()`` (``esp-medsam cache clear``) removes every export; only files named like an export are touched.
- ``"eager"``: the PyTorch model itself.
- ``"auto"`` (default): onnxruntime for an fp32 model on the CPU when ``onnxruntime`` is installed
  (``pip install esp-medsam-hf[onnx]``), else eager.

The choice is overridden by an argument (``backend=``, ``--backend``) or by ``$ESP_MEDSAM_BACKEND``.
A modality of ``-1`` in :func:`run_inference` means "the modality classifier chooses"; one call serves given,
automatic and mixed batches.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import sys
import threading
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "eager")
BACKEND_ENV = "ESP_MEDSAM_BACKEND"
CACHE_ENV = "ESP_MEDSAM_ONNX_CACHE"
CACHE_SIZE_ENV = "ESP_MEDSAM_ONNX_CACHE_MB"
INT8_ENV = "ESP_MEDSAM_INT8"
"""``1``/``on``: onnxruntime runs an int8 copy of the export (``export.quantize_onnx``, cached beside it) for every
image; ``0``/``off``: the float32 export, bit for bit; unset: automatic, int8 where it holds
(:data:`INT8_MODALITIES`, on a CPU with VNNI: :func:`int8_holds_on_this_cpu`)."""
INT8_MODALITIES = ("microscopy", "fundus")
"""Modalities whose batches the onnxruntime path runs in int8 by default: where int8 was measured to hold on real
test images (Dice within 0.5 points of float32 and >= 99 % of the mask pixels the same: mnfinder's nuclei and the
DSB image; the vascx fundus photographs with :data:`INT8_FLOAT_AFTER_GELU`; docs/benchmark.md). The other
modalities have no real test set, so they stay float32."""
INT8_FLOAT_AFTER_GELU = ("fundus",)
"""Modalities whose int8 copy keeps the products that read a GELU's output float32 (``export.quantize_onnx``):
the vessels lost 2.5-3.9 Dice points to them and kept within 0.11 points and 99.85 % of the pixels without them.
So does the general graph's int8 copy, which any modality may reach (mixed batches, ``$ESP_MEDSAM_INT8=1``)."""
DEFAULT_CACHE_MB = 512.0
"""Bound of the export cache: about four full-size (1024 px) student exports of 110 MB."""
_EXPORT_GLOB = "esp_medsam_*.onnx"
AUTOMATIC_MODALITY = -1
_CACHE_FORMAT = 3  # bump when the exported graph changes so older cached files are not reused

_sessions: "weakref.WeakKeyDictionary[nn.Module, _CachedSession]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


@dataclass
class _CachedSession:
    """A model object's sessions (float32 and/or int8, general or of one modality) and what identifies the weights
    they were exported from."""

    fingerprint: tuple | None  # _fingerprint(model) when last checked
    digest: str  # weights_hash(model): the weights' content
    # (int8, one modality, intra-op threads) -> session
    sessions: dict[tuple[bool, int | None, int], Any] = field(default_factory=dict)


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


ONNX_CPU_BATCH = 4
"""Images (or tiles) per onnxruntime call on a CPU: a call shares its images between the threads (``_run_split``),
so it needs at least as many images as threads, and a few more keep the threads busy while the caller prepares
the next batch (on 2 cores, 16 int8 tiles took 0.30 s in calls of 4 or of 2 split image by image,
docs/benchmark.md)."""


def inference_batch_size(device: torch.device | str, accelerator_batch: int = 8, backend: str | None = None) -> int:
    """How many images an inference forward takes on ``device``: on a CPU ``ONNX_CPU_BATCH`` for
    ``backend="onnxruntime"`` and ``CPU_INFERENCE_BATCH`` otherwise, else ``accelerator_batch``."""
    if torch.device(device).type != "cpu":
        return accelerator_batch
    return ONNX_CPU_BATCH if backend == "onnxruntime" else CPU_INFERENCE_BATCH


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


def cache_limit_bytes() -> int:
    """The cache's bound in bytes: ``$ESP_MEDSAM_ONNX_CACHE_MB`` megabytes (default 512)."""
    value = os.environ.get(CACHE_SIZE_ENV)
    if not value:
        return int(DEFAULT_CACHE_MB * 1e6)
    try:
        megabytes = float(value)
    except ValueError:
        raise ValueError(f"${CACHE_SIZE_ENV} must be a number of megabytes, got {value!r}") from None
    if megabytes < 0:
        raise ValueError(f"${CACHE_SIZE_ENV} must not be negative, got {value!r}")
    return int(megabytes * 1e6)


def cached_exports(folder: Path | None = None) -> list[Path]:
    """The exports in the cache, least recently used first (use refreshes a file's modification time)."""
    folder = cache_dir() if folder is None else folder
    files = [path for path in folder.glob(_EXPORT_GLOB) if path.is_file()]
    return sorted(files, key=lambda path: path.stat().st_mtime)


def _evict(keep: Path) -> None:
    """Remove least recently used exports until the cache fits its bound; ``keep`` (in use) always stays."""
    limit = cache_limit_bytes()
    exports = cached_exports(keep.parent)
    total = sum(path.stat().st_size for path in exports)
    for path in exports:
        if total <= limit:
            break
        if path == keep:
            continue
        size = path.stat().st_size
        path.unlink(missing_ok=True)
        total -= size
        logger.info("removed the least recently used ONNX export %s (%.1f MB) to keep the cache under %.0f MB "
                    "($%s)", path, size / 1e6, limit / 1e6, CACHE_SIZE_ENV)


def clear_cache(folder: Path | None = None) -> tuple[int, int]:
    """Remove every cached export (only files named like one) and forget this process's sessions; returns the
    number of files and bytes removed."""
    count = size = 0
    with _lock:
        _sessions.clear()
        for path in cached_exports(folder):
            size += path.stat().st_size
            path.unlink(missing_ok=True)
            count += 1
    logger.info("removed %d cached ONNX export(s), %.1f MB, from %s", count, size / 1e6, folder or cache_dir())
    return count, size


def _state_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return sorted(model.state_dict(keep_vars=True).items())


_optimizer_steps = 0
"""Optimizer steps taken in this process (any optimizer): part of every fingerprint, because fused optimizers (fused
Adam) update weights without bumping PyTorch's version counters."""


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


_optimizer_hook = register_optimizer_step_post_hook(_count_optimizer_step)


def _fingerprint(model: nn.Module) -> tuple | None:
    """What tells, without reading the weights, that they may have changed: each parameter's and buffer's name,
    storage address, version counter (PyTorch bumps it on every in-place change: ``load_state_dict``, an edit under
    ``torch.no_grad()``, foreach optimizers), shape and dtype, and the process's optimizer-step count (fused
    optimizers leave the counters alone). About 10 us per tensor, against reading ~114 MB of weights.
    ``None`` when a tensor keeps no version counter (made under ``torch.inference_mode``): the caller then hashes
    the weights. Edits through ``tensor.data`` bypass the counters and are not seen (PyTorch's own rule for
    ``.data``); ``clear_cache()`` forgets the sessions."""
    entries = [_optimizer_steps]
    for name, tensor in chain(model.named_parameters(), model.named_buffers()):
        if tensor.is_inference():
            return None
        entries.append((name, tensor.data_ptr(), tensor._version, tuple(tensor.shape), tensor.dtype))
    return tuple(entries)


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


def resolve_int8(int8: bool | None = None, modalities: Sequence[str] | None = None) -> bool:
    """Whether onnxruntime runs the int8 copy: ``int8`` if given, else ``$ESP_MEDSAM_INT8``, else automatic: int8
    when every image's modality (``modalities``, names; ``None`` when some are not known yet) is one of
    :data:`INT8_MODALITIES` and the CPU has VNNI (:func:`int8_holds_on_this_cpu`)."""
    if int8 is not None:
        return bool(int8)
    value = os.environ.get(INT8_ENV, "").strip().lower()
    if value in ("0", "off", "false", "no"):
        return False
    if value in ("1", "on", "true", "yes"):
        return True
    if value:
        raise ValueError(f"${INT8_ENV} must be 1/on or 0/off (or unset: automatic), got {value!r}")
    return bool(modalities) and all(name in INT8_MODALITIES for name in modalities) and int8_holds_on_this_cpu()


def int8_holds_on_this_cpu() -> bool:
    """Whether this CPU has VNNI (torch's cpuinfo query; AMX machines have it too), which the automatic int8 choice
    needs: without it onnxruntime's u8 x s8 integer products run on AVX2's 16-bit pair sums, which saturate
    (onnxruntime's quantization guide says so). Measured with the same release: on an AVX2-only AMD EPYC the
    vessels lost 1.5 Dice points to int8 (66.94 against 68.44 % float32) where a VNNI machine lost 0.06, and a tiny
    model's int8 logits strayed 36 % of their range from float32 against 6 %. There float32 runs unless int8 is
    asked for (``int8=True``, ``$ESP_MEDSAM_INT8=1``)."""
    check = getattr(torch.cpu, "_is_vnni_supported", None)  # private in torch 2.14: absent, int8 is not assumed
    return bool(check is not None and check())


def onnx_session(model: nn.Module, num_threads: int | None = None, int8: bool | None = None,
                 modality: int | None = None):
    """The onnxruntime session of ``model``'s exported graph (its int8 copy when ``int8``, else as
    :func:`resolve_int8` says for unknown modalities; with ``modality``, the graph of that modality alone,
    ``export.EspMedSamModalityGraph``): from this
    process's cache, else from the disk cache, else exported now (once; logged). Re-exported when the model's
    weights changed since: a cheap :func:`_fingerprint` is checked on every call, and the weights are hashed
    (:func:`weights_hash`) only when it differs."""
    from .export import onnxruntime_session

    int8 = resolve_int8(int8)
    threads = num_threads or torch.get_num_threads()
    with _lock:
        fingerprint = _fingerprint(model)
        cached = _sessions.get(model)
        if cached is None or fingerprint is None or fingerprint != cached.fingerprint:
            digest = weights_hash(model)
            if cached is None or digest != cached.digest:
                cached = _sessions[model] = _CachedSession(fingerprint, digest)
            cached.fingerprint = fingerprint
        session = cached.sessions.get((int8, modality, threads))
        if session is None:
            path = _cached_export(model, int8, cached.digest, modality)
            os.utime(path)  # most recently used
            _evict(keep=path)
            session = onnxruntime_session(path, threads)
            cached.sessions[(int8, modality, threads)] = session
        return session


def _cached_export(model: nn.Module, int8: bool, digest: str, modality: int | None = None) -> Path:
    """The cached export of ``model`` (``esp_medsam_<hash>.onnx``; ``esp_medsam_<hash>.m<modality>.onnx`` for one
    modality's graph), exported now if missing; with ``int8`` its int8 copy (``.int8.onnx``, in the same bounded
    cache; GELU-fed products float32 in the general graph and for :data:`INT8_FLOAT_AFTER_GELU`), quantised now if
    missing. ``digest``: the model's :func:`weights_hash`."""
    from .export import export_onnx, quantize_onnx

    path = cache_dir() / f"esp_medsam_{digest}{'' if modality is None else f'.m{modality}'}.onnx"
    if int8:
        quantized = path.with_suffix(".int8.onnx")
        if not quantized.is_file():
            try:
                strict = modality is None or model.config.modality_names[modality] in INT8_FLOAT_AFTER_GELU
                quantize_onnx(_cached_export(model, False, digest, modality), quantized,
                              infer_shapes=modality is not None, float_after_gelu=strict)
            except FileExistsError:  # another process quantised the same weights meanwhile
                pass
        return quantized
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        logger.info("exporting the model to ONNX once for onnxruntime: %s", path)
        try:
            export_onnx(model, path, modality=modality)
            logger.info("exported %s (%.1f MB; `esp-medsam cache clear` empties the cache)", path,
                        path.stat().st_size / 1e6)
        except FileExistsError:  # another process exported the same weights meanwhile
            pass
    return path


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


def _run_split(model: nn.Module, pixels: np.ndarray, modality: np.ndarray, int8: bool,
               single: int | None) -> list[np.ndarray]:
    """The onnxruntime outputs of a batch (``single``: the one-modality graph's index, else the general graph).

    A batch of one runs on a session with all of torch's threads. A larger one is shared between
    ``workers = min(threads, batch)`` Python threads, each running its images one at a time on a session with
    ``threads // workers`` intra-op threads (onnxruntime releases the GIL and a session may run from several
    threads at once). The graph is a long chain of small operators (window slicing, transposes, softmaxes of 49
    tokens) that one core runs about as fast as two, so images side by side use the cores better than one image's
    operators split across them: on 2 cores, 16 tiles of 256 px in 4 calls of 4 took 0.30 s split against 0.37 s
    as one 2-thread call each (int8; float32 0.50 against 0.57 s; docs/benchmark.md). One image per run also makes
    an image's int8 output independent of the other images of its batch (the activations' int8 scale is taken
    over the whole input of a run)."""
    threads = torch.get_num_threads()
    workers = min(threads, len(pixels))

    def run(session, start: int, stop: int) -> list[np.ndarray]:
        feed = {"pixel_values": pixels[start:stop]}
        if single is None:
            feed["modality"] = modality[start:stop]
        return session.run(None, feed)

    if workers < 2:
        return run(onnx_session(model, num_threads=threads, int8=int8, modality=single), 0, len(pixels))
    session = onnx_session(model, num_threads=threads // workers, int8=int8, modality=single)
    parts = _executor(workers).map(lambda index: run(session, index, index + 1), range(len(pixels)))
    return [np.concatenate(arrays) for arrays in zip(*parts)]


@functools.cache
def _executor(workers: int) -> ThreadPoolExecutor:
    """A pool of ``workers`` threads for :func:`_run_split`, made once per size and kept for the process."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="esp-medsam-onnx")


# a forked child (a data loader's worker) has none of its parent's threads: it makes its own pools
os.register_at_fork(after_in_child=_executor.cache_clear)


@torch.no_grad()
def run_inference(
    model: nn.Module, pixel_values: torch.Tensor, modality: torch.Tensor | None = None, backend: str | None = None,
    target: int | None = None, int8: bool | None = None, one_modality_graph: bool = False,
) -> InferenceOutput:
    """One inference forward of ``model`` (eval mode) on ``pixel_values`` with ``modality`` per image (``-1`` or
    ``None``: the classifier chooses), through the backend :func:`resolve_backend` picks. A ``target`` index (a
    model's extra target) decodes that target for every image, with the PyTorch model. ``int8``: onnxruntime runs
    the int8 copy (``None``: :func:`resolve_int8` for the batch's given modalities); the eager backend ignores it.
    ``one_modality_graph``: a float32 batch of one given modality runs on that modality's own graph (exported
    once more, for callers that send it many batches: tiled inference; alone it gains 3-8 %). An int8 one always
    does: the bag's products are int8 there too (batch 1, 1024 px: 0.32x the official release's latency against
    0.45x on the general graph, docs/benchmark.md)."""
    batch = pixel_values.shape[0]
    if target is not None:
        outputs = model(pixel_values=pixel_values, target=torch.full((batch,), target, device=pixel_values.device))
        return InferenceOutput(outputs.pred_masks, outputs.patch_logits, outputs.modality_logits, outputs.modality)
    modality = check_modality(model, AUTOMATIC_MODALITY if modality is None else modality, batch)
    if resolve_backend(model, backend) == "onnxruntime":
        names = None if bool((modality < 0).any()) else [model.config.modality_names[i] for i in modality.tolist()]
        int8 = resolve_int8(int8, names)
        uniform = bool(names) and bool((modality == modality[0]).all())
        single = modality[0].item() if uniform and (one_modality_graph or int8) else None
        pixels = pixel_values.detach().float().cpu().numpy()
        outputs = _run_split(model, pixels, modality.numpy(), int8, single)
        masks, patches, logits, chosen = (torch.from_numpy(a) for a in outputs)
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


class EspMedSamWithBackend(nn.Module):
    """``model`` whose own inference calls run through :func:`run_inference` on ``backend``, for code that calls the
    model directly, such as transformers' stock "image-segmentation" pipeline (``pipe.model = use_backend(pipe.model)``).

    Only calls that :func:`run_inference` answers exactly go there: eval mode, no gradient, no ``labels``, and a
    model the backend can run; the others run the model's PyTorch forward, so training is unaffected. Every other
    attribute (``config``, ``dtype``, ``device``, ...) is the wrapped model's.
    """

    def __init__(self, model: nn.Module, backend: str | None = None):
        super().__init__()
        self.model = model
        self.backend = backend
        self.train(model.training)  # the mode of the model it wraps (a new module starts in training mode)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)

    def forward(self, pixel_values: torch.Tensor, modality=None, labels=None, **kwargs):
        model = self.model
        if labels is not None or model.training or torch.is_grad_enabled() or (
            resolve_backend(model, self.backend) != "onnxruntime"
        ):
            return model(pixel_values, modality=modality, labels=labels, **kwargs)
        outputs = run_inference(model, pixel_values, modality, backend="onnxruntime")
        output_class = sys.modules[type(model).__module__].EspMedSamOutput  # the model's own (remote code included)
        return output_class(**vars(outputs))


def use_backend(model: nn.Module, backend: str | None = None) -> nn.Module:
    """``model`` wrapped in :class:`EspMedSamWithBackend` (``backend``: as in :func:`resolve_backend`); with
    ``backend="eager"``, the plain model (unwrapped if it was wrapped). The model itself is not modified."""
    plain = model.model if isinstance(model, EspMedSamWithBackend) else model
    if (backend or "").lower() == "eager":
        return plain
    resolve_backend(plain, backend)  # fail now on an unknown name or a backend that is not installed
    return EspMedSamWithBackend(plain, backend)


__all__ = [
    "AUTOMATIC_MODALITY", "BACKENDS", "BACKEND_ENV", "CACHE_ENV", "CACHE_SIZE_ENV", "CPU_INFERENCE_BATCH",
    "EspMedSamWithBackend", "INT8_ENV", "INT8_FLOAT_AFTER_GELU", "INT8_MODALITIES", "InferenceOutput",
    "ONNX_CPU_BATCH", "cache_dir", "cache_limit_bytes", "cached_exports", "check_modality", "clear_cache",
    "inference_batch_size", "int8_holds_on_this_cpu", "onnx_session", "onnxruntime_available", "resolve_backend",
    "resolve_int8", "run_inference", "use_backend", "weights_hash"
]
