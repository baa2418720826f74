"""Configuration of ESP-MedSAM (arXiv 2407.14153): the modality aggregator, the parameter bags, the self-patch prompt
generator and the query-decoupled modality decoder.

Defaults reproduce the official release (xq141839/ESP-MedSAM): a MobileSAM-style TinyViT-5M aggregator at 1024 px,
one key/value token with a logit bias and one parallel MLP per attention block in every parameter bag, a one-layer
patch generator (32x32 cells), and a SAM two-way transformer decoder with one mask query per modality plus one
extra query that only takes part in attention.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

MODALITY_NAMES: tuple[str, ...] = ("dermoscopy", "x-ray", "ultrasound", "fundus", "microscopy", "colonoscopy")
"""The six modalities in the official query order (the index is the mask query the official weights use)."""

TARGET_NAMES: tuple[str, ...] = (
    "skin lesion",
    "lung fields",
    "breast tumour",
    "retinal vessels",
    "cell nuclei",
    "polyp",
)
"""What is segmented for each modality, in the same order as ``MODALITY_NAMES``."""


class EspMedSamModalitiesMixin:
    """Lookup of modalities by name or index in ``self.modality_names``: the configs and the processor."""

    modality_names: list[str]

    @property
    def num_modalities(self) -> int:
        """Number of modalities (of mask queries, and of parameter bags in the student)."""
        return len(self.modality_names)

    def modality_index(self, modality: int | str) -> int:
        """Index of ``modality`` (a name or an index) among ``modality_names``; ``ValueError`` names the choices."""
        names = self.modality_names
        if isinstance(modality, str):
            if modality not in names:
                raise ValueError(f"unknown modality {modality!r}; expected one of {list(names)}")
            return list(names).index(modality)
        if isinstance(modality, bool) or not isinstance(modality, numbers.Integral):
            raise TypeError(
                f"modality must be a name ({', '.join(names)}) or an integer index, "
                f"got {type(modality).__name__} {modality!r}"
            )
        index = int(modality)
        if not 0 <= index < len(names):
            raise ValueError(
                f"modality index {index} is out of range; expected 0..{len(names) - 1} ({', '.join(names)})"
            )
        return index


@dataclass(kw_only=True)
class EspMedSamConfigMixin(EspMedSamModalitiesMixin):
    r"""The fields and checks the student's and the teacher's configs share.

    modality_names: the modalities, in mask-query order (default: the official six); unique.
    target_names: what is segmented for each modality; the labels (``id2label``) are background, then one target per
        modality, as the pipelines report them.
    focal_loss_weight: lambda of the mask loss ``lambda * focal + (1 - lambda) * dice`` (paper: 0.7).
    patch_loss_weight: weight of the BCE loss of the patch logits against the max-pooled mask.
    initializer_range: standard deviation of the (truncated normal) initialisation of linear and conv layers.

    A dataclass, so that its fields become fields of the configs (dataclasses too) that list it before
    ``PreTrainedConfig``.
    """

    modality_names: list[str] | tuple[str, ...] = MODALITY_NAMES
    target_names: list[str] | tuple[str, ...] = TARGET_NAMES
    focal_loss_weight: float = 0.7
    patch_loss_weight: float = 1.0
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        self.modality_names = list(self.modality_names)
        self.target_names = list(self.target_names)
        if len(self.modality_names) != len(self.target_names) or not self.modality_names:
            raise ValueError(
                f"modality_names ({len(self.modality_names)}) and target_names ({len(self.target_names)}) must be "
                "non-empty and of the same length"
            )
        if len(set(self.modality_names)) != len(self.modality_names):
            raise ValueError(f"modality_names must be unique, got {self.modality_names}")
        if self.id2label is None and "num_labels" not in kwargs:
            self.id2label = {0: "background", **{i + 1: name for i, name in enumerate(self.all_target_names)}}
            self.label2id = {name: i for i, name in self.id2label.items()}
        super().__post_init__(**kwargs)

    @property
    def all_target_names(self) -> list[str]:
        """Every target in target (mask query) order: one per modality, then the student's extra targets."""
        return list(self.target_names) + [extra["name"] for extra in getattr(self, "extra_targets", ())]


@strict
class EspMedSamAggregatorConfig(PreTrainedConfig):
    r"""The modality aggregator: TinyViT as modified by MobileSAM (shared by all modalities).

    patch_embed_kernel_size / patch_embed_stride: the two Conv-BN layers of the patch embedding. The official model
        uses 3x3 stride-2 convolutions at 1024 px; LiteMedSAM uses 1x1 stride-1 convolutions at 256 px. Both give a
        64x64 embedding grid.
    last_merge_stride: stride of the last patch merging (1 in MobileSAM, so the last stage keeps the 64x64 grid).
    """

    model_type = "esp_medsam_aggregator"
    base_config_key = "aggregator_config"

    num_channels: int = 3
    embed_dims: list[int] | tuple[int, ...] = (64, 128, 160, 320)
    depths: list[int] | tuple[int, ...] = (2, 2, 6, 2)
    num_heads: list[int] | tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: list[int] | tuple[int, ...] = (7, 7, 14, 7)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
    patch_embed_kernel_size: int = 3
    patch_embed_stride: int = 2
    last_merge_stride: int = 1
    neck_dim: int = 256
    layer_norm_eps: float = 1e-5
    neck_layer_norm_eps: float = 1e-6

    def __post_init__(self, **kwargs):
        lengths = {len(self.embed_dims), len(self.depths), len(self.num_heads), len(self.window_sizes)}
        if len(lengths) != 1 or len(self.embed_dims) < 2:
            raise ValueError(
                "embed_dims, depths, num_heads and window_sizes must have the same length (>= 2), got "
                f"{self.embed_dims}, {self.depths}, {self.num_heads}, {self.window_sizes}"
            )
        for dim, heads in zip(self.embed_dims[1:], self.num_heads[1:]):
            if dim % heads:
                raise ValueError(f"embed_dim {dim} is not divisible by its num_heads {heads}")
        if self.patch_embed_kernel_size not in (1, 3) or self.patch_embed_stride not in (1, 2):
            raise ValueError(
                "patch_embed_kernel_size must be 1 or 3 and patch_embed_stride 1 or 2, got "
                f"{self.patch_embed_kernel_size} and {self.patch_embed_stride}"
            )
        super().__post_init__(**kwargs)

    @property
    def total_stride(self) -> int:
        """Input pixels per embedding cell: patch embedding, then stride-2 merges, then the last merge."""
        merges = 2 ** (len(self.embed_dims) - 2) * self.last_merge_stride
        return self.patch_embed_stride**2 * merges


@strict
class EspMedSamParameterBagConfig(PreTrainedConfig):
    r"""A parameter bag (one per modality), plugged into every TinyViT block of stages 1 and later.

    num_tokens: learnable tokens appended to the keys and values of every attention layer (official: 1; the same
        tensor serves as key and value).
    use_token_bias: a learnable attention-logit bias for the token columns (official: one scalar per layer).
    mlp_ratio: hidden ratio of the MLP that runs parallel to each block's MLP (``x + mlp(x) + bag_mlp(x)``).
    """

    model_type = "esp_medsam_parameter_bag"
    base_config_key = "parameter_bag_config"

    num_tokens: int = 1
    use_token_bias: bool = True
    mlp_ratio: float = 4.0
    token_init_std: float = 0.02


@strict
class EspMedSamPromptGeneratorConfig(PreTrainedConfig):
    r"""The self-patch prompt generator (SPPG).

    num_downsample_layers: stride-2 conv layers of the patch generator (official k = 1: 32x32 cells of 32x32 px).
    hidden_size: channels of the patch generator.
    threshold: probability at which a patch counts as foreground (sigmoid(logit) >= threshold).
    """

    model_type = "esp_medsam_prompt_generator"
    base_config_key = "prompt_generator_config"

    num_downsample_layers: int = 1
    hidden_size: int = 64
    threshold: float = 0.5
    layer_norm_eps: float = 1e-6


@strict
class EspMedSamDecoderConfig(PreTrainedConfig):
    r"""The query-decoupled modality decoder (QDMD): SAM's two-way transformer with one mask query per modality.

    The transformer fields carry the names of transformers' ``SamMaskDecoderConfig`` so that transformers'
    ``SamTwoWayTransformer`` is built from this config directly.

    num_extra_queries: query rows that take part in attention but are never decoded (official: 1, the 7th row).
    shared_hypernetwork: one hypernetwork MLP for all queries (official release) or one per modality (the paper).
    """

    model_type = "esp_medsam_decoder"
    base_config_key = "decoder_config"

    hidden_size: int = 256
    hidden_act: str = "relu"
    mlp_dim: int = 2048
    num_hidden_layers: int = 2
    num_attention_heads: int = 8
    attention_downsample_rate: int = 2
    layer_norm_eps: float = 1e-5
    upscale_layer_norm_eps: float = 1e-6
    num_extra_queries: int = 1
    shared_hypernetwork: bool = True
    hypernetwork_num_layers: int = 3
    positional_encoding_scale: float = 1.0

    def __post_init__(self, **kwargs):
        if self.hidden_size % 8:
            raise ValueError(f"decoder hidden_size must be a multiple of 8, got {self.hidden_size}")
        super().__post_init__(**kwargs)

    @property
    def scale(self) -> float:
        """``SamPromptEncoderConfig``'s name for ``positional_encoding_scale`` (the Gaussian matrix's std)."""
        return self.positional_encoding_scale

    @scale.setter
    def scale(self, value: float) -> None:
        self.positional_encoding_scale = value


@strict
class EspMedSamConfig(EspMedSamConfigMixin, PreTrainedConfig):
    r"""Configuration of [`EspMedSamModel`].

    modality_names / target_names / focal_loss_weight / patch_loss_weight: see ``EspMedSamConfigMixin``.
    image_size: square input size in pixels (official 1024); the embedding grid is image_size / total_stride.
    extra_targets: targets added to a modality after the first, as ``{"name": ..., "modality": ...}`` in target
        order: target ``num_modalities + i`` is ``extra_targets[i]``. Each has its own parameter bag and its own mask
        query, which takes its modality's place among the decoder's queries, so the other targets' masks do not
        change. ``modality=m`` decodes modality ``m``'s own target (``target_names[m]``); ``target=`` picks any.
    added_modalities: modalities added to a trained model after its own, as ``{"name": ..., "like": ...}``, the last
        entries of ``modality_names`` in order. Each has its own parameter bag, mask query and modality-classifier
        class, and decodes in its ``like`` modality's row among the decoder's queries (the decoder keeps
        ``num_query_rows`` modality rows), so the other modalities' masks do not change.
    modality_loss_weight: weight of the cross-entropy of the modality classifier (not in the paper).
    modality_classifier_hidden_size: hidden width of the classifier on the aggregator's stage-0 features.
    """

    model_type = "esp_medsam"
    sub_configs_defaults = {
        "aggregator_config": EspMedSamAggregatorConfig,
        "parameter_bag_config": EspMedSamParameterBagConfig,
        "prompt_generator_config": EspMedSamPromptGeneratorConfig,
        "decoder_config": EspMedSamDecoderConfig,
    }

    aggregator_config: dict | PreTrainedConfig | None = None
    parameter_bag_config: dict | PreTrainedConfig | None = None
    prompt_generator_config: dict | PreTrainedConfig | None = None
    decoder_config: dict | PreTrainedConfig | None = None
    image_size: int = 1024
    extra_targets: list[dict] | tuple[dict, ...] = ()
    added_modalities: list[dict] | tuple[dict, ...] = ()
    modality_loss_weight: float = 1.0
    modality_classifier_hidden_size: int = 256

    def __post_init__(self, **kwargs):
        self.extra_targets = [self._checked_extra_target(extra) for extra in self.extra_targets]
        super().__post_init__(**kwargs)
        self.added_modalities = self._checked_added_modalities(self.added_modalities)
        names = self.all_target_names
        if len(set(names)) != len(names):
            raise ValueError(f"target names must be unique, got {names}")
        if self.aggregator_config.neck_dim != self.decoder_config.hidden_size:
            raise ValueError(
                f"aggregator neck_dim ({self.aggregator_config.neck_dim}) must equal the decoder hidden_size "
                f"({self.decoder_config.hidden_size}): the decoder reads the image embedding directly"
            )
        stride = self.aggregator_config.total_stride
        grid = self.image_size // stride if self.image_size % stride == 0 else 0
        cells = 2**self.prompt_generator_config.num_downsample_layers
        if grid == 0 or grid % cells:
            raise ValueError(
                f"image_size {self.image_size} must be a multiple of {stride * cells} (the aggregator's total stride "
                f"{stride} times the prompt generator's {cells})"
            )

    def _checked_extra_target(self, extra: dict) -> dict:
        if not isinstance(extra, dict) or not isinstance(extra.get("name"), str) or not extra["name"].strip():
            raise ValueError(f"an extra target must be {{'name': str, 'modality': str}}, got {extra!r}")
        self.modality_index(extra.get("modality", ""))
        return {"name": extra["name"], "modality": extra["modality"]}

    def _checked_added_modalities(self, added: list | tuple) -> list[dict]:
        """``added_modalities`` checked: the last entries of ``modality_names``, each like an earlier modality."""
        added = [dict(entry) if isinstance(entry, dict) else entry for entry in added]
        first = len(self.modality_names) - len(added)
        names = [entry.get("name") if isinstance(entry, dict) else None for entry in added]
        if first < 1 or names != self.modality_names[first:]:
            raise ValueError(f"added_modalities must be the last modality_names in order as {{'name': str, 'like': "
                             f"str}}, got {added} for modality_names {self.modality_names}")
        for index, entry in enumerate(added, start=first):
            if entry.get("like") not in self.modality_names[:index]:
                raise ValueError(f"added modality {entry['name']!r}: like must be a modality before it "
                                 f"({', '.join(self.modality_names[:index])}), got {entry.get('like')!r}")
        return [{"name": entry["name"], "like": entry["like"]} for entry in added]

    @property
    def num_query_rows(self) -> int:
        """Number of modality rows among the decoder's mask queries: the modalities but the added ones."""
        return self.num_modalities - len(self.added_modalities)

    def query_row(self, modality: int | str) -> int:
        """The decoder query row that ``modality`` decodes in: its own, or an added modality's ``like``'s."""
        index = self.modality_index(modality)
        while index >= self.num_query_rows:
            index = self.modality_index(self.added_modalities[index - self.num_query_rows]["like"])
        return index

    @property
    def target_query_rows(self) -> list[int]:
        """The decoder query row of every target, in target order (its modality's row)."""
        return [self.query_row(modality) for modality in self.target_modalities]

    @property
    def num_targets(self) -> int:
        """Number of targets: of mask queries that decode a mask, and of parameter bags."""
        return self.num_modalities + len(self.extra_targets)

    @property
    def target_modalities(self) -> list[int]:
        """The modality index of every target, in target order."""
        return list(range(self.num_modalities)) + [self.modality_index(e["modality"]) for e in self.extra_targets]

    def target_index(self, target: int | str) -> int:
        """Index of ``target`` (a name from ``all_target_names`` or an index); ``ValueError`` names the choices."""
        names = self.all_target_names
        if isinstance(target, str):
            if target not in names:
                raise ValueError(f"unknown target {target!r}; expected one of {names}")
            return names.index(target)
        if isinstance(target, bool) or not isinstance(target, numbers.Integral) or not 0 <= int(target) < len(names):
            raise ValueError(f"target must be a name or an index 0..{len(names) - 1} ({', '.join(names)}), "
                             f"got {target!r}")
        return int(target)

    def targets_of(self, modality: int | str) -> list[str]:
        """The targets of ``modality``, its own (default) first."""
        index = self.modality_index(modality)
        return [n for n, m in zip(self.all_target_names, self.target_modalities) if m == index]

    @property
    def embedding_grid_size(self) -> int:
        """Side of the image-embedding grid (64 for the official model at 1024 px)."""
        return self.image_size // self.aggregator_config.total_stride

    @property
    def patch_grid_size(self) -> int:
        """Side of the self-prompt patch grid (32 for the official model)."""
        return self.embedding_grid_size // 2**self.prompt_generator_config.num_downsample_layers

    @property
    def mask_size(self) -> int:
        """Side of the low-resolution mask logits (4x the embedding grid: 256 at 1024 px)."""
        return self.embedding_grid_size * 4

    @classmethod
    def tiny(cls, image_size: int = 128, **kwargs) -> "EspMedSamConfig":
        """A very small configuration of the same architecture, for tests and CPU demos."""
        defaults = dict(
            aggregator_config=dict(
                embed_dims=(16, 32, 32, 64),
                depths=(1, 1, 2, 1),
                num_heads=(1, 1, 1, 2),
                window_sizes=(7, 7, 7, 7),
                neck_dim=32,
            ),
            prompt_generator_config=dict(hidden_size=16),
            decoder_config=dict(hidden_size=32, mlp_dim=64, num_attention_heads=2),
            modality_classifier_hidden_size=32,
        )
        defaults.update(kwargs)
        return cls(image_size=image_size, **defaults)


__all__ = [
    "MODALITY_NAMES",
    "TARGET_NAMES",
    "EspMedSamAggregatorConfig",
    "EspMedSamConfig",
    "EspMedSamConfigMixin",
    "EspMedSamDecoderConfig",
    "EspMedSamModalitiesMixin",
    "EspMedSamParameterBagConfig",
    "EspMedSamPromptGeneratorConfig",
]
