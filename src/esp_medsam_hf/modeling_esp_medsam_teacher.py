"""The ESP-MedSAM medical teacher (stage 1 of arXiv 2407.14153) as a transformers model.

SAM's ViT image encoder (transformers' ``SamVisionEncoder``, unchanged, so ``facebook/sam-vit-*`` weights load into
``vision_encoder``) is kept frozen. Every encoder layer gets a ``MedicalLayer``:

- learnable medical tokens appended to the keys and values of its attention. SAM's attention adds a decomposed
  relative-position term ``q . R_h[i_h - j_h] + q . R_w[i_w - j_w]`` for query i and key j on the patch grid. A
  token has no grid position, so there is no relative offset to look up: its columns get no relative-position term
  but a learnable logit bias per head and token (zero at start), the same role as the official student's token bias;
  it lets training decide how much attention the tokens take without inventing a position for them;
- a learnable MLP beside the block's MLP, on the same normalised input: ``x + mlp(ln2(x)) + medical_mlp(ln2(x))``.
  Its output layer starts at zero, so an untrained teacher computes SAM's embeddings except for the tokens.

The heads are the student's: ``SelfPatchPromptGenerator`` and ``QueryDecoupledModalityDecoder``, with the same
output (``EspMedSamOutput``) and loss (mask ``lambda * focal + (1 - lambda) * dice`` plus patch BCE). SAM's neck
gives 256 x 64 x 64 embeddings at 1024 px, the student's grid, so the teacher's embeddings are distillation targets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, SamVisionConfig
from transformers import initialization as init
from transformers.models.sam.modeling_sam import SamVisionAttention, SamVisionEncoder, SamVisionLayer

from .configuration_esp_medsam_teacher import SAM_CHECKPOINTS, EspMedSamTeacherConfig
from .modeling_esp_medsam import (
    EspMedSamOutput,
    QueryDecoupledModalityDecoder,
    SelfPatchPromptGenerator,
    init_common_weights,
)
from .losses import segmentation_loss


class MedicalLayer(nn.Module):
    """The learnable medical parameters of one SAM encoder layer: key/value tokens, their logit bias, a parallel MLP."""

    def __init__(self, vision_config: SamVisionConfig, config: EspMedSamTeacherConfig):
        super().__init__()
        dim, heads = vision_config.hidden_size, vision_config.num_attention_heads
        tokens = config.num_medical_tokens
        self.key_tokens = nn.Parameter(torch.zeros(heads, tokens, dim // heads))
        self.value_tokens = nn.Parameter(torch.zeros(heads, tokens, dim // heads))
        self.token_bias = nn.Parameter(torch.zeros(heads, tokens)) if config.use_token_bias and tokens else None
        hidden = max(1, int(dim * config.medical_mlp_ratio))
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def medical_attention(attn: SamVisionAttention, hidden_states: torch.Tensor, medical: MedicalLayer) -> torch.Tensor:
    """SAM's attention (relative positions included) with the medical tokens appended to its keys and values."""
    batch, height, width, _ = hidden_states.shape
    heads, length = attn.num_attention_heads, height * width
    qkv = attn.qkv(hidden_states).reshape(batch, length, 3, heads, -1).permute(2, 0, 3, 1, 4)
    query, key, value = qkv.unbind(0)  # (B, heads, N, head_dim)
    bias = None
    if attn.use_rel_pos:
        flat_query = query.reshape(batch * heads, length, -1)
        bias = attn.get_decomposed_rel_pos(flat_query, attn.rel_pos_h, attn.rel_pos_w, (height, width), (height, width))
        bias = bias.reshape(batch, heads, length, length).to(query.dtype)
    num_tokens = medical.key_tokens.shape[1]
    if num_tokens:
        key = torch.cat([key, medical.key_tokens.to(key.dtype).expand(batch, -1, -1, -1)], dim=2)
        value = torch.cat([value, medical.value_tokens.to(value.dtype).expand(batch, -1, -1, -1)], dim=2)
        if medical.token_bias is not None:
            token_bias = medical.token_bias.to(query.dtype)[None, :, None, :].expand(batch, heads, length, num_tokens)
        else:
            token_bias = query.new_zeros(batch, heads, length, num_tokens)
        grid_bias = bias if bias is not None else query.new_zeros(batch, heads, length, length)
        bias = torch.cat([grid_bias, token_bias], dim=-1)
    # SDPA's default scale is head_dim ** -0.5, SAM's ``attn.scale``.
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
    out = out.view(batch, heads, height, width, -1).permute(0, 2, 3, 1, 4).reshape(batch, height, width, -1)
    return attn.proj(out)


def medical_layer_forward(layer: SamVisionLayer, hidden_states: torch.Tensor, medical: MedicalLayer) -> torch.Tensor:
    """``SamVisionLayer.forward`` with the medical tokens in the attention and the medical MLP beside the MLP."""
    residual = hidden_states
    x = layer.layer_norm1(hidden_states)
    if layer.window_size > 0:
        height, width = x.shape[1], x.shape[2]
        x, padding = layer.window_partition(x, layer.window_size)
    x = medical_attention(layer.attn, x, medical)
    if layer.window_size > 0:
        x = layer.window_unpartition(x, layer.window_size, padding, (height, width))
    x = residual + x
    normed = layer.layer_norm2(x)
    return x + layer.mlp(normed) + medical.mlp(normed)


class EspMedSamTeacherPreTrainedModel(PreTrainedModel):
    config_class = EspMedSamTeacherConfig
    base_model_prefix = "esp_medsam_teacher"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["SamVisionLayer", "QueryDecoupledModalityDecoder"]
    # The decoder's positional encoding stays float32 under dtype=torch.float16 / torch.bfloat16 (see the student).
    _keep_in_fp32_modules = ["positional_encoding"]
    _keep_in_fp32_modules_strict = ["positional_encoding"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, MedicalLayer):
            init.normal_(module.key_tokens, std=self.config.token_init_std)
            init.normal_(module.value_tokens, std=self.config.token_init_std)
            if module.token_bias is not None:
                init.zeros_(module.token_bias)
            init.trunc_normal_(module.fc1.weight, std=std)
            init.zeros_(module.fc1.bias)
            init.zeros_(module.fc2.weight)
            init.zeros_(module.fc2.bias)
        else:
            init_common_weights(module, std, self.config.decoder_config.positional_encoding_scale)


class EspMedSamTeacherModel(EspMedSamTeacherPreTrainedModel):
    """The medical teacher: frozen SAM ViT encoder + medical tokens and MLPs, with the student's SPPG and QDMD.

    ``model(pixel_values, modality, labels=None)`` returns an ``EspMedSamOutput`` like ``EspMedSamModel`` (without
    modality logits: the teacher is always told the modality). ``model.get_image_embeddings(pixel_values,
    medical=False)`` gives the plain SAM encoder's embeddings (the modality-common distillation target).
    """

    def __init__(self, config: EspMedSamTeacherConfig):
        super().__init__(config)
        # the medical attention always uses SDPA; naming it keeps transformers from warning about an unset choice
        config.vision_config._attn_implementation = "sdpa"
        self.vision_encoder = SamVisionEncoder(config.vision_config)
        self.medical_layers = nn.ModuleList(
            [MedicalLayer(config.vision_config, config) for _ in range(config.vision_config.num_hidden_layers)]
        )
        neck_dim = config.vision_config.output_channels
        self.prompt_generator = SelfPatchPromptGenerator(config.prompt_generator_config, neck_dim)
        self.mask_decoder = QueryDecoupledModalityDecoder(config.decoder_config, config.num_modalities)
        self.post_init()
        if config.freeze_vision_encoder:
            self.vision_encoder.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """As transformers' (loading replaces the parameters, so the SAM encoder is frozen again afterwards)."""
        model = super().from_pretrained(*args, **kwargs)
        if model.config.freeze_vision_encoder:
            model.vision_encoder.requires_grad_(False)
        return model

    @classmethod
    def from_sam_pretrained(
        cls, sam_name_or_path: str = SAM_CHECKPOINTS["vit-b"], config: EspMedSamTeacherConfig | None = None, **kwargs
    ) -> "EspMedSamTeacherModel":
        """A teacher whose encoder holds SAM's pretrained weights (e.g. ``facebook/sam-vit-huge`` or a local folder).

        ``kwargs`` go to ``SamVisionModel.from_pretrained`` (``revision``, ``cache_dir``, ...). The medical tokens,
        MLPs and heads are freshly initialised; ``config``'s vision part is replaced by the checkpoint's.
        """
        from transformers import SamVisionModel

        vision = SamVisionModel.from_pretrained(sam_name_or_path, **kwargs)
        config = config or EspMedSamTeacherConfig()
        config = EspMedSamTeacherConfig.from_dict({**config.to_dict(), "vision_config": vision.config.to_dict()})
        model = cls(config)
        model.vision_encoder.load_state_dict(vision.vision_encoder.state_dict())
        return model

    def get_image_embeddings(self, pixel_values: torch.Tensor, medical: bool = True) -> torch.Tensor:
        """(B, C, g, g) embeddings; ``medical=False`` runs SAM's encoder alone (no tokens, no medical MLPs)."""
        encoder = self.vision_encoder
        if not medical:
            return encoder(pixel_values).last_hidden_state
        x = encoder.patch_embed(pixel_values)
        if encoder.pos_embed is not None:
            x = x + encoder.pos_embed
        for layer, medical_layer in zip(encoder.layers, self.medical_layers):
            x = medical_layer_forward(layer, x, medical_layer)
        return encoder.neck(x)

    def check_inputs(self, pixel_values: torch.Tensor, modality: torch.Tensor | None) -> torch.LongTensor:
        size = self.config.image_size
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3 or pixel_values.shape[-2:] != (size, size):
            raise ValueError(
                f"pixel_values must have shape (batch, 3, {size}, {size}), got {tuple(pixel_values.shape)}; "
                "use EspMedSamImageProcessor to resize and normalise images"
            )
        if modality is None:
            raise ValueError("the teacher needs the modality of every image (it has no modality classifier)")
        modality = torch.as_tensor(modality, device=pixel_values.device)
        if modality.dim() == 0:
            modality = modality.expand(pixel_values.shape[0])
        if modality.shape != (pixel_values.shape[0],) or modality.dtype.is_floating_point:
            raise ValueError(f"modality must be an integer tensor of shape ({pixel_values.shape[0]},)")
        low, high = int(modality.min()), int(modality.max())
        if low < 0 or high >= self.config.num_modalities:
            raise ValueError(f"modality index out of range; expected 0..{self.config.num_modalities - 1}")
        return modality.long()

    def forward(
        self,
        pixel_values: torch.FloatTensor,
        modality: torch.LongTensor | None = None,
        labels: torch.FloatTensor | None = None,
        original_sizes: torch.LongTensor | None = None,
        return_dict: bool | None = None,
    ) -> EspMedSamOutput | tuple[torch.Tensor, ...]:
        r"""
        pixel_values: (B, 3, S, S) images from ``EspMedSamImageProcessor``.
        modality: (B,) modality indices (required); a batch may mix modalities.
        labels: (B, 1, H, W) binary masks; when given, ``loss`` = mask loss + patch_loss_weight * patch loss.
        original_sizes: the image processor's sizes, accepted so that ``model(**processor(...))`` works; unused.
        return_dict: ``False`` returns ``EspMedSamOutput.to_tuple()`` (``config.return_dict``).
        Any other argument is a ``TypeError``.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        modality = self.check_inputs(pixel_values, modality)
        image_embeddings = self.get_image_embeddings(pixel_values)
        patch_logits, dense_prompt = self.prompt_generator(image_embeddings)
        pred_masks = self.mask_decoder(image_embeddings, dense_prompt, modality)
        loss = mask_loss = patch_loss = None
        if labels is not None:
            loss, mask_loss, patch_loss = segmentation_loss(pred_masks, patch_logits, labels, self.config)
        output = EspMedSamOutput(
            loss=loss,
            pred_masks=pred_masks,
            patch_logits=patch_logits,
            image_embeddings=image_embeddings,
            modality=modality,
            mask_loss=mask_loss,
            patch_loss=patch_loss,
        )
        return output if return_dict else output.to_tuple()

    def upscale_masks(self, pred_masks: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        return F.interpolate(pred_masks, size=(size, size), mode="bilinear", align_corners=False)


def register() -> None:
    """Register the teacher with the Auto classes, and for remote code (saved folders load with trust_remote_code)."""
    from transformers import AutoConfig, AutoModel

    AutoConfig.register(EspMedSamTeacherConfig.model_type, EspMedSamTeacherConfig, exist_ok=True)
    AutoModel.register(EspMedSamTeacherConfig, EspMedSamTeacherModel, exist_ok=True)
    EspMedSamTeacherConfig.register_for_auto_class()
    EspMedSamTeacherModel.register_for_auto_class("AutoModel")


# Only the installed package registers: a copy loaded as remote code (transformers_modules.*) must not replace
# the package's classes in the Auto mappings of a process that has both.
if __name__.startswith("esp_medsam_hf."):
    register()

__all__ = ["EspMedSamTeacherModel", "EspMedSamTeacherPreTrainedModel", "MedicalLayer"]
