"""ESP-MedSAM (arXiv 2407.14153) as a transformers model.

Parts, named after the paper:
- ``ModalityAggregator``: the shared TinyViT-5M (MobileSAM layout) image encoder, built from timm's TinyViT blocks.
- ``ModalityController`` of ``ParameterBag``s: per modality, key/value tokens with a logit bias for every attention
  layer and an MLP parallel to every block's MLP. A batch may mix modalities: each image's bag weights are gathered
  by index and applied with batched matrix products, with no Python loop over images.
- ``SelfPatchPromptGenerator``: patch logits from the image embedding, binarised into a dense prompt.
- ``QueryDecoupledModalityDecoder``: SAM's two-way transformer (transformers' ``SamTwoWayTransformer``) with one mask
  query per modality; each image decodes the query of its own modality.
The forward pass reproduces the official release numerically (see tests/test_parity.py).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import weakref
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from timm.models.tiny_vit import Attention as TinyVitAttention
from timm.models.tiny_vit import ConvLayer, ConvNorm, NormMlp
from timm.models.tiny_vit import PatchMerging as TinyVitPatchMerging
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.dynamic_module_utils import get_cached_module_file, get_relative_import_files
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.sam.configuration_sam import SamPromptEncoderConfig
from transformers.models.sam.modeling_sam import (
    SamFeedForward,
    SamPromptEncoder,
    SamTwoWayTransformer,
    eager_attention_forward,
)
from transformers.utils import HF_MODULES_CACHE, SAFE_WEIGHTS_NAME, ModelOutput

from .configuration_esp_medsam import (
    EspMedSamAggregatorConfig,
    EspMedSamConfig,
    EspMedSamDecoderConfig,
    EspMedSamParameterBagConfig,
    EspMedSamPromptGeneratorConfig,
)
from .losses import segmentation_loss

logger = logging.getLogger(__name__)


@dataclass
class EspMedSamOutput(ModelOutput):
    """Output of [`EspMedSamModel`].

    loss: total training loss when ``labels`` are given (mask focal + dice, patch BCE, modality cross-entropy).
    pred_masks: (B, 1, 4g, 4g) low-resolution mask logits of each image's own modality query (256x256 at 1024 px).
    patch_logits: (B, 1, p, p) self-prompt logits (32x32 at 1024 px).
    image_embeddings: (B, C, g, g) neck output of the image encoder (256x64x64 at 1024 px).
    modality_logits: (B, M) logits of the modality classifier on the aggregator's stage-0 features.
    modality: (B,) the modality index each image was decoded with (given, or chosen by the classifier).
    target: (B,) the target index each image was decoded with, for a model with extra targets (``None`` otherwise:
        there the target is the modality's own).
    mask_loss, patch_loss, modality_loss: the loss terms, for logging.
    hidden_states: with ``output_hidden_states``, the image encoder's stage outputs (B, C_i, H_i, W_i): the stem
        (patch embedding and stage 0), each TinyViT stage, then the neck (the same tensor as ``image_embeddings``).
        The teacher's: the patch embedding and each ViT layer's output (B, H, W, C), then the neck.
    attentions: with ``output_attentions`` (student), each TinyViT block's window-attention weights
        (B * windows, heads, N, N + bag tokens).
    iou_scores: with point or box prompts, (B, N, K) the stability score of each mask (SAM's IoU estimate without
        an IoU head: the IoU of the mask thresholded at logit +1 and at -1); ``pred_masks`` is then (B, N, K, h, w).
    """

    loss: torch.FloatTensor | None = None
    pred_masks: torch.FloatTensor | None = None
    patch_logits: torch.FloatTensor | None = None
    image_embeddings: torch.FloatTensor | None = None
    modality_logits: torch.FloatTensor | None = None
    modality: torch.LongTensor | None = None
    mask_loss: torch.FloatTensor | None = None
    patch_loss: torch.FloatTensor | None = None
    modality_loss: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    iou_scores: torch.FloatTensor | None = None
    target: torch.LongTensor | None = None


# ----------------------------------------------------------------------------------------------------------------
# Parameter bags (modality controller)
# ----------------------------------------------------------------------------------------------------------------


class ParameterBagBlock(nn.Module):
    """One bag's parameters for one TinyViT block: key/value tokens, their logit bias, and the parallel MLP."""

    def __init__(self, dim: int, num_heads: int, config: EspMedSamParameterBagConfig):
        super().__init__()
        head_dim = dim // num_heads
        self.tokens = nn.Parameter(torch.zeros(num_heads, config.num_tokens, head_dim))
        self.token_bias = nn.Parameter(torch.zeros(config.num_tokens)) if config.use_token_bias else None
        self.mlp = NormMlp(dim, int(dim * config.mlp_ratio), norm_layer=nn.LayerNorm, act_layer=nn.GELU)


class ParameterBag(nn.Module):
    """All modality-specific parameters of one modality, for every TinyViT block of the aggregator."""

    def __init__(self, aggregator_config: EspMedSamAggregatorConfig, config: EspMedSamParameterBagConfig):
        super().__init__()
        blocks = []
        for dim, depth, heads in zip(
            aggregator_config.embed_dims[1:], aggregator_config.depths[1:], aggregator_config.num_heads[1:]
        ):
            blocks += [ParameterBagBlock(dim, heads, config) for _ in range(depth)]
        self.blocks = nn.ModuleList(blocks)


@dataclass
class GatheredBagBlock:
    """One block's bag parameters: gathered per image (leading dimension B), or, when every image of the batch
    has the same modality, that bag's own parameters used directly (``shared``: no batch dimension, no copy)."""

    tokens: torch.Tensor | None  # (B, heads, T, head_dim); shared: (heads, T, head_dim)
    token_bias: torch.Tensor | None  # (B, T); shared: (T,)
    norm_weight: torch.Tensor  # (B, C); shared: (C,)
    norm_bias: torch.Tensor
    fc1_weight: torch.Tensor  # (B, hidden, C); shared: (hidden, C)
    fc1_bias: torch.Tensor
    fc2_weight: torch.Tensor  # (B, C, hidden); shared: (C, hidden)
    fc2_bias: torch.Tensor
    eps: float
    normalized_shape: tuple[int, ...]  # a Python tuple, so tracing exporters keep it constant
    shared: bool = False

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """The bag's parallel MLP on x (B, L, C), each image with its own weights."""
        if self.shared:
            x = F.layer_norm(x, self.normalized_shape, self.norm_weight, self.norm_bias, self.eps)
            return F.linear(F.gelu(F.linear(x, self.fc1_weight, self.fc1_bias)), self.fc2_weight, self.fc2_bias)
        x = F.layer_norm(x, self.normalized_shape, eps=self.eps) * self.norm_weight[:, None] + self.norm_bias[:, None]
        x = torch.baddbmm(self.fc1_bias[:, None], x, self.fc1_weight.transpose(1, 2))
        x = F.gelu(x)
        return torch.baddbmm(self.fc2_bias[:, None], x, self.fc2_weight.transpose(1, 2))


def single_modality(modality: torch.LongTensor) -> int | None:
    """The modality of a batch whose images all share one (then the bags' weights are used directly), else None.

    One host read per forward; while compiling it answers None so the graph has no data-dependent branch.
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or modality.numel() == 0:
        return None
    first = modality[0]
    return int(first) if bool((modality == first).all()) else None


class ModalityController(nn.Module):
    """Holds one ``ParameterBag`` per target (one per modality, then one per extra target) and plugs each image's
    bag into the aggregator's blocks; ``modality`` below is the index of the bag (the image's target)."""

    fixed_modality: int | None = None
    """Set on a copy being exported for one modality (``export.export_onnx(..., modality=)``): every image uses
    that bag through the shared path, which tracing otherwise never takes (it cannot read the batch's modalities)."""

    def __init__(self, config: EspMedSamConfig):
        super().__init__()
        self.bags = nn.ModuleList(
            [ParameterBag(config.aggregator_config, config.parameter_bag_config) for _ in range(config.num_targets)]
        )

    def gather(self, block_index: int, modality: torch.LongTensor, single: int | None = None) -> GatheredBagBlock:
        """Block ``block_index`` of each image's bag: with ``single`` (every image of that modality) the bag's own
        parameters, else every bag stacked and each image's row picked (no loop over images)."""
        if single is not None:
            block = self.bags[single].blocks[block_index]
            return GatheredBagBlock(
                tokens=block.tokens if block.tokens.shape[1] else None,
                token_bias=block.token_bias,
                norm_weight=block.mlp.norm.weight,
                norm_bias=block.mlp.norm.bias,
                fc1_weight=block.mlp.fc1.weight,
                fc1_bias=block.mlp.fc1.bias,
                fc2_weight=block.mlp.fc2.weight,
                fc2_bias=block.mlp.fc2.bias,
                eps=block.mlp.norm.eps,
                normalized_shape=tuple(block.mlp.norm.normalized_shape),
                shared=True,
            )
        blocks = [bag.blocks[block_index] for bag in self.bags]

        def pick(tensors: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack(tensors).index_select(0, modality)

        tokens = pick([b.tokens for b in blocks]) if blocks[0].tokens.shape[1] else None
        token_bias = pick([b.token_bias for b in blocks]) if blocks[0].token_bias is not None else None
        return GatheredBagBlock(
            tokens=tokens,
            token_bias=token_bias,
            norm_weight=pick([b.mlp.norm.weight for b in blocks]),
            norm_bias=pick([b.mlp.norm.bias for b in blocks]),
            fc1_weight=pick([b.mlp.fc1.weight for b in blocks]),
            fc1_bias=pick([b.mlp.fc1.bias for b in blocks]),
            fc2_weight=pick([b.mlp.fc2.weight for b in blocks]),
            fc2_bias=pick([b.mlp.fc2.bias for b in blocks]),
            eps=blocks[0].mlp.norm.eps,
            normalized_shape=tuple(blocks[0].mlp.norm.normalized_shape),
        )


# ----------------------------------------------------------------------------------------------------------------
# Modality aggregator (TinyViT, MobileSAM layout)
# ----------------------------------------------------------------------------------------------------------------


class EspMedSamPatchEmbed(nn.Module):
    """Two Conv-BN layers with a GELU between them (3x3 stride 2 officially, 1x1 stride 1 in LiteMedSAM).

    timm's ``PatchEmbed`` hard-codes 3x3 stride-2 convolutions, so LiteMedSAM's variant needs this one.
    """

    def __init__(self, config: EspMedSamAggregatorConfig):
        super().__init__()
        kernel, stride, dim = config.patch_embed_kernel_size, config.patch_embed_stride, config.embed_dims[0]
        self.conv1 = ConvNorm(config.num_channels, dim // 2, kernel, stride, kernel // 2)
        self.act = nn.GELU()
        self.conv2 = ConvNorm(dim // 2, dim, kernel, stride, kernel // 2)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.conv1(pixel_values)))


class EspMedSamPatchMerging(TinyVitPatchMerging):
    """timm's TinyViT patch merging with a configurable depthwise stride (MobileSAM keeps the last grid)."""

    def __init__(self, dim: int, out_dim: int, stride: int):
        super().__init__(dim, out_dim, nn.GELU)
        if stride != 2:
            self.conv2 = ConvNorm(out_dim, out_dim, 3, stride, 1, groups=out_dim)


class EspMedSamWindowAttention(TinyVitAttention):
    """TinyViT window attention with the parameter bag's tokens appended to the keys and values.

    The relative-position bias and the tokens' logit bias form the attention mask. The attention itself is the
    function of transformers' attention interface that ``config._attn_implementation`` names, read at every call:
    ``"sdpa"`` (``F.scaled_dot_product_attention`` with the mask), ``"eager"`` (SAM's explicit softmax attention).

    Windows that overhang the feature map are zero-padded in TinyViT: the padded positions are keys and values of
    their window, but their own outputs are cut away. Every padded position has the same key and value (its
    normalised value is the LayerNorm's bias) and differs only in its position bias, so their terms of the softmax
    sum to one key with the log-sum-exp of those biases. That is how they are attended here: the same function
    without padding the map, projecting padded tokens or querying them, in up to four groups of windows of one
    shape each (the whole windows, the right column, the bottom row, the corner). At 256 px a 16x16 map in 14-px
    windows is padded to 28x28, three times its tokens (the speed-up is measured in docs/benchmark.md).
    """

    is_causal = False

    def __init__(self, dim: int, num_heads: int, window_size: int, config: EspMedSamAggregatorConfig):
        head_dim = dim // num_heads
        super().__init__(dim, head_dim, num_heads, attn_ratio=1, resolution=(window_size, window_size))
        self.norm.eps = config.layer_norm_eps
        self.window_size = window_size
        self.config = config

    def forward(self, x: torch.Tensor, bag: GatheredBagBlock, attentions: list | None = None) -> torch.Tensor:
        """Window attention on the feature map x (B, H, W, C), each window with its bag's tokens: (B, H, W, C).

        A list given as ``attentions`` receives the weights (windows, heads, N, N + T), computed by the eager
        attention (SDPA does not return them) over TinyViT's padded windows in full, so that they are the weights
        the output is computed from, in TinyViT's layout."""
        _, height, width, channels = x.shape
        ws, heads = self.window_size, self.num_heads
        split = [self.key_dim, self.key_dim, self.val_dim]
        # Shapes are given with -1 for the batch and constants elsewhere: an exported graph then computes no shapes.
        qkv = self.qkv(self.norm(x))
        padding = None
        if height % ws or width % ws:
            padded_row = self.qkv(self.norm(x.new_zeros(channels)))
            padding = padded_row.view(heads, 1, -1).split(split, dim=-1)[1:]
            if attentions is not None:
                qkv = torch.cat([qkv, padded_row.expand(qkv.shape[0], height, -width % ws, -1)], dim=2)
                qkv = torch.cat([qkv, padded_row.expand(qkv.shape[0], -height % ws, qkv.shape[2], -1)], dim=1)
        implementation = "eager" if attentions is not None else self.config._attn_implementation
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        rows = []
        for top, row_windows, rows_per_window in self.bands(qkv.shape[1]):
            pieces = []
            for left, col_windows, cols_per_window in self.bands(qkv.shape[2]):
                length = rows_per_window * cols_per_window
                region = qkv[:, top : top + row_windows * rows_per_window, left : left + col_windows * cols_per_window]
                q, k, v = (
                    region.reshape(-1, row_windows, rows_per_window, col_windows, cols_per_window, heads, sum(split))
                    .permute(0, 1, 3, 5, 2, 4, 6)
                    .reshape(-1, heads, length, sum(split))
                    .split(split, dim=-1)
                )
                windows = q.shape[0]
                mask = self.position_bias(rows_per_window, cols_per_window).to(x.dtype)
                if length < ws * ws:
                    k = torch.cat([k, padding[0].expand(windows, -1, -1, -1)], dim=2)
                    v = torch.cat([v, padding[1].expand(windows, -1, -1, -1)], dim=2)
                k, v, mask = self.join_bag(k, v, mask, bag, row_windows * col_windows)
                out, weights = attention(self, q, k, v, mask, scaling=self.scale, dropout=0.0)
                if attentions is not None:
                    attentions.append(weights)
                out = out.reshape(-1, row_windows, col_windows, rows_per_window, cols_per_window, self.out_dim)
                pieces.append(out.transpose(2, 3).reshape(
                    -1, row_windows * rows_per_window, col_windows * cols_per_window, self.out_dim))
            rows.append(torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0])
        out = torch.cat(rows, dim=1) if len(rows) > 1 else rows[0]
        return self.proj(out if out.shape[1:3] == x.shape[1:3] else out[:, :height, :width])

    def bands(self, size: int) -> list[tuple[int, int, int]]:
        """A side of ``size`` cut into windows: (first index, windows, tokens per window) of the whole windows
        and of the overhanging last one. (A traced export fixes them, as its image size is fixed.)"""
        whole, rest = divmod(int(size), self.window_size)
        return ([(0, whole, self.window_size)] if whole else []) + ([(whole * self.window_size, 1, rest)] if rest else [])

    def position_bias(self, rows: int, cols: int) -> torch.Tensor:
        """(heads, n, n [+ 1]): the relative-position bias among a window's ``rows`` x ``cols`` own tokens (its
        top-left part), and, when the window overhangs the map, the log-sum-exp of the biases to its padded
        positions, the logit bias of their one merged key."""
        ws, heads = self.window_size, self.num_heads
        # Indexed on every call: timm's eval-mode cache goes stale when weights are loaded after .eval().
        bias = self.attention_biases[:, self.attention_bias_idxs].view(heads, ws, ws, ws * ws)[:, :rows, :cols]
        bias = bias.reshape(heads, rows * cols, ws * ws)
        if rows * cols == ws * ws:
            return bias
        own = [r * ws + c for r in range(rows) for c in range(cols)]
        padded = [i for i in range(ws * ws) if i % ws >= cols or i // ws >= rows]
        own_bias = bias.index_select(-1, torch.tensor(own, device=bias.device))
        padded_bias = bias.index_select(-1, torch.tensor(padded, device=bias.device)).logsumexp(-1, keepdim=True)
        return torch.cat([own_bias, padded_bias], dim=-1)

    def join_bag(
        self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, bag: GatheredBagBlock, per_image: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values (windows, heads, n', d) and the mask (heads, n, n') with the bag's tokens appended; the mask
        gains a leading dimension, 1 for one bag shared by the batch (broadcast, no per-window copy) or one row per
        window. ``per_image``: windows per image."""
        if bag.tokens is None:
            return k, v, mask.unsqueeze(0)
        windows, heads, length = k.shape[0], k.shape[1], mask.shape[1]
        tokens = bag.tokens.to(k.dtype)
        tokens = tokens.expand(windows, -1, -1, -1) if bag.shared else tokens.repeat_interleave(per_image, dim=0)
        num_tokens = tokens.shape[2]
        if bag.token_bias is None:
            token_bias = mask.new_zeros(1, heads, length, num_tokens)
        elif bag.shared:
            token_bias = bag.token_bias.to(mask.dtype).expand(1, heads, length, num_tokens)
        else:
            token_bias = bag.token_bias.to(mask.dtype).repeat_interleave(per_image, dim=0)
            token_bias = token_bias[:, None, None, :].expand(windows, heads, length, num_tokens)
        mask = mask.unsqueeze(0).expand(token_bias.shape[0], -1, -1, -1)
        return torch.cat([k, tokens], dim=2), torch.cat([v, tokens], dim=2), torch.cat([mask, token_bias], dim=-1)


class AggregatorBlock(GradientCheckpointingLayer):
    """A TinyViT block: windowed attention, depthwise local conv, then ``x + mlp(x) + bag_mlp(x)``."""

    def __init__(self, dim: int, num_heads: int, window_size: int, config: EspMedSamAggregatorConfig):
        super().__init__()
        self.attn = EspMedSamWindowAttention(dim, num_heads, window_size, config)
        pad = config.local_conv_size // 2
        self.local_conv = ConvNorm(dim, dim, config.local_conv_size, 1, pad, groups=dim)
        self.mlp = NormMlp(dim, int(dim * config.mlp_ratio), norm_layer=nn.LayerNorm, act_layer=nn.GELU)
        self.mlp.norm.eps = config.layer_norm_eps

    def forward(
        self, hidden_states: torch.Tensor, bag: GatheredBagBlock, attentions: list | None = None
    ) -> torch.Tensor:
        batch, height, width, channels = hidden_states.shape
        x = hidden_states + self.attn(hidden_states, bag, attentions)
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        tokens = x.reshape(batch, height * width, channels)
        if bag.shared and bag.eps == self.mlp.norm.eps:
            return (tokens + self.joint_mlp(tokens, bag)).view(batch, height, width, channels)
        tokens = tokens + self.mlp(tokens) + bag.mlp(tokens)
        return tokens.view(batch, height, width, channels)

    def joint_mlp(self, tokens: torch.Tensor, bag: GatheredBagBlock) -> torch.Tensor:
        """``mlp(x) + bag.mlp(x)`` for one bag shared by the batch, as one MLP: the LayerNorm statistics are taken
        once, both LayerNorm affines are folded into the first linear layers, and the two hidden layers are joined,
        so one normalisation, two matrix products and one GELU pass replace two of each (same function)."""
        mlp = self.mlp
        normalized = F.layer_norm(tokens, bag.normalized_shape, eps=bag.eps)
        fc1_weight = torch.cat([mlp.fc1.weight * mlp.norm.weight, bag.fc1_weight * bag.norm_weight])
        fc1_bias = torch.cat([mlp.fc1.bias + mlp.fc1.weight @ mlp.norm.bias, bag.fc1_bias + bag.fc1_weight @ bag.norm_bias])
        hidden = F.gelu(F.linear(normalized, fc1_weight, fc1_bias))
        fc2_weight = torch.cat([mlp.fc2.weight, bag.fc2_weight], dim=1)
        return F.linear(hidden, fc2_weight, mlp.fc2.bias + bag.fc2_bias)


class AggregatorStage(nn.Module):
    """Patch merging from the previous stage, then TinyViT blocks (channels-last inside)."""

    def __init__(self, in_dim: int, config: EspMedSamAggregatorConfig, stage: int, merge_stride: int):
        super().__init__()
        dim = config.embed_dims[stage]
        self.downsample = EspMedSamPatchMerging(in_dim, dim, merge_stride)
        self.blocks = nn.ModuleList(
            [
                AggregatorBlock(dim, config.num_heads[stage], config.window_sizes[stage], config)
                for _ in range(config.depths[stage])
            ]
        )


class ModalityAggregator(nn.Module):
    """The shared part of the semi-parameter-sharing encoder: patch embedding, MBConv stage 0, TinyViT stages, neck.

    ``stem`` (patch embedding and stage 0) uses no parameter bag; its output also feeds the modality classifier.
    """

    def __init__(self, config: EspMedSamAggregatorConfig):
        super().__init__()
        dims = config.embed_dims
        self.patch_embed = EspMedSamPatchEmbed(config)
        self.stage0 = ConvLayer(dims[0], config.depths[0], nn.GELU, conv_expand_ratio=config.mbconv_expand_ratio)
        num_stages = len(dims)
        self.stages = nn.ModuleList(
            [
                AggregatorStage(
                    dims[i - 1], config, i, config.last_merge_stride if i == num_stages - 1 else 2
                )
                for i in range(1, num_stages)
            ]
        )
        self.neck = nn.Sequential(
            nn.Conv2d(dims[-1], config.neck_dim, 1, bias=False),
            LayerNorm2d(config.neck_dim, eps=config.neck_layer_norm_eps),
            nn.Conv2d(config.neck_dim, config.neck_dim, 3, padding=1, bias=False),
            LayerNorm2d(config.neck_dim, eps=config.neck_layer_norm_eps),
        )

    def stem(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch embedding and stage 0 on ``pixel_values`` cast to the encoder's dtype (a bf16/fp16 model takes
        the image processor's float32 output as is)."""
        return self.stage0(self.patch_embed(pixel_values.to(self.neck[0].weight.dtype)))

    def forward_stages(
        self,
        features: torch.Tensor,
        modality: torch.LongTensor,
        controller: ModalityController,
        hidden_states: list[torch.Tensor] | None = None,
        first: int = 1,
        last: int | None = None,
        attentions: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Stages ``first``..``last`` (1-based; stage 0 is the stem) with each image's parameter bag plugged in, then
        the neck when ``last`` is None (run to the end): (B, C, g, g). ``features`` is the output of stage
        ``first - 1``; a frozen prefix of the encoder can so be computed once and the rest run on it.

        When a list is given as ``hidden_states``, each stage's output (B, C, H, W) is appended to it; a list given
        as ``attentions`` receives each block's window-attention weights (eager attention).
        """
        stages = self.stages[first - 1 : last]
        block_index = sum(len(stage.blocks) for stage in self.stages[: first - 1])
        x = features
        # While bags are trained the gathered path is kept: it reaches every bag's parameters, as distributed data
        # parallel needs (a bag unused on one process would leave its gradient reduction waiting) and as Adam does
        # for the bags of absent modalities (zero gradients, not none).
        # Other controllers (stand-ins with their own ``gather(block_index, modality)``) keep their gathering.
        single = None
        if isinstance(controller, ModalityController) and not (
            torch.is_grad_enabled() and any(p.requires_grad for p in controller.parameters())
        ):
            single = controller.fixed_modality if controller.fixed_modality is not None else single_modality(modality)
        for stage in stages:
            x = stage.downsample(x).permute(0, 2, 3, 1)
            for block in stage.blocks:
                bag = (
                    controller.gather(block_index, modality)
                    if single is None
                    else controller.gather(block_index, modality, single)
                )
                x = block(x, bag, attentions)
                block_index += 1
            x = x.permute(0, 3, 1, 2)
            if hidden_states is not None:
                hidden_states.append(x)
        return self.neck(x) if last is None else x


class ModalityClassifier(nn.Module):
    """Predicts the modality from the aggregator's stage-0 features, before any parameter bag is used.

    Not in the paper: it lets the model run without being told the modality. Pooled on a 4x4 grid plus the
    per-channel standard deviation; the features are detached so the classifier never changes the segmenter.
    """

    def __init__(self, in_dim: int, hidden_size: int, num_modalities: int):
        super().__init__()
        features = in_dim * 17
        # float32 whatever the default dtype: the module is in _keep_in_fp32_modules_strict
        self.norm = nn.LayerNorm(features, dtype=torch.float32)
        self.fc1 = nn.Linear(features, hidden_size, dtype=torch.float32)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_size, num_modalities, dtype=torch.float32)

    @staticmethod
    def pool(features: torch.Tensor) -> torch.Tensor:
        """(B, 17 C) pooled stage-0 features (detached, in float32: a bf16 standard deviation is too coarse): what
        the head reads, and what a feature cache stores."""
        features = features.detach().float()
        return torch.cat([F.adaptive_avg_pool2d(features, 4).flatten(1), features.flatten(2).std(dim=-1)], dim=1)

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        """The layers, in their own dtype."""
        return self.fc2(self.act(self.fc1(self.norm(pooled.to(self.fc1.weight.dtype)))))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(features))


# ----------------------------------------------------------------------------------------------------------------
# Self-patch prompt generator
# ----------------------------------------------------------------------------------------------------------------


class SelfPatchPromptGenerator(nn.Module):
    """Predicts coarse patch logits from the image embedding and turns their binarised map into a dense prompt."""

    def __init__(self, config: EspMedSamPromptGeneratorConfig, embed_dim: int):
        super().__init__()
        self.threshold = config.threshold
        layers: list[nn.Module] = []
        in_dim = embed_dim
        for _ in range(config.num_downsample_layers):
            layers += [
                nn.Conv2d(in_dim, config.hidden_size, kernel_size=2, stride=2),
                LayerNorm2d(config.hidden_size, eps=config.layer_norm_eps),
                nn.GELU(),
            ]
            in_dim = config.hidden_size
        layers.append(nn.Conv2d(in_dim, 1, kernel_size=1))
        self.patch_generator = nn.Sequential(*layers)
        self.dense_prompt_encoder = nn.Sequential(
            nn.Conv2d(1, embed_dim, kernel_size=1),
            LayerNorm2d(embed_dim, eps=config.layer_norm_eps),
            nn.GELU(),
        )

    def patch_map(self, image_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (patch_logits (B,1,p,p), the binarised patches on the embedding grid (B,1,g,g)); no gradient
        flows through the binarisation. Point and box prompts edit this map before it is encoded."""
        patch_logits = self.patch_generator(image_embeddings)
        patches = (torch.sigmoid(patch_logits.detach()) >= self.threshold).to(image_embeddings.dtype)
        return patch_logits, F.interpolate(patches, size=image_embeddings.shape[-2:], mode="nearest")

    def encode_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """The dense prompt (B,C,g,g) of a binarised patch map (B,1,g,g). The encoder (1x1 convolution, channel
        LayerNorm, GELU) acts on each cell alone and a cell is 0 or 1, so it is run on those two values only and
        each cell takes its value's embedding: the same numbers as running it on the map, without its cost on
        every cell (a prompt on a cached embedding re-encodes its edited map)."""
        values = torch.tensor([0.0, 1.0], device=patches.device, dtype=patches.dtype).view(1, 1, 1, 2)
        off, on = self.dense_prompt_encoder(values).unbind(-1)  # (1, C, 1) each
        return torch.where(patches > 0, on[..., None], off[..., None])

    def forward(self, image_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (patch_logits (B,1,p,p), dense_prompt (B,C,g,g))."""
        patch_logits, patches = self.patch_map(image_embeddings)
        return patch_logits, self.encode_patches(patches)


# ----------------------------------------------------------------------------------------------------------------
# Query-decoupled modality decoder
# ----------------------------------------------------------------------------------------------------------------


def tensor_version(tensor: torch.Tensor) -> int | None:
    """The in-place version counter of ``tensor`` (``None`` for an inference-mode tensor, which has none): a
    result kept for a tensor is reused only while its version is unchanged."""
    return None if tensor.is_inference() else tensor._version


class RandomFourierPositionalEncoding(nn.Module):
    """SAM's dense positional encoding of the embedding grid (a fixed Gaussian matrix, stored as a buffer).

    transformers' ``SamPositionalEmbedding`` holds the matrix as a trainable ``nn.Parameter``; SAM and ESP-MedSAM
    keep it fixed, so it is a buffer here.
    """

    def __init__(self, num_features: int, scale: float):
        super().__init__()
        # float32 whatever the default dtype: the module is in _keep_in_fp32_modules_strict
        self.register_buffer("gaussian_matrix", scale * torch.randn(2, num_features, dtype=torch.float32))

    def forward(self, size: int) -> torch.Tensor:
        """(1, 2 * num_features, size, size), cell centres mapped to [-1, 1], x before y; computed in float32
        whatever the model's dtype (sines of bf16 arguments are too coarse). Computed on every call: keeping it
        made a forward's FLOPs depend on the calls before it and broke ``torch.compile`` for a few per cent of a
        prompt's time (docs/benchmark.md)."""
        matrix = self.gaussian_matrix.float()
        centres = (torch.arange(size, device=matrix.device, dtype=matrix.dtype) + 0.5) / size
        y, x = torch.meshgrid(centres, centres, indexing="ij")
        coords = (2 * torch.stack([x, y], dim=-1) - 1) @ matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1).permute(2, 0, 1).unsqueeze(0)

    def encode_points(self, input_coords: torch.Tensor, input_shape: tuple[int, int]) -> torch.Tensor:
        """(..., 2) x/y pixel coordinates in an ``input_shape`` (height, width) image -> (..., 2 * num_features):
        ``SamPositionalEmbedding.forward``'s signature and function, from the same fixed matrix as the grid."""
        matrix = self.gaussian_matrix.float()
        scale = torch.tensor([input_shape[1], input_shape[0]], device=matrix.device, dtype=matrix.dtype)
        coords = 2 * math.pi * ((2 * input_coords.to(matrix.dtype) / scale - 1) @ matrix)
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)


class EspMedSamPromptEncoder(SamPromptEncoder):
    """SAM's prompt encoder (transformers' ``SamPromptEncoder``) for optional point and box prompts.

    Its point and box embeddings (``point_embed``: negative, positive, box corner 1 and 2; ``not_a_point_embed``)
    are SAM's; the coordinates are encoded with the decoder's positional encoding (one fixed matrix for the grid and
    the points, as SAM's ``shared_image_embedding``). SAM's mask input and no-mask embedding are left out: the
    self-patch prompt generator's dense prompt takes their place.
    """

    def __init__(self, config: "EspMedSamConfig", positional_encoding: RandomFourierPositionalEncoding):
        decoder = config.decoder_config
        prompt_config = SamPromptEncoderConfig(hidden_size=decoder.hidden_size, image_size=config.image_size)
        vision = SamPromptEncoderConfig(hidden_size=decoder.hidden_size)
        vision.scale, vision.num_pos_feats = decoder.positional_encoding_scale, decoder.hidden_size // 2
        holder = type("SamConfigView", (), {"vision_config": vision, "prompt_encoder_config": prompt_config})
        super().__init__(holder)
        del self.shared_embedding, self.mask_embed, self.no_mask_embed
        # A bound method, not a submodule: the matrix stays one buffer of the decoder (no second copy to keep equal).
        self.shared_embedding = positional_encoding.encode_points

    def embed_points(self, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(R, P, 2) points in input pixels and (R, P) labels (1, 0; -1 padding) -> (R, P, C) SAM point tokens."""
        tokens = self._embed_points(points[:, None], labels[:, None], pad=False)[:, 0]
        return tokens.to(self.not_a_point_embed.weight.dtype)


class QueryDecoupledModalityDecoder(nn.Module):
    """SAM's two-way transformer over image embedding + dense prompt with one learned mask query per modality.

    Every image decodes only its own modality's query: the hypernetwork runs on that query alone and its dot
    product with the upscaled image features gives the mask. A target beyond the first ``num_modalities`` (the
    modality rows; ``target_rows`` gives every target's row: an extra target's is its modality's, an added
    modality's its ``like``'s) has its own query in ``target_queries``, which replaces that row's query for the
    images of that target, so the other targets' queries, and masks, stay as they were.
    """

    def __init__(self, config: EspMedSamDecoderConfig, num_modalities: int, target_rows: list[int] = ()):
        super().__init__()
        dim = config.hidden_size
        self.num_modalities = num_modalities
        self.mask_queries = nn.Embedding(num_modalities + config.num_extra_queries, dim)
        extra = list(target_rows)[num_modalities:]
        if extra:
            self.target_queries = nn.ParameterList([nn.Parameter(torch.zeros(dim)) for _ in extra])
            # a plain list, not a buffer: from_pretrained leaves a non-persistent buffer uninitialised
            self.query_rows = list(target_rows)
        self.positional_encoding = RandomFourierPositionalEncoding(dim // 2, config.positional_encoding_scale)
        self.transformer = SamTwoWayTransformer(config)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(dim // 4, eps=config.upscale_layer_norm_eps),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        num_hypernetworks = 1 if config.shared_hypernetwork else num_modalities
        self.hypernetworks = nn.ModuleList(
            [SamFeedForward(dim, dim, dim // 8, config.hypernetwork_num_layers) for _ in range(num_hypernetworks)]
        )

    def hypernetwork(self, queries: torch.Tensor, modality: torch.LongTensor) -> torch.Tensor:
        """Per-image hypernetwork on (B, C) queries; per-modality weights are gathered, not looped over."""
        if len(self.hypernetworks) == 1:
            return self.hypernetworks[0](queries)
        linears = list(zip(*[[h.proj_in, *h.layers, h.proj_out] for h in self.hypernetworks]))
        x = queries.unsqueeze(1)
        for i, layer in enumerate(linears):
            weight = torch.stack([linear.weight for linear in layer]).index_select(0, modality)
            bias = torch.stack([linear.bias for linear in layer]).index_select(0, modality)
            x = torch.baddbmm(bias[:, None], x, weight.transpose(1, 2))
            if i < len(linears) - 1:
                x = F.relu(x)
        return x.squeeze(1)

    def queries_for(self, target: torch.LongTensor) -> tuple[torch.Tensor, torch.LongTensor]:
        """(B, N, C) queries of each image and the (B,) row of its own query: the stored queries, with an extra
        target's query in its modality's row (the stored queries alone when no image is of an extra target)."""
        batch = target.shape[0]
        queries = self.mask_queries.weight.unsqueeze(0).expand(batch, -1, -1)
        if not hasattr(self, "target_queries") or not bool((target >= self.num_modalities).any()):
            return queries, target
        rows = torch.tensor(self.query_rows, device=target.device).index_select(0, target)
        own = torch.cat([self.mask_queries.weight[: self.num_modalities], torch.stack(list(self.target_queries))])
        chosen = torch.arange(queries.shape[1], device=target.device)[None] == rows[:, None]
        return torch.where(chosen[..., None], own.index_select(0, target)[:, None], queries), rows

    def forward(
        self,
        image_embeddings: torch.Tensor,
        dense_prompt: torch.Tensor,
        modality: torch.LongTensor,
        sparse_prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, 1, 4g, 4g) mask logits of each image's own query; ``modality`` is each image's target index (its
        modality's for a model without extra targets). ``sparse_prompts`` (B, T, C), SAM's point tokens, join the
        queries as in SAM's mask decoder (after its output tokens)."""
        batch, channels, height, width = image_embeddings.shape
        queries, modality = self.queries_for(modality)
        if sparse_prompts is not None:
            queries = torch.cat([queries, sparse_prompts.to(queries.dtype)], dim=1)
        queries = queries.unsqueeze(1)
        positional = self.positional_encoding(height).to(image_embeddings.dtype)
        queries, keys = self.transformer(
            point_embeddings=queries,
            image_embeddings=image_embeddings + dense_prompt,
            image_positional_embeddings=positional,
            attention_similarity=None,
        )
        image = keys.squeeze(1).transpose(1, 2).reshape(batch, channels, height, width)
        upscaled = self.output_upscaling(image)
        own_query = queries[:, 0].gather(1, modality.view(batch, 1, 1).expand(batch, 1, channels)).squeeze(1)
        hyper = self.hypernetwork(own_query, modality)
        masks = hyper.unsqueeze(1) @ upscaled.flatten(2)
        return masks.view(batch, 1, *upscaled.shape[-2:])


# ----------------------------------------------------------------------------------------------------------------
# Optional point and box prompts (a correction of the self-prompted mask)
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class PromptRows:
    """Point and box prompts in model-input pixels, one row per object (R = batch * objects)."""

    points: torch.Tensor | None  # (R, P, 2) x, y
    labels: torch.Tensor | None  # (R, P): 1 positive, 0 negative, -1 padding
    boxes: torch.Tensor | None  # (R, 4) x0, y0, x1, y1
    num_objects: int


def _check_inside(name: str, coords: torch.Tensor, image_size: int) -> None:
    """Refuse coordinates outside the [0, image_size] model input, naming the argument."""
    if coords.numel() and bool(((coords < 0) | (coords > image_size)).any()):
        bad = coords[((coords < 0) | (coords > image_size)).any(-1)][0].tolist()
        raise ValueError(
            f"{name} has a coordinate outside the image: {bad}; model-input coordinates lie within [0, {image_size}] "
            "(EspMedSamProcessor rescales prompts given in original-image pixels and checks them against the image)"
        )


def check_prompts(
    input_points: torch.Tensor | None,
    input_labels: torch.Tensor | None,
    input_boxes: torch.Tensor | None,
    batch: int,
    image_size: int,
    device: torch.device,
) -> PromptRows | None:
    """Validate SAM-style prompts (points (B, N, P, 2) with labels (B, N, P), boxes (B, N, 4)); None without any."""
    if input_points is None and input_labels is None and input_boxes is None:
        return None
    if (input_points is None) != (input_labels is None):
        raise ValueError("input_points and input_labels go together: one label (1, 0 or -1 padding) per point")
    points = labels = boxes = None
    objects = []
    if input_points is not None:
        points = torch.as_tensor(input_points, dtype=torch.float32, device=device)
        labels = torch.as_tensor(input_labels, device=device)
        if points.dim() != 4 or points.shape[0] != batch or points.shape[-1] != 2:
            raise ValueError(f"input_points must have shape ({batch}, objects, points, 2), got {tuple(points.shape)}")
        if labels.shape != points.shape[:-1] or labels.dtype.is_floating_point:
            raise ValueError(f"input_labels must be integers of shape {tuple(points.shape[:-1])}, got "
                             f"{tuple(labels.shape)} {labels.dtype}")
        if not bool(((labels >= -1) & (labels <= 1)).all()):
            raise ValueError("input_labels must be 1 (positive), 0 (negative) or -1 (padding)")
        _check_inside("input_points", points[labels != -1], image_size)
        objects.append(points.shape[1])
        points, labels = points.flatten(0, 1), labels.long().flatten(0, 1)
    if input_boxes is not None:
        boxes = torch.as_tensor(input_boxes, dtype=torch.float32, device=device)
        if boxes.dim() != 3 or boxes.shape[0] != batch or boxes.shape[-1] != 4:
            raise ValueError(f"input_boxes must have shape ({batch}, objects, 4), got {tuple(boxes.shape)}")
        _check_inside("input_boxes", boxes.reshape(-1, 2, 2).flatten(0, 1), image_size)
        if not bool((boxes[..., 2:] >= boxes[..., :2]).all()):
            raise ValueError("input_boxes must be (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1")
        objects.append(boxes.shape[1])
        boxes = boxes.flatten(0, 1)
    if len(set(objects)) > 1:
        raise ValueError(f"input_points and input_boxes must have the same number of objects, got {objects}")
    return PromptRows(points, labels, boxes, objects[0])


def _pixel_centres(size: int, image_size: int, device: torch.device) -> torch.Tensor:
    """Centres (size,) of a size x size grid's cells, in model-input pixels."""
    return (torch.arange(size, device=device, dtype=torch.float32) + 0.5) * (image_size / size)


def inside_boxes(boxes: torch.Tensor, size: int, image_size: int, overlap: bool) -> torch.Tensor:
    """(R, size, size) bool: grid cells inside each box; ``overlap``: cells that touch it, else cells whose centre
    lies in it. A box over the whole image keeps every cell either way."""
    edges = torch.arange(size + 1, device=boxes.device, dtype=torch.float32) * (image_size / size)
    if overlap:
        x_in = (edges[1:] > boxes[:, None, 0]) & (edges[:-1] <= boxes[:, None, 2])
        y_in = (edges[1:] > boxes[:, None, 1]) & (edges[:-1] <= boxes[:, None, 3])
    else:
        centres = _pixel_centres(size, image_size, boxes.device)
        x_in = (centres >= boxes[:, None, 0]) & (centres <= boxes[:, None, 2])
        y_in = (centres >= boxes[:, None, 1]) & (centres <= boxes[:, None, 3])
    return y_in[:, :, None] & x_in[:, None, :]


def connected_region(region: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """The cells of ``region`` (R, 1, g, g; 0/1) 8-connected to ``seeds`` (same shape), by repeated dilation."""
    grown = seeds * region
    for _ in range(region.shape[-1] * region.shape[-2]):
        step = F.max_pool2d(grown, 3, stride=1, padding=1) * region
        if torch.equal(step, grown):
            break
        grown = step
    return grown


def edit_patch_map(patches: torch.Tensor, prompts: PromptRows, image_size: int) -> torch.Tensor:
    """Correct each row's binarised self-patch map (R, 1, g, g) with its prompts, before the dense-prompt encoder:
    a box clears the patches outside it; a negative point clears the connected patch region it falls in; a positive
    point sets its patch. The dense prompt then carries the correction, so a prompt corrects the self-prompted mask
    instead of replacing it (a box over the whole image and padding points change nothing)."""
    size = patches.shape[-1]
    if prompts.boxes is not None:
        patches = patches * inside_boxes(prompts.boxes, size, image_size, overlap=True)[:, None].to(patches.dtype)
    if prompts.points is None:
        return patches
    cells = (prompts.points * (size / image_size)).floor().long().clamp(0, size - 1)
    flat = (cells[..., 1] * size + cells[..., 0]).clamp(0, size * size - 1)  # (R, P)

    def mark(label: int) -> torch.Tensor:
        hits = torch.zeros(patches.shape[0], size * size, device=patches.device, dtype=patches.dtype)
        hits.scatter_add_(1, flat, (prompts.labels == label).to(patches.dtype))
        return (hits > 0).to(patches.dtype).view_as(patches)

    negative, positive = mark(0), mark(1)
    if bool(negative.any()):
        patches = patches * (1 - connected_region(patches, negative))
    return torch.maximum(patches, positive)


def keep_inside_boxes(masks: torch.Tensor, boxes: torch.Tensor, image_size: int) -> torch.Tensor:
    """Mask logits (R, 1, h, w) with every pixel whose centre lies outside its row's box set to -1e4."""
    inside = inside_boxes(boxes, masks.shape[-1], image_size, overlap=False)[:, None]
    return masks.masked_fill(~inside, -1e4)


def stability_scores(masks: torch.Tensor, offset: float = 1.0) -> torch.Tensor:
    """SAM's stability score of mask logits (..., h, w): the IoU of the masks thresholded at +offset and -offset
    (1 for a mask empty at both)."""
    inner = (masks > offset).flatten(-2).sum(-1).float()
    outer = (masks > -offset).flatten(-2).sum(-1).float()
    return torch.where(outer > 0, inner / outer.clamp(min=1), torch.ones_like(outer))


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


def check_pixel_values(pixel_values: torch.Tensor, dtype: torch.dtype) -> None:
    """Refuse pixel values that are not floating point (raw image bytes), or that hold NaN/inf (they would make
    every logit NaN and return an empty mask). Floating pixel values of another precision are cast to the weights'
    ``dtype`` by the encoder (the image processor gives float32, also for a bf16 model)."""
    if not pixel_values.dtype.is_floating_point:
        raise TypeError(
            f"pixel_values has dtype {pixel_values.dtype} but must be floating point (the model's weights are "
            f"{dtype}); use EspMedSamImageProcessor, which gives normalised float32 pixel values from any image"
        )
    tracing = torch.compiler.is_compiling() or torch.jit.is_tracing()  # exported graphs check nothing data-dependent
    if not tracing and not bool(torch.isfinite(pixel_values).all()):
        raise ValueError("pixel_values hold NaN or inf; EspMedSamImageProcessor repairs such pixels (with a warning)")


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``module`` (any ``nn.Module``), or of those that require grad."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


_LAST_PATCH_MAPS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
"""Per model, (a weak reference to the last embeddings, their version, their patch map): outside the model, so
that a model still pickles and copies as before."""


class EspMedSamModelMixin:
    """What the student and the teacher share around their image encoders: the input checks, the heads (self-patch
    prompt generator and query-decoupled modality decoder, with the segmentation loss), the upscaling of the mask
    logits, the initialisation of the common layer types and the attention implementation of the sub-configs.

    ``forward`` checks the inputs and hands them to the model's ``segment``, which encodes the images and decodes
    them with ``decode_embeddings``. The model has ``config`` (an ``EspMedSamConfigMixin``, with ``image_size`` and
    ``decoder_config``), ``num_channels``, ``prompt_generator`` and ``mask_decoder``.
    """

    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _supports_sdpa = True

    def _share_attn_implementation(self) -> None:
        """Give the sub-configs the model's attention implementation, as ``SamModel`` does for its mask decoder.

        The attention layers read ``_attn_implementation`` from the sub-config they are built from; transformers
        resolves only the top-level config's when the model is built (``set_attn_implementation`` and
        ``from_pretrained(attn_implementation=...)`` reach the sub-configs themselves).
        """
        for key in self.config.sub_configs:
            getattr(self.config, key)._attn_implementation = self.config._attn_implementation

    @torch.no_grad()
    def _init_common_weights(self, module: nn.Module) -> None:
        """Initialisation of the layer types the student and the teacher share (norms, embeddings, linear and conv
        layers, the positional encoding); transformers' ``init`` helpers skip tensors loaded from a checkpoint."""
        if isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)
        elif isinstance(module, (nn.LayerNorm, LayerNorm2d)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, std=1.0)
        elif isinstance(module, RandomFourierPositionalEncoding):
            init.normal_(module.gaussian_matrix, std=self.config.decoder_config.positional_encoding_scale)
        elif isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            init.trunc_normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)

    def forward(
        self,
        pixel_values: torch.FloatTensor,
        modality: torch.LongTensor | None = None,
        labels: torch.FloatTensor | None = None,
        original_sizes: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        target: torch.LongTensor | None = None,
        **options: bool | None,
    ) -> EspMedSamOutput | tuple[torch.Tensor, ...]:
        r"""
        pixel_values: (B, 3, S, S) images from ``EspMedSamImageProcessor`` (cast to the model's dtype).
        modality: (B,) modality indices (``config.modality_names``); a batch may mix modalities. ``None``: the
            student's modality classifier decides per image (the teacher needs the modality).
        labels: (B, 1, H, W) binary masks; when given, ``loss`` is returned: the mask loss plus
            ``patch_loss_weight`` times the patch loss (the student adds the modality classifier's, trained on
            ``modality`` only when the modality is given).
        original_sizes: the image processor's (B, 2) sizes, accepted so that ``model(**processor(...))`` works;
            the forward does not use them (``post_process_masks`` does).
        return_dict: ``False`` returns ``EspMedSamOutput.to_tuple()`` (``config.return_dict``).
        target: (B,) target indices (``config.all_target_names``) instead of ``modality``, for a model with extra
            targets; ``modality=m`` is the same as ``target=m`` (modality ``m``'s own target).
        options: the model's own options, those of its ``segment`` (``output_hidden_states``, and the student's
            ``output_attentions``); any other argument is a ``TypeError``.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output = self.segment(pixel_values, self.check_inputs(pixel_values, modality, target), labels, **options)
        return output if return_dict else output.to_tuple()

    def check_inputs(
        self, pixel_values: torch.Tensor, modality: torch.Tensor | None, target: torch.Tensor | None = None
    ) -> torch.LongTensor | None:
        """Validate shapes, pixel values and modality (or target) indices; returns the target as a (B,) LongTensor on
        the pixels' device, modality ``m``'s own target being ``m`` (``None`` when neither is given)."""
        size, channels = self.config.image_size, self.num_channels
        if pixel_values.dim() != 4 or pixel_values.shape[1] != channels or pixel_values.shape[-2:] != (size, size):
            raise ValueError(
                f"pixel_values must have shape (batch, {channels}, {size}, {size}), got {tuple(pixel_values.shape)}; "
                "use EspMedSamImageProcessor to resize and normalise images"
            )
        check_pixel_values(pixel_values, self.dtype)
        return self.check_modality(modality, pixel_values.shape[0], pixel_values.device, target)

    def check_modality(
        self, modality: torch.Tensor | int | None, batch: int, device: torch.device,
        target: torch.Tensor | int | None = None,
    ) -> torch.LongTensor | None:
        """``modality`` (or ``target``, not both) as a (batch,) LongTensor of target indices on ``device`` after
        checking them, modality ``m``'s own target being ``m`` (``None`` when neither is given)."""
        if target is not None:
            if modality is not None:
                raise ValueError("give modality or target, not both (a target implies its modality)")
            return self._checked_indices(target, batch, device, "target", self.config.all_target_names)
        if modality is None:
            return None
        return self._checked_indices(modality, batch, device, "modality", self.config.modality_names)

    def _checked_indices(
        self, modality: torch.Tensor | int, batch: int, device: torch.device, what: str, names: list[str]
    ) -> torch.LongTensor:
        """``modality`` (or a target) as a (batch,) LongTensor of indices into ``names``; clear errors otherwise."""
        modality = torch.as_tensor(modality, device=device)
        if modality.dim() == 0:
            modality = modality.expand(batch)
        if modality.shape != (batch,) or modality.dtype.is_floating_point:
            raise ValueError(
                f"{what} must be an integer tensor of shape ({batch},), got "
                f"{tuple(modality.shape)} {modality.dtype}"
            )
        if not torch.compiler.is_compiling():
            low, high = int(modality.min()), int(modality.max())
            if low < 0 or high >= len(names):
                bad = low if low < 0 else high
                raise ValueError(
                    f"{what} index {bad} is out of range; expected 0..{len(names) - 1} ({', '.join(names)})"
                )
        return modality.long()

    def decode_embeddings(
        self,
        image_embeddings: torch.Tensor,
        modality: torch.LongTensor,
        labels: torch.Tensor | None = None,
        **outputs: torch.Tensor | tuple[torch.Tensor, ...] | None,
    ) -> EspMedSamOutput:
        """The heads on (B, C, g, g) image embeddings: patch logits and dense prompt, then each image's mask logits
        from its modality's query; with ``labels``, the segmentation loss. ``outputs`` are further output fields."""
        patch_logits, patches = self.patch_map(image_embeddings)
        pred_masks = self.mask_decoder(image_embeddings, self.prompt_generator.encode_patches(patches), modality)
        loss = mask_loss = patch_loss = None
        if labels is not None:
            loss, mask_loss, patch_loss = segmentation_loss(pred_masks, patch_logits, labels, self.config)
        return EspMedSamOutput(
            loss=loss, pred_masks=pred_masks, patch_logits=patch_logits, image_embeddings=image_embeddings,
            modality=modality, mask_loss=mask_loss, patch_loss=patch_loss, **outputs,
        )

    def patch_map(self, image_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The self-patch prompt generator's ``patch_map`` of ``image_embeddings``. Without gradients the result
        for the last embeddings seen is kept with them, so prompts decoded from a cached embedding
        (``get_image_embeddings`` or a forward's ``image_embeddings``, then ``model(image_embeddings=...)``) do not
        run the generator again; the same tensor, unchanged in place, is needed to reuse it."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing():
            return self.prompt_generator.patch_map(image_embeddings)
        cached = _LAST_PATCH_MAPS.get(self)
        version = tensor_version(image_embeddings)
        if cached is not None and cached[0]() is image_embeddings and cached[1] == version:
            return cached[2]
        result = self.prompt_generator.patch_map(image_embeddings)
        _LAST_PATCH_MAPS[self] = (weakref.ref(image_embeddings), version, result)
        return result

    def upscale_masks(self, pred_masks: torch.Tensor) -> torch.Tensor:
        """Low-resolution logits to the input size (bilinear, as the official forward's last step)."""
        size = self.config.image_size
        return F.interpolate(pred_masks, size=(size, size), mode="bilinear", align_corners=False)


def pipeline_code_files(impl: str, source: str | None) -> list[Path]:
    """The file of the pipeline class ``impl`` (``"module.Class"``, as ``custom_pipelines`` names it) and the files
    it imports: beside this module (the package, or remote code whose pipeline was loaded), else in ``source``
    (the folder or Hub repo the model was loaded from). Empty when the code is nowhere to be found."""
    module, _, class_name = impl.rpartition(".")
    if not module.isidentifier() or not class_name.isidentifier():
        return []
    candidates = [Path(__file__).with_name(f"{module}.py")]
    if source and Path(source).is_dir():
        candidates.append(Path(source) / f"{module}.py")
    elif source:
        try:
            candidates.append(Path(HF_MODULES_CACHE) / get_cached_module_file(source, f"{module}.py"))
        except (OSError, ValueError) as error:
            logger.info("no code for pipeline %s in %s: %s", impl, source, error)
    for path in candidates:
        if path.is_file() and f"class {class_name}(" in path.read_text():
            return [path, *(Path(needed) for needed in get_relative_import_files(path))]
    return []


def weights_download_error(repo_id, kwargs: dict) -> tuple[bool, BaseException | None]:
    """Whether the weights of Hub repository ``repo_id`` (with ``from_pretrained``'s ``kwargs``) were fetched
    directly, and the error of doing so (the cause behind huggingface_hub's "not in the cache"; None: the download
    works now). (False, None) for a local path, offline, or a repository, revision or file that is really missing:
    transformers' own message is right then."""
    if os.path.exists(str(repo_id)) or kwargs.get("local_files_only") or huggingface_hub.constants.HF_HUB_OFFLINE:
        return False, None
    options = {key: kwargs[key] for key in ("revision", "cache_dir", "token", "subfolder") if kwargs.get(key)}
    try:
        huggingface_hub.hf_hub_download(str(repo_id), SAFE_WEIGHTS_NAME, **options)
    except (huggingface_hub.errors.RemoteEntryNotFoundError, huggingface_hub.errors.RepositoryNotFoundError,
            huggingface_hub.errors.RevisionNotFoundError):
        return False, None
    except Exception as error:  # noqa: BLE001 - any failure of the download is the cause to report (a timeout or
        # a server error arrives as LocalEntryNotFoundError: "not in the cache", with the real error as its cause)
        while isinstance(error, huggingface_hub.errors.LocalEntryNotFoundError) and error.__cause__ is not None:
            error = error.__cause__
        return True, error
    return True, None


class EspMedSamPreTrainedModel(EspMedSamModelMixin, PreTrainedModel):
    config_class = EspMedSamConfig
    base_model_prefix = "esp_medsam"
    _no_split_modules = ["AggregatorBlock", "QueryDecoupledModalityDecoder"]
    # Stay float32 when loaded or built with dtype=torch.float16 / torch.bfloat16 (strict: bf16 too, and the modules
    # create their tensors in float32): the modality classifier (its argmax routes every image) and the positional
    # encoding's Gaussian matrix (the argument of its sines).
    _keep_in_fp32_modules_strict = ["modality_classifier", "positional_encoding"]
    supports_gradient_checkpointing = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Loads as transformers does; when loading from a Hub repository fails, the weights file is fetched directly
        to find out why, and that error is raised (chained) instead of the message transformers gives.

        transformers asks for ``model.safetensors`` with missing entries allowed, and huggingface_hub turns a timeout
        or a server error into "not found": transformers then tries the other weight names and reports a missing
        ``pytorch_model.bin``. A transient failure is survived: if the direct fetch works, the load is tried again
        (the file is then in the cache)."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except OSError as error:
            fetched, cause = weights_download_error(pretrained_model_name_or_path, kwargs)
            if not fetched:
                raise
            if cause is None:  # the weights download works now: the failure was transient
                return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
            raise OSError(f"{pretrained_model_name_or_path}: downloading {SAFE_WEIGHTS_NAME} failed: "
                          f"{type(cause).__name__}: {cause}") from cause

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Saves as transformers does; with remote code registered, also maps ``AutoModelForImageSegmentation``
        (which the stock image-segmentation pipeline loads) to this class in ``config.json``.

        A config that advertises ``custom_pipelines`` (a model loaded from a folder saved with its pipeline) keeps
        them only together with their code: each pipeline's file and the files it imports are copied next to the
        model code, and entries whose code cannot be found are dropped with a warning. So
        ``save_pretrained``/``push_to_hub`` of a reloaded model give a repo where both pipelines still load. The
        model never imports a pipeline: it copies the files the config names.
        """
        if self._auto_class is not None:
            module = type(self).__module__.rsplit(".", 1)[-1]
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map.setdefault("AutoModelForImageSegmentation", f"{module}.{type(self).__name__}")
            self.config.auto_map = auto_map
        pipeline_files = self._advertised_pipeline_files()
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            for path in pipeline_files:
                shutil.copyfile(path, Path(save_directory) / path.name)
        return result

    def _advertised_pipeline_files(self) -> list[Path]:
        """The code files of the pipelines that the config advertises; entries without code are dropped."""
        advertised = getattr(self.config, "custom_pipelines", None)
        if not advertised:
            return []
        found = {task: pipeline_code_files(entry.get("impl", ""), self.name_or_path)
                 for task, entry in advertised.items()}
        kept = {task: entry for task, entry in advertised.items() if found[task]}
        if len(kept) != len(advertised):
            logger.warning("custom_pipelines %s left out of the saved config: their code is not part of this model",
                           sorted(set(advertised) - set(kept)))
        if kept:
            self.config.custom_pipelines = kept
        else:
            del self.config.custom_pipelines
        return sorted({path for paths in found.values() for path in paths})

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, EspMedSamWindowAttention):
            init.zeros_(module.attention_biases)
            module.init_non_persistent_buffers()
        elif isinstance(module, ParameterBagBlock):
            init.normal_(module.tokens, std=self.config.parameter_bag_config.token_init_std)
            if module.token_bias is not None:
                init.zeros_(module.token_bias)
        else:
            self._init_common_weights(module)


@torch.no_grad()
def fuse_conv_norms(module: nn.Module, kinds: tuple[type[nn.Module], ...]) -> nn.Module:
    """Replace, in place, every submodule of one of ``kinds`` (a Conv-BN pair whose ``fuse()`` returns the single
    equivalent convolution, as timm's TinyViT ``ConvNorm`` and MobileSAM's ``Conv2d_BN`` do) by that convolution."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, kinds):
                setattr(parent, name, child.fuse())
    return module


class EspMedSamModel(EspMedSamPreTrainedModel):
    """ESP-MedSAM: semi-parameter-sharing encoder, self-patch prompt generator, query-decoupled modality decoder.

    ``model(pixel_values, modality)`` segments each image's modality target with no point or box prompt. When
    ``modality`` is omitted the modality classifier chooses it per image.
    """

    def __init__(self, config: EspMedSamConfig):
        super().__init__(config)
        self._share_attn_implementation()
        self.aggregator = ModalityAggregator(config.aggregator_config)
        self.modality_controller = ModalityController(config)
        self.modality_classifier = ModalityClassifier(
            config.aggregator_config.embed_dims[0], config.modality_classifier_hidden_size, config.num_modalities
        )
        self.prompt_generator = SelfPatchPromptGenerator(
            config.prompt_generator_config, config.aggregator_config.neck_dim
        )
        self.mask_decoder = QueryDecoupledModalityDecoder(
            config.decoder_config, config.num_query_rows, config.target_query_rows
        )
        self.prompt_encoder = EspMedSamPromptEncoder(config, self.mask_decoder.positional_encoding)
        self.post_init()

    @property
    def num_channels(self) -> int:
        """Channels of the input images (``check_inputs``)."""
        return self.config.aggregator_config.num_channels

    def segment(
        self,
        pixel_values: torch.FloatTensor,
        given: torch.LongTensor | None,
        labels: torch.FloatTensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
    ) -> EspMedSamOutput:
        """The forward after the input checks: the target ``given`` per image, else the classifier's modality's own;
        with ``output_hidden_states`` (``config.output_hidden_states``) also the image encoder's stage outputs, with
        ``output_attentions`` (``config.output_attentions``) every TinyViT block's window-attention weights
        (computed by the eager attention)."""
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        hidden_states = [] if output_hidden_states else None
        attentions = [] if output_attentions else None
        image_embeddings, modality_logits, chosen = self.encode(pixel_values, given, hidden_states, attentions)
        modality_loss = None
        if labels is not None and given is not None and self.config.modality_loss_weight > 0:
            modality_loss = F.cross_entropy(modality_logits, self.modality_of(given))
        output = self.decode_embeddings(
            image_embeddings, chosen, labels, modality_logits=modality_logits, modality_loss=modality_loss,
            hidden_states=tuple(hidden_states) if hidden_states is not None else None,
            attentions=tuple(attentions) if attentions is not None else None,
        )
        self.name_targets(output)
        if modality_loss is not None:
            output.loss = output.loss + self.config.modality_loss_weight * modality_loss
        return output

    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        modality: torch.LongTensor | None = None,
        labels: torch.FloatTensor | None = None,
        original_sizes: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        input_points: torch.FloatTensor | None = None,
        input_labels: torch.LongTensor | None = None,
        input_boxes: torch.FloatTensor | None = None,
        image_embeddings: torch.FloatTensor | None = None,
        multimask_output: bool = False,
        target: torch.LongTensor | None = None,
        **options: bool | None,
    ) -> EspMedSamOutput | tuple[torch.Tensor, ...]:
        r"""
        The prompt-free forward (see ``EspMedSamModelMixin.forward``), and SamModel's optional prompts, which
        correct the self-prompted mask (``edit_patch_map``, ``keep_inside_boxes``, SAM's point tokens):

        input_points: (B, N, P, 2) x/y points in model-input pixels (``EspMedSamProcessor`` rescales them from
            original-image pixels), N objects of P points each; ``input_labels`` (B, N, P): 1 positive, 0 negative,
            -1 padding (ignored).
        input_boxes: (B, N, 4) x0, y0, x1, y1 boxes in model-input pixels, one per object; the mask stays inside.
        image_embeddings: (B, C, g, g) from ``get_image_embeddings``, instead of ``pixel_values`` (then
            ``modality`` or ``target`` is required: each image decodes its modality's, or its target's, query).
        multimask_output: accepted for SamModel's signature; the decoder has one query per modality, so K = 1.
        target: as ``EspMedSamModelMixin.forward`` takes it; with prompts too, the target's query is decoded.

        With prompts ``pred_masks`` is (B, N, 1, h, w) and ``iou_scores`` (B, N, 1); without, the outputs are the
        prompt-free ones.
        """
        if image_embeddings is None and input_points is None and input_labels is None and input_boxes is None:
            return super().forward(pixel_values, modality, labels, original_sizes, return_dict, target, **options)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if (pixel_values is None) == (image_embeddings is None):
            raise ValueError("pass either pixel_values or image_embeddings (from get_image_embeddings), not both")
        outputs: dict = {}
        if image_embeddings is None:
            given = self.check_inputs(pixel_values, modality, target)
            image_embeddings, outputs["modality_logits"], chosen = self.encode(pixel_values, given)
        else:
            chosen = self.check_embeddings(image_embeddings, modality, target)
        prompts = check_prompts(
            input_points, input_labels, input_boxes, image_embeddings.shape[0], self.config.image_size,
            image_embeddings.device,
        )
        if prompts is None:
            output = self.decode_embeddings(image_embeddings, chosen, labels, **outputs)
        else:
            output = self.decode_prompts(image_embeddings, chosen, prompts, labels, **outputs)
        self.name_targets(output)
        return output if return_dict else output.to_tuple()

    def name_targets(self, output: EspMedSamOutput) -> None:
        """For a model with extra targets: ``output.modality`` holds the decoded target indices; move them to
        ``output.target`` and put their modalities in ``output.modality`` (nothing changes for other models)."""
        if self.config.extra_targets:
            output.target, output.modality = output.modality, self.modality_of(output.modality)

    def check_embeddings(
        self, image_embeddings: torch.Tensor, modality: torch.Tensor | int | None,
        target: torch.Tensor | int | None = None,
    ) -> torch.LongTensor:
        """Check image embeddings passed instead of pixel values, and their (required) modality or target."""
        channels = self.config.aggregator_config.neck_dim
        if image_embeddings.dim() != 4 or image_embeddings.shape[1] != channels:
            raise ValueError(
                f"image_embeddings must have shape (batch, {channels}, g, g) as get_image_embeddings gives them, got "
                f"{tuple(image_embeddings.shape)}"
            )
        if modality is None and target is None:
            raise ValueError(
                "modality is required with image_embeddings: each image decodes its modality's query (the modality "
                "the classifier chose is the prompt-free output's `modality`), or target= its target's"
            )
        return self.check_modality(modality, image_embeddings.shape[0], image_embeddings.device, target)

    def decode_prompts(
        self,
        image_embeddings: torch.Tensor,
        modality: torch.LongTensor,
        prompts: PromptRows,
        labels: torch.Tensor | None = None,
        **outputs: torch.Tensor | None,
    ) -> EspMedSamOutput:
        """The heads with prompts: each object's row gets the image's self-patch map corrected by its prompts
        (``edit_patch_map``) as dense prompt and its points as SAM tokens; a box keeps the mask inside it. With
        ``labels`` (one object per image), the segmentation loss of the prompted masks."""
        batch, objects, size = image_embeddings.shape[0], prompts.num_objects, self.config.image_size
        patch_logits, patches = self.patch_map(image_embeddings)
        rows = image_embeddings.repeat_interleave(objects, dim=0)
        row_modality = modality.repeat_interleave(objects)
        patches = edit_patch_map(patches.repeat_interleave(objects, dim=0), prompts, size)
        masks = self.decode_rows(rows, self.prompt_generator.encode_patches(patches), row_modality, prompts)
        if prompts.boxes is not None:
            masks = keep_inside_boxes(masks, prompts.boxes, size)
        masks = masks.view(batch, objects, 1, *masks.shape[-2:])
        loss = mask_loss = patch_loss = None
        if labels is not None:
            if objects != 1:
                raise ValueError(f"labels with prompts need one object per image (N = 1), got N = {objects}")
            loss, mask_loss, patch_loss = segmentation_loss(masks[:, 0], patch_logits, labels, self.config)
        return EspMedSamOutput(
            loss=loss, pred_masks=masks, patch_logits=patch_logits, image_embeddings=image_embeddings,
            modality=modality, mask_loss=mask_loss, patch_loss=patch_loss, iou_scores=stability_scores(masks),
            **outputs,
        )

    def decode_rows(
        self, rows: torch.Tensor, dense_prompt: torch.Tensor, modality: torch.LongTensor, prompts: PromptRows
    ) -> torch.Tensor:
        """Mask logits (R, 1, h, w) of every object row; its non-padding points join the queries as SAM tokens.
        Rows are decoded in groups of equal point count, so padding points take no part at all."""
        if prompts.points is None:
            return self.mask_decoder(rows, dense_prompt, modality)
        tokens = self.prompt_encoder.embed_points(prompts.points, prompts.labels)
        valid = prompts.labels != -1
        counts = valid.sum(dim=1)
        masks = None
        for count in counts.unique().tolist():
            index = (counts == count).nonzero()[:, 0]
            sparse = tokens[index][valid[index]].view(len(index), count, -1) if count else None
            group = self.mask_decoder(rows[index], dense_prompt[index], modality[index], sparse)
            if masks is None:
                masks = group.new_empty(rows.shape[0], *group.shape[1:])
            masks[index] = group
        return masks

    def encode(
        self,
        pixel_values: torch.FloatTensor,
        given: torch.LongTensor | None,
        hidden_states: list | None = None,
        attentions: list | None = None,
        *,
        controller: ModalityController | None = None,
        last_stage: int | None = None,
    ) -> tuple[torch.FloatTensor, torch.FloatTensor, torch.LongTensor]:
        """The image encoder, the one place its chain runs: stem, modality classifier on the stem's features, the
        TinyViT stages with each image's parameter bag, neck. Returns the image embeddings (B, 256, 64, 64 at 1024
        px), the classifier's logits and the modality each image was encoded with: ``given``, except where it is
        ``-1`` (or ``None`` for all), the classifier's. A list passed as ``hidden_states`` receives the stem's and
        every stage's output, one passed as ``attentions`` every block's window-attention weights.

        For training: ``controller`` replaces the model's parameter bags (a stand-in with the same ``gather``, such
        as distillation's unplugged bags); ``last_stage`` stops after that stage (0: the stem), without the neck,
        and returns its output in place of the embeddings (a frozen prefix's features, cached once).
        """
        features = self.aggregator.stem(pixel_values)
        modality_logits = self.modality_classifier(features)
        predicted = modality_logits.argmax(dim=-1)
        chosen = predicted if given is None else torch.where(given < 0, predicted, given)
        if hidden_states is not None:
            hidden_states.append(features)
        image_embeddings = self.encode_stages(
            features, chosen, last=last_stage, controller=controller, hidden_states=hidden_states,
            attentions=attentions,
        )
        if hidden_states is not None and last_stage is None:
            hidden_states.append(image_embeddings)
        return image_embeddings, modality_logits, chosen

    def modality_of(self, target: torch.LongTensor) -> torch.LongTensor:
        """The modality index of each target index (the same tensor for a model without extra targets)."""
        if not self.config.extra_targets:
            return target
        return torch.tensor(self.config.target_modalities, device=target.device).index_select(0, target)

    def encode_stages(
        self,
        features: torch.FloatTensor,
        modality: torch.LongTensor,
        *,
        first: int = 1,
        last: int | None = None,
        controller: ModalityController | None = None,
        hidden_states: list | None = None,
        attentions: list | None = None,
    ) -> torch.FloatTensor:
        """The encoder from the output of stage ``first - 1`` (the stem's for 1): stages ``first``..``last`` with
        each image's parameter bag (``controller``: the model's bags unless given), then the neck when ``last`` is
        None. ``encode`` runs it after the stem; a feature cache runs the rest of the chain on stored features."""
        controller = self.modality_controller if controller is None else controller
        return self.aggregator.forward_stages(
            features, modality, controller, hidden_states, first, last, attentions=attentions
        )

    def get_image_embeddings(
        self, pixel_values: torch.FloatTensor, modality: torch.LongTensor | int | None = None,
        target: torch.LongTensor | int | None = None,
    ) -> torch.FloatTensor:
        """The image embeddings (B, 256, 64, 64 at 1024 px) of ``pixel_values``, each image encoded with its
        modality's parameter bag (``modality`` as ``forward`` takes it; ``None``: the classifier's choice). SamModel's
        name: encode an image once and decode it many times."""
        given = self.check_inputs(pixel_values, modality, target)
        image_embeddings = self.encode(pixel_values, given)[0]
        if not torch.is_grad_enabled():
            self.patch_map(image_embeddings)  # kept with the embeddings for the prompts that follow
        return image_embeddings

    def predict_modality(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """The modality classifier's logits (B, num_modalities) for images of unknown modality, without decoding a
        mask: the classifier on the encoder's bag-free stem, the same logits ``forward`` returns."""
        self.check_inputs(pixel_values, None)
        return self.modality_classifier(self.aggregator.stem(pixel_values))

    @torch.no_grad()
    def fuse_batchnorm(self) -> "EspMedSamModel":
        """Fold every Conv-BN into a single convolution for inference (the model must be in eval mode).

        The fused model computes the same function with fewer kernels; its state dict no longer matches the
        config, so save the unfused model.
        """
        if self.training:
            raise RuntimeError("fuse_batchnorm() needs eval mode: call model.eval() first")
        fuse_conv_norms(self, (ConvNorm,))
        return self

    @torch.no_grad()
    def optimize_for_inference(self) -> "EspMedSamModel":
        """Eval mode, every Conv-BN folded (:meth:`fuse_batchnorm`) and the convolutions in channels-last memory
        format, in place: the same function (to float rounding) about 1.4x faster on a CPU, where the full-resolution
        MBConv stem is memory-bound. For inference only: the state dict no longer matches the config, so never save
        the optimized model (optimize a copy of one that still trains).
        """
        self.eval().fuse_batchnorm()
        return self.to(memory_format=torch.channels_last)


__all__ = [
    "AggregatorBlock",
    "EspMedSamModel",
    "EspMedSamModelMixin",
    "EspMedSamOutput",
    "EspMedSamPatchEmbed",
    "EspMedSamPatchMerging",
    "EspMedSamPreTrainedModel",
    "EspMedSamPromptEncoder",
    "EspMedSamWindowAttention",
    "ModalityAggregator",
    "ModalityClassifier",
    "ModalityController",
    "ParameterBag",
    "QueryDecoupledModalityDecoder",
    "SelfPatchPromptGenerator",
    "count_parameters",
    "fuse_conv_norms",
]
