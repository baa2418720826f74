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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from timm.models.tiny_vit import Attention as TinyVitAttention
from timm.models.tiny_vit import ConvLayer, ConvNorm, NormMlp
from timm.models.tiny_vit import PatchMerging as TinyVitPatchMerging
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.dynamic_module_utils import custom_object_save
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.sam.modeling_sam import SamFeedForward, SamTwoWayTransformer, eager_attention_forward
from transformers.utils import ModelOutput

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
    """

    is_causal = False

    def __init__(self, dim: int, num_heads: int, window_size: int, config: EspMedSamAggregatorConfig):
        head_dim = dim // num_heads
        super().__init__(dim, head_dim, num_heads, attn_ratio=1, resolution=(window_size, window_size))
        self.norm.eps = config.layer_norm_eps
        self.config = config

    def forward(self, x: torch.Tensor, bag: GatheredBagBlock, windows_per_image: int) -> torch.Tensor:
        num_windows, length, _ = x.shape
        # Indexed on every call: timm's eval-mode cache goes stale when weights are loaded after .eval().
        bias = self.attention_biases[:, self.attention_bias_idxs].to(x.dtype)  # (heads, N, N)
        x = self.norm(x)
        q, k, v = (
            self.qkv(x)
            .view(num_windows, length, self.num_heads, -1)
            .split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        )
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        mask = bias.unsqueeze(0)
        if bag.tokens is not None and bag.shared:
            # One bag for the whole batch: its tokens are broadcast to every window (no per-window copy before the
            # join) and the mask is one (1, heads, N, N + T) tensor that SDPA broadcasts over the windows.
            num_tokens = bag.tokens.shape[1]
            tokens = bag.tokens.to(x.dtype).expand(num_windows, -1, -1, -1)
            k = torch.cat([k, tokens], dim=2)
            v = torch.cat([v, tokens], dim=2)
            token_bias = (
                bag.token_bias.to(x.dtype).expand(self.num_heads, length, num_tokens)
                if bag.token_bias is not None
                else bias.new_zeros(self.num_heads, length, num_tokens)
            )
            mask = torch.cat([bias, token_bias], dim=-1).unsqueeze(0)
        elif bag.tokens is not None:
            tokens = bag.tokens.to(x.dtype).repeat_interleave(windows_per_image, dim=0)
            k = torch.cat([k, tokens], dim=2)
            v = torch.cat([v, tokens], dim=2)
            num_tokens = tokens.shape[2]
            if bag.token_bias is not None:
                token_bias = bag.token_bias.to(x.dtype).repeat_interleave(windows_per_image, dim=0)
                token_bias = token_bias[:, None, None, :].expand(num_windows, self.num_heads, length, num_tokens)
            else:
                token_bias = x.new_zeros(num_windows, self.num_heads, length, num_tokens)
            mask = torch.cat([mask.expand(num_windows, -1, -1, -1), token_bias], dim=-1)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, _ = attention(self, q, k, v, mask, scaling=self.scale, dropout=0.0)
        return self.proj(out.reshape(num_windows, length, self.out_dim))


class AggregatorBlock(GradientCheckpointingLayer):
    """A TinyViT block: windowed attention, depthwise local conv, then ``x + mlp(x) + bag_mlp(x)``."""

    def __init__(self, dim: int, num_heads: int, window_size: int, config: EspMedSamAggregatorConfig):
        super().__init__()
        self.window_size = window_size
        self.attn = EspMedSamWindowAttention(dim, num_heads, window_size, config)
        pad = config.local_conv_size // 2
        self.local_conv = ConvNorm(dim, dim, config.local_conv_size, 1, pad, groups=dim)
        self.mlp = NormMlp(dim, int(dim * config.mlp_ratio), norm_layer=nn.LayerNorm, act_layer=nn.GELU)
        self.mlp.norm.eps = config.layer_norm_eps

    def forward(self, hidden_states: torch.Tensor, bag: GatheredBagBlock) -> torch.Tensor:
        batch, height, width, channels = hidden_states.shape
        ws = self.window_size
        pad_b, pad_r = (ws - height % ws) % ws, (ws - width % ws) % ws
        x = F.pad(hidden_states, (0, 0, 0, pad_r, 0, pad_b)) if pad_b or pad_r else hidden_states
        ph, pw = height + pad_b, width + pad_r
        nh, nw = ph // ws, pw // ws
        windows = x.view(batch, nh, ws, nw, ws, channels).transpose(2, 3).reshape(batch * nh * nw, ws * ws, channels)
        windows = self.attn(windows, bag, nh * nw)
        x = windows.view(batch, nh, nw, ws, ws, channels).transpose(2, 3).reshape(batch, ph, pw, channels)
        x = hidden_states + x[:, :height, :width]
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
    ) -> torch.Tensor:
        """Stages ``first``..``last`` (1-based; stage 0 is the stem) with each image's parameter bag plugged in, then
        the neck when ``last`` is None (run to the end): (B, C, g, g). ``features`` is the output of stage
        ``first - 1``; a frozen prefix of the encoder can so be computed once and the rest run on it.

        When a list is given as ``hidden_states``, each stage's output (B, C, H, W) is appended to it.
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
            single = single_modality(modality)
        for stage in stages:
            x = stage.downsample(x).permute(0, 2, 3, 1)
            for block in stage.blocks:
                bag = (
                    controller.gather(block_index, modality)
                    if single is None
                    else controller.gather(block_index, modality, single)
                )
                x = block(x, bag)
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
        self.norm = nn.LayerNorm(features)
        self.fc1 = nn.Linear(features, hidden_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_size, num_modalities)

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

    def forward(self, image_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (patch_logits (B,1,p,p), dense_prompt (B,C,g,g)); no gradient flows through the binarisation."""
        patch_logits = self.patch_generator(image_embeddings)
        patches = (torch.sigmoid(patch_logits.detach()) >= self.threshold).to(image_embeddings.dtype)
        patches = F.interpolate(patches, size=image_embeddings.shape[-2:], mode="nearest")
        return patch_logits, self.dense_prompt_encoder(patches)


# ----------------------------------------------------------------------------------------------------------------
# Query-decoupled modality decoder
# ----------------------------------------------------------------------------------------------------------------


class RandomFourierPositionalEncoding(nn.Module):
    """SAM's dense positional encoding of the embedding grid (a fixed Gaussian matrix, stored as a buffer).

    transformers' ``SamPositionalEmbedding`` holds the matrix as a trainable ``nn.Parameter``; SAM and ESP-MedSAM
    keep it fixed, so it is a buffer here.
    """

    def __init__(self, num_features: int, scale: float):
        super().__init__()
        self.register_buffer("gaussian_matrix", scale * torch.randn(2, num_features))

    def forward(self, size: int) -> torch.Tensor:
        """(1, 2 * num_features, size, size), cell centres mapped to [-1, 1], x before y; computed in float32
        whatever the model's dtype (sines of bf16 arguments are too coarse)."""
        matrix = self.gaussian_matrix.float()
        centres = (torch.arange(size, device=matrix.device, dtype=matrix.dtype) + 0.5) / size
        y, x = torch.meshgrid(centres, centres, indexing="ij")
        coords = (2 * torch.stack([x, y], dim=-1) - 1) @ matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1).permute(2, 0, 1).unsqueeze(0)


class QueryDecoupledModalityDecoder(nn.Module):
    """SAM's two-way transformer over image embedding + dense prompt with one learned mask query per modality.

    Every image decodes only its own modality's query: the hypernetwork runs on that query alone and its dot
    product with the upscaled image features gives the mask. An extra target of a modality (``target_modalities``
    beyond the first ``num_modalities``) has its own query in ``target_queries``, which replaces its modality's
    query for the images of that target, so the other targets' queries, and masks, stay as they were.
    """

    def __init__(self, config: EspMedSamDecoderConfig, num_modalities: int, target_modalities: list[int] = ()):
        super().__init__()
        dim = config.hidden_size
        self.num_modalities = num_modalities
        self.mask_queries = nn.Embedding(num_modalities + config.num_extra_queries, dim)
        extra = list(target_modalities)[num_modalities:]
        if extra:
            self.target_queries = nn.ParameterList([nn.Parameter(torch.zeros(dim)) for _ in extra])
            # a plain list, not a buffer: from_pretrained leaves a non-persistent buffer uninitialised
            self.query_rows = list(target_modalities)
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
        """(B, 1, N, C) queries of each image and the (B,) row of its own query: the stored queries, with an extra
        target's query in its modality's row (the stored queries alone when no image is of an extra target)."""
        batch = target.shape[0]
        queries = self.mask_queries.weight.unsqueeze(0).expand(batch, -1, -1)
        if not hasattr(self, "target_queries") or not bool((target >= self.num_modalities).any()):
            return queries.unsqueeze(1), target
        rows = torch.tensor(self.query_rows, device=target.device).index_select(0, target)
        own = torch.cat([self.mask_queries.weight[: self.num_modalities], torch.stack(list(self.target_queries))])
        chosen = torch.arange(queries.shape[1], device=target.device)[None] == rows[:, None]
        queries = torch.where(chosen[..., None], own.index_select(0, target)[:, None], queries)
        return queries.unsqueeze(1), rows

    def forward(
        self, image_embeddings: torch.Tensor, dense_prompt: torch.Tensor, modality: torch.LongTensor
    ) -> torch.Tensor:
        """Mask logits (B, 1, 4g, 4g); ``modality`` is each image's target index (its modality's for a model
        without extra targets)."""
        batch, channels, height, width = image_embeddings.shape
        queries, modality = self.queries_for(modality)
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
        options: the model's own options, those of its ``segment`` (the student's ``output_hidden_states``); any
            other argument is a ``TypeError``.
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
        if target is not None:
            if modality is not None:
                raise ValueError("give modality or target, not both (a target implies its modality)")
            return self._checked_indices(pixel_values, target, "target", self.config.all_target_names)
        if modality is None:
            return None
        return self._checked_indices(pixel_values, modality, "modality", self.config.modality_names)

    def _checked_indices(self, pixel_values: torch.Tensor, modality, what: str, names: list[str]) -> torch.LongTensor:
        """``modality`` (or a target) as a (B,) LongTensor of indices into ``names``; clear errors otherwise."""
        modality = torch.as_tensor(modality, device=pixel_values.device)
        if modality.dim() == 0:
            modality = modality.expand(pixel_values.shape[0])
        if modality.shape != (pixel_values.shape[0],) or modality.dtype.is_floating_point:
            raise ValueError(
                f"{what} must be an integer tensor of shape ({pixel_values.shape[0]},), got "
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
        patch_logits, dense_prompt = self.prompt_generator(image_embeddings)
        pred_masks = self.mask_decoder(image_embeddings, dense_prompt, modality)
        loss = mask_loss = patch_loss = None
        if labels is not None:
            loss, mask_loss, patch_loss = segmentation_loss(pred_masks, patch_logits, labels, self.config)
        return EspMedSamOutput(
            loss=loss, pred_masks=pred_masks, patch_logits=patch_logits, image_embeddings=image_embeddings,
            modality=modality, mask_loss=mask_loss, patch_loss=patch_loss, **outputs,
        )

    def upscale_masks(self, pred_masks: torch.Tensor) -> torch.Tensor:
        """Low-resolution logits to the input size (bilinear, as the official forward's last step)."""
        size = self.config.image_size
        return F.interpolate(pred_masks, size=(size, size), mode="bilinear", align_corners=False)


class EspMedSamPreTrainedModel(EspMedSamModelMixin, PreTrainedModel):
    config_class = EspMedSamConfig
    base_model_prefix = "esp_medsam"
    _no_split_modules = ["AggregatorBlock", "QueryDecoupledModalityDecoder"]
    # Stay float32 when loaded with dtype=torch.float16 / torch.bfloat16: the modality classifier (its argmax
    # routes every image) and the positional encoding's Gaussian matrix (the argument of its sines).
    _keep_in_fp32_modules = ["modality_classifier", "positional_encoding"]
    _keep_in_fp32_modules_strict = ["modality_classifier", "positional_encoding"]
    supports_gradient_checkpointing = True

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Saves as transformers does; with remote code registered, also maps ``AutoModelForImageSegmentation``
        (which the stock image-segmentation pipeline loads) to this class in ``config.json``.

        A config that advertises ``custom_pipelines`` (a model loaded from a folder saved with its pipeline) keeps
        them only together with their code: this package's pipeline file and the modules it imports are written
        next to the model code, and entries whose code is not available here are dropped with a warning. So
        ``save_pretrained``/``push_to_hub`` of a reloaded model give a repo where both pipelines still load.
        """
        if self._auto_class is not None:
            module = type(self).__module__.rsplit(".", 1)[-1]
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map.setdefault("AutoModelForImageSegmentation", f"{module}.{type(self).__name__}")
            self.config.auto_map = auto_map
        pipeline_class = self._advertised_pipeline_class()
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if pipeline_class is not None and kwargs.get("is_main_process", True):
            custom_object_save(pipeline_class, save_directory)
        return result

    def _advertised_pipeline_class(self) -> type | None:
        """The pipeline class to save with the model when the config advertises it (other entries are dropped)."""
        advertised = getattr(self.config, "custom_pipelines", None)
        if not advertised:
            return None
        # A lazy relative import: remote code loading this module also fetches the pipeline's files.
        from .pipeline_esp_medsam import EspMedSamSegmentationPipeline

        ours = f"{EspMedSamSegmentationPipeline.__module__.rsplit('.', 1)[-1]}.{EspMedSamSegmentationPipeline.__name__}"
        kept = {task: entry for task, entry in advertised.items() if entry.get("impl") == ours}
        if len(kept) != len(advertised):
            dropped = sorted(set(advertised) - set(kept))
            logger.warning("custom_pipelines %s left out of the saved config: their code is not part of this model",
                           dropped)
        if kept:
            self.config.custom_pipelines = kept
            return EspMedSamSegmentationPipeline
        del self.config.custom_pipelines
        return None

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
            config.decoder_config, config.num_modalities, config.target_modalities
        )
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
    ) -> EspMedSamOutput:
        """The forward after the input checks: the target ``given`` per image, else the classifier's modality's own;
        with ``output_hidden_states`` (``config.output_hidden_states``) also the image encoder's stage outputs."""
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        hidden_states = [] if output_hidden_states else None
        image_embeddings, modality_logits, chosen = self.encode(pixel_values, given, hidden_states)
        modality_loss = None
        if labels is not None and given is not None and self.config.modality_loss_weight > 0:
            modality_loss = F.cross_entropy(modality_logits, self.modality_of(given))
        output = self.decode_embeddings(
            image_embeddings, chosen, labels, modality_logits=modality_logits, modality_loss=modality_loss,
            hidden_states=tuple(hidden_states) if hidden_states is not None else None,
        )
        if self.config.extra_targets:
            output.target, output.modality = chosen, self.modality_of(chosen)
        if modality_loss is not None:
            output.loss = output.loss + self.config.modality_loss_weight * modality_loss
        return output

    def encode(
        self, pixel_values: torch.FloatTensor, given: torch.LongTensor | None, hidden_states: list | None = None
    ) -> tuple[torch.FloatTensor, torch.FloatTensor, torch.LongTensor]:
        """The image encoder, the one place its chain runs: stem, modality classifier on the stem's features, the
        TinyViT stages with each image's parameter bag, neck. Returns the image embeddings (B, 256, 64, 64 at 1024
        px), the classifier's logits and the modality each image was encoded with (``given``, else the
        classifier's). A list passed as ``hidden_states`` receives the stem's and every stage's output."""
        features = self.aggregator.stem(pixel_values)
        modality_logits = self.modality_classifier(features)
        chosen = given if given is not None else modality_logits.argmax(dim=-1)
        if hidden_states is not None:
            hidden_states.append(features)
        image_embeddings = self.aggregator.forward_stages(
            features, chosen, self.modality_controller, hidden_states=hidden_states
        )
        if hidden_states is not None:
            hidden_states.append(image_embeddings)
        return image_embeddings, modality_logits, chosen

    def modality_of(self, target: torch.LongTensor) -> torch.LongTensor:
        """The modality index of each target index (the same tensor for a model without extra targets)."""
        if not self.config.extra_targets:
            return target
        return torch.tensor(self.config.target_modalities, device=target.device).index_select(0, target)

    def get_image_embeddings(
        self, pixel_values: torch.FloatTensor, modality: torch.LongTensor | int | None = None,
        target: torch.LongTensor | int | None = None,
    ) -> torch.FloatTensor:
        """The image embeddings (B, 256, 64, 64 at 1024 px) of ``pixel_values``, each image encoded with its
        modality's parameter bag (``modality`` as ``forward`` takes it; ``None``: the classifier's choice). SamModel's
        name: encode an image once and decode it many times."""
        given = self.check_inputs(pixel_values, modality, target)
        return self.encode(pixel_values, given)[0]

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
