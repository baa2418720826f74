"""ONNX export of the ESP-MedSAM inference graph and an onnxruntime session to run it.

The exported graph takes ``pixel_values`` (B, 3, S, S) float32 and ``modality`` (B,) int64 (``-1``: the modality
classifier chooses that image's modality) and returns ``pred_masks`` (B, 1, S/4, S/4) logits, ``patch_logits``,
``modality_logits`` and ``decoded_modality`` (the index each image was decoded with); the batch size is dynamic.
BatchNorm is folded into the convolutions before export and attention uses SDPA with its mask.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .fileio import atomic_file
from .modeling_esp_medsam import EspMedSamModel

logger = logging.getLogger(__name__)

OUTPUT_NAMES = ("pred_masks", "patch_logits", "modality_logits", "decoded_modality")


class EspMedSamInferenceGraph(nn.Module):
    """The model's inference forward with tensor outputs only (what ONNX needs): no labels, no loss, and a
    modality of ``-1`` for the images whose modality the classifier chooses (so one graph serves given, automatic
    and mixed batches). Inputs are not validated here: the caller checks the modality range."""

    def __init__(self, model: EspMedSamModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, modality: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.decode(pixel_values, modality)

    def decode(self, pixel_values: torch.Tensor, modality: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model = self.model
        image_embeddings, modality_logits, chosen = model.encode(pixel_values, modality)
        patch_logits, dense_prompt = model.prompt_generator(image_embeddings)
        pred_masks = model.mask_decoder(image_embeddings, dense_prompt, chosen)
        return pred_masks, patch_logits, modality_logits, chosen


class EspMedSamModalityGraph(EspMedSamInferenceGraph):
    """The inference forward of one modality: only ``pixel_values`` in, every image decoded with ``modality``'s
    parameter bag and query (the classifier's logits still come out). Its bag's weights are constants of the graph
    (the shared path, ``ModalityController.fixed_modality``), so int8 covers them and no per-image gather or copy
    is left: the graph tiled inference runs, whose tiles all share one modality."""

    def __init__(self, model: EspMedSamModel, modality: int):
        super().__init__(model)
        self.modality = int(modality)
        model.modality_controller.fixed_modality = self.modality

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        modality = torch.full((pixel_values.shape[0],), self.modality, dtype=torch.long, device=pixel_values.device)
        return self.decode(pixel_values, modality)


def export_onnx(
    model: EspMedSamModel,
    path: str | os.PathLike,
    batch_size: int = 2,
    opset_version: int = 18,
    overwrite: bool = False,
    modality: int | None = None,
) -> Path:
    """Export ``model`` (a copy is put in eval mode with BatchNorm fused) to an ONNX file at ``path``; with
    ``modality`` (an index), the graph of that modality alone (:class:`EspMedSamModalityGraph`: no ``modality``
    input).

    Uses the TorchScript exporter (``dynamo=False``): it exports SDPA with a float attention mask as plain
    MatMul/Softmax nodes and gives a single self-contained file. The batch axis is dynamic; ``batch_size`` is only
    the size traced (>= 2 so the per-image gathers are traced in their general form). The file is written to a
    temporary name first and moved into place.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 for a graph with a dynamic batch axis, got {batch_size}")
    export_model = copy.deepcopy(model).float().eval()
    if export_model.config._attn_implementation == "eager":
        export_model.set_attn_implementation("sdpa")
    export_model.fuse_batchnorm()
    config = model.config
    size, channels = config.image_size, config.aggregator_config.num_channels
    pixel_values = torch.randn(batch_size, channels, size, size)
    if modality is None:
        graph = EspMedSamInferenceGraph(export_model).eval()
        modalities = torch.arange(batch_size, dtype=torch.long) % config.num_modalities
        modalities[0] = -1  # traced with one automatic image, so both branches of the modality choice are in the graph
        inputs, input_names = (pixel_values, modalities), ["pixel_values", "modality"]
    else:
        graph = EspMedSamModalityGraph(export_model, config.modality_index(modality)).eval()
        inputs, input_names = (pixel_values,), ["pixel_values"]
    dynamic_axes = {name: {0: "batch"} for name in (*input_names, *OUTPUT_NAMES)}
    with atomic_file(path) as temporary, torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about every Python-level shape decision; the traced graph is checked against the
        # PyTorch forward in tests/test_export.py and tests/test_backends.py.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is chosen on purpose
        torch.onnx.export(
            graph,
            inputs,
            str(temporary),
            input_names=input_names,
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=dynamic_axes,
            opset_version=opset_version,
            dynamo=False,
        )
    logger.info("exported ONNX graph to %s (%.1f MB)", path, path.stat().st_size / 2**20)
    return path


INT8_OP_TYPES = ("MatMul", "Gemm")
"""The nodes :func:`quantize_onnx` makes int8: the attention and MLP products of the TinyViT stages and the
decoder. Convolutions stay float32: onnxruntime's dynamic ``ConvInteger`` has no fused kernel on its CPU provider.

Why dynamic and not static QDQ (int8 convolutions too, activations calibrated on real images of each modality):
measured, static QDQ was slower. On the official configuration at 256 px, 4 tiles per call, 2 shared cores
(``scripts/int8_static_trial.py`` and interleaved rounds, docs/benchmark.md), the QDQ graph took 0.23-0.26 s of
process CPU time per tile against 0.14-0.18 s for this dynamic copy (spinning threads), and, calibrated on real
training images of mnfinder, DSB and vascx with the sessions as shipped, 0.136 s against 0.097 s, keeping fewer
mask pixels of the float32 graph. Not profiled further; the likely cause: the float32 operators between the
quantised ones (LayerNorm, GELU, Softmax, the residual adds) each need a DequantizeLinear/QuantizeLinear pair,
which cost more than the int8 convolutions save at this size. It also needs calibration images at export time,
which the shipped code (exporting on the user's machine) does not have."""


def gelu_fed_products(path: str | os.PathLike) -> list[str]:
    """The names of the ``MatMul`` nodes with a constant weight in the graph at ``path`` whose activation is an exact
    GELU's output (an ``Erf`` at most three producers above it: ``x * 0.5 * (1 + erf(x / sqrt 2))`` as exported):
    the second products of the TinyViT MLPs, which :func:`quantize_onnx` can keep float32. (The modality
    classifier's second layer is a ``Gemm``, which the quantiser rewrites under another name before it reads its
    exclusions; it stays int8, as in the measurements.)"""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {output: node for node in graph.node for output in node.output}
    constants = {tensor.name for tensor in graph.initializer}

    def after_erf(name: str, depth: int = 3) -> bool:
        node = producer.get(name)
        if node is None:
            return False
        return node.op_type == "Erf" or (depth > 0 and any(after_erf(item, depth - 1) for item in node.input))

    return [node.name for node in graph.node
            if node.op_type == "MatMul" and any(item in constants for item in node.input)
            and any(after_erf(item) for item in node.input if item not in constants)]


def quantize_onnx(source: str | os.PathLike, target: str | os.PathLike, overwrite: bool = False,
                  infer_shapes: bool = False, float_after_gelu: bool = False) -> Path:
    """An int8 copy of the exported graph ``source`` at ``target`` for onnxruntime's CPU provider: the weights of
    the :data:`INT8_OP_TYPES` nodes stored in int8 per output channel, their activations quantised per call
    (``onnxruntime.quantization.quantize_dynamic``), so no calibration images are needed and the shipped code stays
    self-contained. Written to a temporary name first and moved into place.

    ``infer_shapes``: run onnxruntime's pre-processing (shape inference) first. A one-modality graph needs it: its
    bag's MLP is folded into the block's MLP, whose products the quantiser otherwise gives scales of the wrong
    shape (the session then fails to load); the general graph is quantised as it always was.

    ``float_after_gelu``: the products that read a GELU's output (:func:`gelu_fed_products`) stay float32. A
    GELU's output has a long positive tail over values near zero, and dynamic int8 gives an activation one scale
    for the whole tensor; on the vascx fundus photographs those 10 products held all of int8's loss (Dice -2.50
    points and 98.2 % of the pixels agreeing with float32 on the test photographs, -3.90 and 97.9 % on the training
    ones; with them float32 -0.06 / 99.85 % and +0.11 / 99.87 %), giving back about half of int8's time saving
    (docs/benchmark.md)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it")
    with atomic_file(target) as temporary:
        if infer_shapes:
            quant_pre_process(str(source), str(temporary), skip_symbolic_shape=True)
            source = temporary
        excluded = gelu_fed_products(source) if float_after_gelu else []
        quantize_dynamic(str(source), str(temporary), op_types_to_quantize=list(INT8_OP_TYPES), per_channel=True,
                         weight_type=QuantType.QInt8, nodes_to_exclude=excluded)
    logger.info("quantised %s to int8: %s (%.1f MB)", source, target, target.stat().st_size / 2**20)
    return target


def physical_cores() -> int:
    """The machine's physical cores (hyper-threads share one core's arithmetic units, which the GEMMs fill)."""
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


@functools.cache
def _shared_cpu_arena(ort) -> None:
    """Register onnxruntime's CPU arena allocator with its environment, once per process (default settings)."""
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))


def onnxruntime_session(path: str | os.PathLike, num_threads: int | None = None):
    """An onnxruntime CPU ``InferenceSession`` for an exported graph, with ``num_threads`` intra-op threads (default
    :func:`physical_cores`). Each option is set explicitly, with the reason it was chosen (measured on 2 cores,
    docs/benchmark.md)."""
    try:
        import onnxruntime as ort
    except ImportError as error:
        raise ImportError("running an exported graph needs onnxruntime: pip install 'esp-medsam-hf[onnx]'") from error
    options = ort.SessionOptions()
    # All graph optimisations: the layout-dependent ones (NCHWc convolutions) and fusions (GELU, LayerNorm, MatMul +
    # bias, attention) are where the path gains over eager PyTorch; "extended" (no layout optimisations) took 14 %
    # more CPU time per tile of the int8 graph on 2 cores.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # One thread per physical core: the work is GEMMs and convolutions that fill a core; more threads only wait.
    options.intra_op_num_threads = num_threads or physical_cores()
    # Sequential: the graph is one chain of operators, so a parallel executor has nothing to overlap and its
    # inter-op pool would compete with the intra-op threads for the same cores.
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # The arena keeps activation buffers between calls: tiles come in many calls of the same shapes, so each call
    # reuses the last one's memory instead of allocating it again (without it: 7 % more CPU time per tile).
    options.enable_cpu_mem_arena = True
    # One arena for every session of the process (onnxruntime's environment allocator): tiled inference holds up to
    # four sessions (the general graph and the tiles' modality graphs, float32 and int8), and an arena each kept the
    # peak of every one of them at once (the main job went from 5.4 to 8.4 GB); shared, they reuse the same memory.
    _shared_cpu_arena(ort)
    options.add_session_config_entry("session.use_env_allocators", "1")
    # No spinning: onnxruntime's idle intra-op threads busy-wait for the next operator by default, which burns a
    # core that a shared or small machine needs. Measured on 2 shared cores (256-px graph, interleaved rounds,
    # docs/benchmark.md): float32 batch 1 0.098 s process CPU and 0.19 s wall per forward without spinning, 0.20 s
    # and 0.30 s with it; int8, 16 tiles per call, 0.12 / 0.26 s per tile without, 0.16 / 0.42 s with.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


__all__ = ["INT8_OP_TYPES", "OUTPUT_NAMES", "EspMedSamInferenceGraph", "EspMedSamModalityGraph", "export_onnx",
           "gelu_fed_products", "onnxruntime_session", "physical_cores", "quantize_onnx"]
