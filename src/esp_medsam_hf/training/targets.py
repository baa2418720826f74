"""New targets for a trained ESP-MedSAM: a target added to a modality gets its own parameter bag and mask query,
initialised from the modality's own target (the nearest existing one), and can be trained alone, so that every other
target's masks stay bit-identical."""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F

from ..models.esp_medsam.configuration_esp_medsam import EspMedSamConfig
from ..models.esp_medsam.modeling_esp_medsam import EspMedSamModel
from .features import EspMedSamAfterCache, frozen_prefix_modules

logger = logging.getLogger(__name__)


def add_target(model: EspMedSamModel, name: str, modality: str) -> EspMedSamModel:
    """A copy of ``model`` with target ``name`` added to ``modality``: its bag and query start as copies of the
    modality's own target's, so the new target first segments what that one does. Every existing weight is kept, and
    the train/eval mode too (a forward in train mode would move the shared batch norms' statistics)."""
    config = model.config
    if name in config.all_target_names:
        raise ValueError(f"the model already has a target named {name!r} (targets: {config.all_target_names})")
    source = config.modality_index(modality)
    data = config.to_dict()
    data["extra_targets"] = [*config.extra_targets, {"name": name, "modality": modality}]
    for key in ("id2label", "label2id"):
        data.pop(key, None)
    new_config = EspMedSamConfig.from_dict(data)
    grown = EspMedSamModel(new_config).to(model.dtype).train(model.training)
    missing, unexpected = grown.load_state_dict(model.state_dict(), strict=False)
    index = new_config.num_targets - 1
    expected = {f"modality_controller.bags.{index}.", f"mask_decoder.target_queries.{index - config.num_query_rows}"}
    if unexpected or any(not key.startswith(tuple(expected)) for key in missing):
        raise RuntimeError(f"adding a target changed the model's weights: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        grown.modality_controller.bags[index].load_state_dict(model.modality_controller.bags[source].state_dict())
        grown.mask_decoder.target_queries[-1].copy_(target_query(model, source))
    logger.info("added target %r to modality %r (target %d), initialised from %r", name, modality, index,
                config.target_names[source])
    return grown


def target_query(model: EspMedSamModel, target: int) -> torch.Tensor:
    """The mask query that target ``target`` decodes with: a modality row of ``mask_queries``, or its own entry of
    ``target_queries`` (an extra target's, an added modality's: ``training.modalities``)."""
    rows = model.config.num_query_rows
    decoder = model.mask_decoder
    return decoder.mask_queries.weight[target] if target < rows else decoder.target_queries[target - rows]


def target_parameters(model: EspMedSamModel, target: int | str) -> list[torch.nn.Parameter]:
    """What is trained for an extra ``target`` (or an added modality's own) alone: its parameter bag and its mask
    query."""
    config = model.config
    index = config.target_index(target)
    if index < config.num_query_rows:
        raise ValueError(f"{config.all_target_names[index]!r} is a modality's own target; training it alone would "
                         "change its modality's shared parts: train an added target (see add_target)")
    return [*model.modality_controller.bags[index].parameters(), target_query(model, index)]


def freeze_all_but_target(model: EspMedSamModel, target: int | str) -> int:
    """Freeze every parameter but ``target``'s (:func:`target_parameters`); returns how many stay trainable."""
    model.requires_grad_(False)
    trainable = target_parameters(model, target)
    for parameter in trainable:
        parameter.requires_grad_(True)
    return sum(p.numel() for p in trainable)


class TargetTraining(torch.nn.Module):
    """The model trained as one target: every image of the batch is decoded as ``target``. With ``only_target`` the
    model stays in eval mode (its frozen batch norms keep their statistics, which the other targets share); what
    trains of it (a bag, a query) has no dropout or batch norm.

    ``keep`` (with the shared parts training): learning without forgetting (Li and Hoiem, 2016) for target ``kept``
    (the modality's own target): its mask logits on the batch are pulled, with this weight, towards those of a
    frozen copy of the model as it started (the KL divergence between their per-pixel probabilities), so that the
    shared encoder and decoder learn the new target without unlearning the old one. It costs two more forwards a
    step (the copy's without gradients)."""

    def __init__(self, model: EspMedSamModel, target: int, only_target: bool, keep: float = 0.0,
                 kept: int | None = None):
        super().__init__()
        self.model, self.target, self.only_target, self.keep, self.kept = model, target, only_target, keep, kept
        # not a submodule: the copy neither trains nor goes into checkpoints
        self._start = [copy.deepcopy(model).eval().requires_grad_(False)] if keep and not only_target else []

    def train(self, mode: bool = True) -> "TargetTraining":
        super().train(mode)
        if self.only_target:
            self.model.eval()
        return self

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        target = torch.full((pixel_values.shape[0],), self.target, device=pixel_values.device)
        # the classifier is frozen whatever trains (freeze_all_but_target, stages.espmedsam.TRAIN_ALL_FROZEN): its
        # loss would only add a constant, so the segmentation loss alone, as TargetAfterCache computes it
        loss = self.model.decode_embeddings(self.model.encode(pixel_values, target)[0], target, labels).loss
        if not self._start:
            return loss
        start = self._start[0].to(pixel_values.device)
        kept = torch.full_like(target, self.kept)
        with torch.no_grad():
            reference = start.decode_embeddings(start.encode(pixel_values, kept)[0], kept).pred_masks
        now = self.model.decode_embeddings(self.model.encode(pixel_values, kept)[0], kept).pred_masks
        kept_masks = torch.sigmoid(reference)
        # less the copy's own entropy: the term is the KL divergence, 0 while nothing has moved
        forgetting = (F.binary_cross_entropy_with_logits(now, kept_masks)
                      - F.binary_cross_entropy_with_logits(reference, kept_masks))
        return loss + self.keep * forgetting


def prepare_target(model: EspMedSamModel, name: str, modality: str, only_target: bool) -> EspMedSamModel:
    """``model`` with target ``name`` (added to ``modality`` unless it has it already), frozen but for that target's
    parts with ``only_target``."""
    if name in model.config.all_target_names:
        index = model.config.target_index(name)
        if model.config.target_modalities[index] != model.config.modality_index(modality):
            raise ValueError(f"the model's target {name!r} belongs to another modality than {modality!r}")
    else:
        model = add_target(model, name, modality)
    if only_target:
        trainable = freeze_all_but_target(model, name)
        logger.info("training only target %r: %d of %d parameters", name, trainable,
                    sum(p.numel() for p in model.parameters()))
    return model


class TargetAfterCache(EspMedSamAfterCache):
    """``EspMedSamAfterCache`` for one added target: every cached image is decoded as ``target`` (its bag after the
    cache point, its query), in eval mode, without the modality classifier's loss (the classifier is frozen).

    The cache is encoded with each image's modality, whose bag blocks before the cache point equal the target's:
    :func:`freeze_target_prefix` keeps them the copies :func:`add_target` made."""

    def __init__(self, model: EspMedSamModel, frozen_stages: int | None, target: int):
        super().__init__(model, frozen_stages)
        self.target = target

    def train(self, mode: bool = True) -> "TargetAfterCache":
        super().train(mode)
        self.model.eval()
        return self

    def _targets(self, modality: torch.LongTensor) -> torch.LongTensor:
        return torch.full_like(modality, self.target)

    def forward(self, features: torch.Tensor, pooled_features: torch.Tensor, modality: torch.LongTensor,
                labels: torch.Tensor) -> torch.Tensor:
        target = self._targets(modality)
        return self.model.decode_embeddings(self.embed(features, target), target, labels).loss

    @torch.no_grad()
    def predict(self, features: torch.Tensor, modality: torch.LongTensor) -> torch.Tensor:
        target = self._targets(modality)
        return self.model.decode_embeddings(self.embed(features, target), target).pred_masks


def freeze_target_prefix(model: EspMedSamModel, target: int, frozen_stages: int | None,
                         source: int | None = None) -> None:
    """Freeze ``target``'s bag blocks before a feature cache's point (``frozen_stages``), after checking that they
    still equal those of the bag the cache encodes its images with, ``source`` (default: its modality's), so that
    the cached features are the target's."""
    config = model.config
    bags = model.modality_controller.bags
    own = bags[target].state_dict()
    source = bags[config.target_modalities[target] if source is None else source].state_dict()
    prefix = {id(block) for block in frozen_prefix_modules(model, frozen_stages)}
    names = [f"blocks.{i}." for i, block in enumerate(bags[target].blocks) if id(block) in prefix]
    if frozen_stages is None:
        names = ["blocks."]
    differing = [key for key in own if key.startswith(tuple(names)) and not torch.equal(own[key], source[key])]
    if differing:
        raise ValueError(f"target {config.all_target_names[target]!r}'s parameter bag differs from the one its "
                         f"images are encoded with before the cache point ({differing[0]}, ...): train it without "
                         "cache_features")
    for module in frozen_prefix_modules(model, frozen_stages):
        module.requires_grad_(False)
    logger.info("target %r on cached features: %d parameters train", config.all_target_names[target],
                sum(p.numel() for p in model.parameters() if p.requires_grad))


def domains_target(specs: dict) -> tuple[str, str] | None:
    """(target, modality) that the prepared domains ``specs`` (``{name: Domain}``) record in their ``domain.json``
    (``Domain.target_name``), or None when none records one; domains that disagree are an error."""
    recorded = {(spec.target_name, spec.modality) for spec in specs.values()}
    if recorded == {(None, spec.modality) for spec in specs.values()}:
        return None
    if len(recorded) > 1:
        listed = ", ".join(f"{name}: {spec.target} ({spec.modality})" for name, spec in specs.items())
        raise ValueError(f"the training domains record different targets ({listed}); train one new target at a time")
    return next(iter(recorded))
