"""Configuration of the ESP-MedSAM medical teacher (stage 1 of arXiv 2407.14153).

The teacher is SAM's ViT image encoder (transformers' ``SamVisionEncoder``, so ``facebook/sam-vit-*`` weights load),
kept frozen, with learnable medical tokens on the keys and values of every attention layer and a learnable MLP
beside every block's MLP, plus the student's self-patch prompt generator and query-decoupled modality decoder.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig, SamVisionConfig

from .configuration_esp_medsam import (
    EspMedSamConfigMixin,
    EspMedSamDecoderConfig,
    EspMedSamPromptGeneratorConfig,
)

# SAM's three image encoders (Kirillov et al. 2023, Table 8 / the released checkpoints).
SAM_VIT_PRESETS: dict[str, dict] = {
    "vit-b": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit-l": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit-h": dict(
        hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, global_attn_indexes=(7, 15, 23, 31)
    ),
}
SAM_CHECKPOINTS = {name: f"facebook/sam-{name}" for name in SAM_VIT_PRESETS}
"""Hub repositories of SAM whose vision encoder weights ``EspMedSamTeacherModel.from_sam_pretrained`` loads."""

RANDOM_SAM_INITIALIZER_RANGE = 0.02
"""``initializer_range`` of a SAM encoder that is not loaded from a checkpoint. ``SamVisionConfig``'s 1e-10 assumes
pretrained weights: a randomly initialised encoder would be all but zero, made of denormal numbers (slow on CPUs)."""


def sam_vision_config(preset: str = "vit-b", image_size: int = 1024, random_init: bool = False, **overrides) -> dict:
    """Keyword arguments of transformers' ``SamVisionConfig`` for SAM's ``preset`` encoder at ``image_size``.

    ``random_init``: the encoder will not be loaded from a checkpoint (``RANDOM_SAM_INITIALIZER_RANGE``).
    ``overrides`` replace any argument (a smaller encoder for tests and quick runs).
    """
    if preset not in SAM_VIT_PRESETS:
        raise ValueError(f"unknown SAM preset {preset!r}; expected one of {', '.join(SAM_VIT_PRESETS)}")
    vision = dict(SAM_VIT_PRESETS[preset], image_size=image_size)
    if random_init:
        vision["initializer_range"] = RANDOM_SAM_INITIALIZER_RANGE
    return {**vision, **overrides}


@strict
class EspMedSamTeacherConfig(EspMedSamConfigMixin, PreTrainedConfig):
    r"""Configuration of [`EspMedSamTeacherModel`].

    vision_config: transformers' ``SamVisionConfig`` of the frozen SAM encoder (default: ViT-B at 1024 px).
    num_medical_tokens: learnable tokens appended to the keys and values of every attention layer.
    use_token_bias: a learnable attention-logit bias (per head and token) for the token columns; the tokens have no
        position, so they get no decomposed relative-position term (see ``EspMedSamTeacherVisionAttention``).
    medical_mlp_ratio: hidden ratio of the learnable MLP beside each block's MLP (``x + mlp(y) + medical_mlp(y)``).
    freeze_vision_encoder: keep SAM's weights frozen (the paper's setting).
    modality_names / target_names / focal_loss_weight / patch_loss_weight: see ``EspMedSamConfigMixin``.
    """

    model_type = "esp_medsam_teacher"
    sub_configs_defaults = {
        "vision_config": SamVisionConfig,
        "prompt_generator_config": EspMedSamPromptGeneratorConfig,
        "decoder_config": EspMedSamDecoderConfig,
    }

    vision_config: dict | PreTrainedConfig | None = None
    prompt_generator_config: dict | PreTrainedConfig | None = None
    decoder_config: dict | PreTrainedConfig | None = None
    num_medical_tokens: int = 4
    use_token_bias: bool = True
    medical_mlp_ratio: float = 0.25
    token_init_std: float = 0.02
    freeze_vision_encoder: bool = True

    def __post_init__(self, **kwargs):
        if self.num_medical_tokens < 0:
            raise ValueError(f"num_medical_tokens must be >= 0, got {self.num_medical_tokens}")
        super().__post_init__(**kwargs)
        vision = self.vision_config
        if vision.output_channels != self.decoder_config.hidden_size:
            raise ValueError(
                f"the SAM encoder's output_channels ({vision.output_channels}) must equal the decoder hidden_size "
                f"({self.decoder_config.hidden_size})"
            )
        if vision.hidden_size % vision.num_attention_heads:
            raise ValueError("vision_config.hidden_size must be divisible by num_attention_heads")
        grid = self.embedding_grid_size
        cells = 2**self.prompt_generator_config.num_downsample_layers
        if vision.image_size % vision.patch_size or grid % cells:
            raise ValueError(
                f"image_size {vision.image_size} must be a multiple of patch_size {vision.patch_size} times {cells}"
            )

    @property
    def image_size(self) -> int:
        return int(self.vision_config.image_size)

    @property
    def embedding_grid_size(self) -> int:
        """Side of the image-embedding grid (64 for SAM at 1024 px, as the student's)."""
        return self.image_size // int(self.vision_config.patch_size)

    @property
    def mask_size(self) -> int:
        return self.embedding_grid_size * 4

    @classmethod
    def from_preset(
        cls, name: str = "vit-b", image_size: int = 1024, random_init: bool = False, **kwargs
    ) -> "EspMedSamTeacherConfig":
        """A teacher on SAM's ViT-B, ViT-L or ViT-H (``"vit-b"``, ``"vit-l"``, ``"vit-h"``); ``random_init`` for an
        encoder that will not be loaded from SAM's weights (see ``sam_vision_config``)."""
        vision = sam_vision_config(name, image_size, random_init, **kwargs.pop("vision_config", {}))
        return cls(vision_config=vision, **kwargs)

    @classmethod
    def tiny(cls, image_size: int = 128, **kwargs) -> "EspMedSamTeacherConfig":
        """A very small teacher with the same embedding grid and heads as ``EspMedSamConfig.tiny(image_size)``; its
        encoder is always randomly initialised."""
        defaults = dict(
            vision_config=sam_vision_config(
                image_size=image_size, random_init=True, hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                mlp_dim=96, output_channels=32, patch_size=16, window_size=4, global_attn_indexes=(1,),
                num_pos_feats=16,
            ),
            prompt_generator_config=dict(hidden_size=16),
            decoder_config=dict(hidden_size=32, mlp_dim=64, num_attention_heads=2),
            num_medical_tokens=2,
            medical_mlp_ratio=0.5,
        )
        defaults.update(kwargs)
        return cls(**defaults)


__all__ = [
    "RANDOM_SAM_INITIALIZER_RANGE",
    "SAM_CHECKPOINTS",
    "SAM_VIT_PRESETS",
    "EspMedSamTeacherConfig",
    "sam_vision_config",
]
