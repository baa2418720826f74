"""The ESP-MedSAM medical teacher (stage 1 of arXiv 2407.14153) as a transformers model.

SAM's ViT image encoder (transformers' ``SamVisionEncoder``: its modules and parameter names, so
``facebook/sam-vit-*`` weights load into ``vision_encoder``) is kept frozen. Every encoder layer has a
``MedicalLayer`` of learnable parameters, which its ``EspMedSamTeacherVisionLayer`` (SAM's layer, subclassed) uses:

- medical tokens appended to the keys and values of its attention (``EspMedSamTeacherVisionAttention``). SAM's
  attention adds a decomposed relative-position term ``q . R_h[i_h - j_h] + q . R_w[i_w - j_w]`` for query i and key
  j on the patch grid. A token has no grid position, so there is no relative offset to look up: its columns get no
  relative-position term but a learnable logit bias per head and token (zero at start), the same role as the
  official student's token bias; it lets training decide how much attention the tokens take without inventing a
  position for them;
- a learnable MLP beside the block's MLP, on the same normalised input: ``x + mlp(ln2(x)) + medical_mlp(ln2(x))``.
  Its output layer starts at zero, so an untrained teacher computes SAM's embeddings except for the tokens.

The heads are the student's: ``SelfPatchPromptGenerator`` and ``QueryDecoupledModalityDecoder``, with the same
output (``EspMedSamOutput``) and loss (mask ``lambda * focal + (1 - lambda) * dice`` plus patch BCE), shared through
``EspMedSamModelMixin``. SAM's neck gives 256 x 64 x 64 embeddings at 1024 px, the student's grid, so the teacher's
embeddings are distillation targets.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel, SamVisionConfig
from transformers import initialization as init
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.sam.modeling_sam import (
    SamVisionAttention,
    SamVisionEncoder,
    SamVisionLayer,
    eager_attention_forward,
)

from .configuration_esp_medsam_teacher import SAM_CHECKPOINTS, EspMedSamTeacherConfig
from .modeling_esp_medsam import (
    EspMedSamModelMixin,
    EspMedSamOutput,
    QueryDecoupledModalityDecoder,
    SelfPatchPromptGenerator,
)


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
        """The MLP beside the layer's MLP, on the same normalised input."""
        return self.fc2(self.act(self.fc1(x)))


class EspMedSamTeacherVisionAttention(SamVisionAttention):
    """SAM's vision attention (windowed or global, with its decomposed relative positions) that also attends to the
    medical tokens of a ``MedicalLayer``.

    ``SamVisionAttention.forward`` projects, scores and mixes in one piece, with no way to add keys or values, so
    the forward is overridden. It reuses SAM's ``qkv`` and ``proj`` projections and ``get_decomposed_rel_pos``;
    the attention is the function of transformers' attention interface that ``config._attn_implementation`` names
    (``"sdpa"`` or ``"eager"``, read at every call). Without tokens it computes SAM's attention.
    """

    is_causal = False
    config: SamVisionConfig

    def forward(
        self, hidden_states: torch.Tensor, medical: MedicalLayer | None = None, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(attention output (B, H, W, C), attention weights or ``None``), as ``SamVisionAttention``'s; with
        ``output_attentions`` the eager attention runs, so that the weights are returned."""
        batch, height, width, _ = hidden_states.shape
        heads, length = self.num_attention_heads, height * width
        qkv = self.qkv(hidden_states).reshape(batch, length, 3, heads, -1).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)  # (B, heads, N, head_dim)
        bias = None
        if self.use_rel_pos:
            grid = (height, width)
            flat_query = query.reshape(batch * heads, length, -1)
            bias = self.get_decomposed_rel_pos(flat_query, self.rel_pos_h, self.rel_pos_w, grid, grid)
            bias = bias.reshape(batch, heads, length, length).to(query.dtype)
        if medical is not None and medical.key_tokens.shape[1]:
            key, value, bias = self.append_tokens(medical, query, key, value, bias)
        implementation = "eager" if output_attentions else self.config._attn_implementation
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        dropout = self.dropout if self.training else 0.0
        out, weights = attention(self, query, key, value, bias, scaling=self.scale, dropout=dropout)
        return self.proj(out.reshape(batch, height, width, -1)), weights

    @staticmethod
    def append_tokens(
        medical: MedicalLayer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys and values (B, heads, N + T, head_dim) with the tokens appended, and the (B, heads, N, N + T) logit
        bias: the relative-position term (or zero) for the grid, the tokens' learnable bias (or zero) for them."""
        batch, heads, length, _ = query.shape
        num_tokens = medical.key_tokens.shape[1]
        key = torch.cat([key, medical.key_tokens.to(key.dtype).expand(batch, -1, -1, -1)], dim=2)
        value = torch.cat([value, medical.value_tokens.to(value.dtype).expand(batch, -1, -1, -1)], dim=2)
        if medical.token_bias is not None:
            token_bias = medical.token_bias.to(query.dtype)[None, :, None, :].expand(batch, heads, length, num_tokens)
        else:
            token_bias = query.new_zeros(batch, heads, length, num_tokens)
        grid_bias = bias if bias is not None else query.new_zeros(batch, heads, length, length)
        return key, value, torch.cat([grid_bias, token_bias], dim=-1)


class EspMedSamTeacherVisionLayer(SamVisionLayer):
    """SAM's vision layer with a ``MedicalLayer``'s tokens in its attention and its MLP beside the layer's MLP.

    ``SamVisionLayer.forward`` calls its attention and MLP with nothing more than the hidden states, so the forward
    is overridden; it reuses SAM's norms, window partition and MLP, and without a medical layer it computes
    ``SamVisionLayer``'s output (which is how ``SamVisionEncoder.forward`` calls it).
    """

    @classmethod
    def adopt(cls, layer: SamVisionLayer, config: SamVisionConfig) -> None:
        """Make one of ``SamVisionEncoder``'s layers (and its attention) instances of these subclasses, in place.

        ``SamVisionEncoder`` builds ``SamVisionLayer``s, and they pick their attention from a fixed table, so the
        subclasses cannot be passed in. Only the classes change (as torch's ``fully_shard`` changes a module's
        class): no parameter is added, copied or renamed, so SAM's construction, initialisation and checkpoints
        apply as they are.
        """
        layer.__class__ = cls
        layer.attn.__class__ = EspMedSamTeacherVisionAttention
        layer.attn.config = config

    def forward(
        self, hidden_states: torch.Tensor, medical: MedicalLayer | None = None, attentions: list | None = None
    ) -> torch.Tensor:
        """(B, H, W, C) hidden states through the layer, with ``medical``'s tokens and MLP when given; a list given
        as ``attentions`` receives the attention weights (B * windows, heads, N, N + medical tokens)."""
        residual = hidden_states
        hidden_states = self.layer_norm1(hidden_states)
        if self.window_size > 0:
            height, width = hidden_states.shape[1], hidden_states.shape[2]
            hidden_states, padding = self.window_partition(hidden_states, self.window_size)
        hidden_states, weights = self.attn(hidden_states, medical, output_attentions=attentions is not None)
        if attentions is not None:
            attentions.append(weights)
        if self.window_size > 0:
            hidden_states = self.window_unpartition(hidden_states, self.window_size, padding, (height, width))
        hidden_states = residual + hidden_states
        normed = self.layer_norm2(hidden_states)
        hidden_states = hidden_states + self.mlp(normed)
        return hidden_states if medical is None else hidden_states + medical.mlp(normed)


class EspMedSamTeacherPreTrainedModel(EspMedSamModelMixin, PreTrainedModel):
    config_class = EspMedSamTeacherConfig
    base_model_prefix = "esp_medsam_teacher"
    _no_split_modules = ["EspMedSamTeacherVisionLayer", "QueryDecoupledModalityDecoder"]
    # The decoder's positional encoding stays float32 under dtype=torch.float16 / torch.bfloat16 (see the student).
    _keep_in_fp32_modules_strict = ["positional_encoding"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, MedicalLayer):
            init.normal_(module.key_tokens, std=self.config.token_init_std)
            init.normal_(module.value_tokens, std=self.config.token_init_std)
            if module.token_bias is not None:
                init.zeros_(module.token_bias)
            init.trunc_normal_(module.fc1.weight, std=self.config.initializer_range)
            init.zeros_(module.fc1.bias)
            init.zeros_(module.fc2.weight)
            init.zeros_(module.fc2.bias)
        else:
            self._init_common_weights(module)


class EspMedSamTeacherModel(EspMedSamTeacherPreTrainedModel):
    """The medical teacher: frozen SAM ViT encoder + medical tokens and MLPs, with the student's SPPG and QDMD.

    ``model(pixel_values, modality, labels=None)`` returns an ``EspMedSamOutput`` like ``EspMedSamModel`` (without
    modality logits: the teacher is always told the modality). ``model.get_image_embeddings(pixel_values,
    medical=False)`` gives the plain SAM encoder's embeddings (the modality-common distillation target).
    """

    def __init__(self, config: EspMedSamTeacherConfig):
        super().__init__(config)
        self._share_attn_implementation()
        self.vision_encoder = SamVisionEncoder(config.vision_config)
        for layer in self.vision_encoder.layers:
            EspMedSamTeacherVisionLayer.adopt(layer, config.vision_config)
        self.medical_layers = nn.ModuleList(
            [MedicalLayer(config.vision_config, config) for _ in range(config.vision_config.num_hidden_layers)]
        )
        neck_dim = config.vision_config.output_channels
        self.prompt_generator = SelfPatchPromptGenerator(config.prompt_generator_config, neck_dim)
        self.mask_decoder = QueryDecoupledModalityDecoder(config.decoder_config, config.num_modalities)
        self.post_init()
        if config.freeze_vision_encoder:
            self.vision_encoder.requires_grad_(False)

    @property
    def num_channels(self) -> int:
        """Channels of the input images (``check_inputs``)."""
        return self.config.vision_config.num_channels

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """As transformers' (loading replaces the parameters, so the SAM encoder is frozen again afterwards)."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True: (model, info)
        if model.config.freeze_vision_encoder:
            model.vision_encoder.requires_grad_(False)
        return loaded

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

    def get_image_embeddings(
        self,
        pixel_values: torch.Tensor,
        medical: bool = True,
        hidden_states: list | None = None,
        attentions: list | None = None,
    ) -> torch.Tensor:
        """(B, C, g, g) embeddings; ``medical=False`` runs SAM's encoder alone (no tokens, no medical MLPs). A list
        given as ``hidden_states`` receives, as SAM's vision encoder returns them, the embedded patches and every
        layer's output (B, H, W, C); one given as ``attentions`` every layer's attention weights."""
        encoder = self.vision_encoder
        if not medical:
            if hidden_states is not None or attentions is not None:
                raise ValueError("hidden_states and attentions are recorded for the medical encoder only")
            return encoder(pixel_values).last_hidden_state
        # SamVisionEncoder.forward, with each layer given its medical parameters
        states = encoder.patch_embed(pixel_values)
        if encoder.pos_embed is not None:
            states = states + encoder.pos_embed
        if hidden_states is not None:
            hidden_states.append(states)
        for layer, medical_layer in zip(encoder.layers, self.medical_layers):
            states = layer(states, medical_layer, attentions)
            if hidden_states is not None:
                hidden_states.append(states)
        return encoder.neck(states)

    def segment(
        self,
        pixel_values: torch.FloatTensor,
        modality: torch.LongTensor | None,
        labels: torch.FloatTensor | None = None,
        output_hidden_states: bool | list[int] | None = None,
        output_attentions: bool | None = None,
    ) -> EspMedSamOutput:
        """The forward after the input checks (see ``EspMedSamModelMixin.forward``); the modality is required. With
        ``output_hidden_states`` / ``output_attentions`` (or the config's) also the encoder's hidden states and
        attention weights, as SAM's vision encoder gives them. A list of indices for ``output_hidden_states`` keeps
        those states (negative ones count from the end) and leaves ``None`` in the other places, as transformers'
        output capture does."""
        if modality is None:
            raise ValueError("the teacher needs the modality of every image (it has no modality classifier)")
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        hidden_states = [] if output_hidden_states else None
        attentions = [] if output_attentions else None
        embeddings = self.get_image_embeddings(pixel_values, hidden_states=hidden_states, attentions=attentions)
        if hidden_states is not None and not isinstance(output_hidden_states, bool):
            kept = {index % len(hidden_states) for index in output_hidden_states}
            hidden_states = [state if index in kept else None for index, state in enumerate(hidden_states)]
        return self.decode_embeddings(
            embeddings, modality, labels,
            hidden_states=tuple(hidden_states) if hidden_states is not None else None,
            attentions=tuple(attentions) if attentions is not None else None,
        )


__all__ = [
    "EspMedSamTeacherModel",
    "EspMedSamTeacherPreTrainedModel",
    "EspMedSamTeacherVisionAttention",
    "EspMedSamTeacherVisionLayer",
    "MedicalLayer",
]
