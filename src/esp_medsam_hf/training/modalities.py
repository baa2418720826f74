"""New modalities for a trained ESP-MedSAM: a modality added to the model gets its own parameter bag, its own mask
query and its own modality-classifier class, each initialised from an existing modality's (``like``), and can be
trained alone, so that every other modality's and target's masks stay bit-identical.

Its mask query decodes in ``like``'s row among the decoder's queries (``EspMedSamConfig.added_modalities``): the
decoder's transformer attends over all its query rows at once, so a new row would change every modality's masks.
The model's other targets keep their names and weights; the extra targets (indexed after the modalities) move one
index up, their bags and queries with them.
"""

from __future__ import annotations

import logging
import re

import torch

from ..models.esp_medsam.configuration_esp_medsam import EspMedSamConfig
from ..models.esp_medsam.modeling_esp_medsam import EspMedSamModel
from ..models.esp_medsam.processing_esp_medsam import EspMedSamProcessor
from .targets import freeze_all_but_target, target_query

logger = logging.getLogger(__name__)

ADDED_CLASS_LOGIT_OFFSET = 30.0
"""How far below ``like``'s the new modality's classifier logit starts (same weights, bias lowered by this).

Not a tie: with the weights copied, the new class's logit is ``like``'s minus this on every image, so the classifier
never picks the new modality (which is reached by naming it, ``modality="NAME"``), and with ``exp(-30) < 1e-13``
every existing modality's softmax probability (which the pipeline reports and multiplies into its score) is the same
in float32 as before. A later fit of the classifier on images of every modality moves it from there."""


def grown_config(config: EspMedSamConfig, name: str, like: str, target: str) -> EspMedSamConfig:
    """``config`` with modality ``name`` (segmenting ``target``) added after its modalities, like ``like``."""
    if name in config.modality_names:
        raise ValueError(f"the model already has a modality named {name!r} (modalities: {config.modality_names})")
    if target in config.all_target_names:
        raise ValueError(f"the model already has a target named {target!r} (targets: {config.all_target_names}); "
                         "give the new modality's target another name")
    config.modality_index(like)
    data = config.to_dict()
    data["modality_names"] = [*config.modality_names, name]
    data["target_names"] = [*config.target_names, target]
    data["added_modalities"] = [*config.added_modalities, {"name": name, "like": like}]
    for key in ("id2label", "label2id"):
        data.pop(key, None)
    return EspMedSamConfig.from_dict(data)


def grown_state(model: EspMedSamModel, new_config: EspMedSamConfig) -> dict[str, torch.Tensor]:
    """``model``'s state dict with the keys of the grown model ``new_config``: the bags and queries of the extra
    targets one index up, the new modality's bag, query and classifier row copied from ``like``'s."""
    config = model.config
    old_modalities, rows = config.num_modalities, config.num_query_rows
    like = new_config.modality_index(new_config.added_modalities[-1]["like"])

    def moved(key: str) -> str:
        for prefix, first in (("modality_controller.bags.", old_modalities), ("mask_decoder.target_queries.",
                                                                              old_modalities - rows)):
            match = re.match(rf"{re.escape(prefix)}(\d+)(.*)", key)
            if match and int(match[1]) >= first:
                return f"{prefix}{int(match[1]) + 1}{match[2]}"
        return key

    state = {moved(key): value for key, value in model.state_dict().items()}
    for key, value in model.modality_controller.bags[like].state_dict().items():
        state[f"modality_controller.bags.{old_modalities}.{key}"] = value
    state[f"mask_decoder.target_queries.{old_modalities - rows}"] = target_query(model, like).detach()
    weight, bias = "modality_classifier.fc2.weight", "modality_classifier.fc2.bias"
    state[weight] = torch.cat([state[weight], state[weight][like : like + 1]])
    state[bias] = torch.cat([state[bias], state[bias][like : like + 1] - ADDED_CLASS_LOGIT_OFFSET])
    return state


def add_modality(model: EspMedSamModel, name: str, like: str, target: str | None = None) -> EspMedSamModel:
    """A copy of ``model`` with modality ``name`` (its target named ``target``, default ``name``) after its
    modalities: its parameter bag and mask query start as copies of ``like``'s and it decodes in ``like``'s query
    row, so it first segments what ``like`` does; its classifier class starts as ``like``'s, lowered by
    ``ADDED_CLASS_LOGIT_OFFSET`` (the classifier does not pick it: name it). With per-modality hypernetworks
    (``shared_hypernetwork=False``) it shares ``like``'s. Every existing weight is kept (the extra targets' bags and
    queries one index up), and the train/eval mode too."""
    new_config = grown_config(model.config, name, like, name if target is None else target)
    grown = EspMedSamModel(new_config).to(model.dtype).train(model.training)
    grown.load_state_dict(grown_state(model, new_config), strict=True)
    logger.info("added modality %r (index %d, target %r), initialised from %r", name, new_config.num_modalities - 1,
                new_config.target_names[-1], like)
    return grown


def add_modality_to_processor(processor: EspMedSamProcessor, config: EspMedSamConfig) -> EspMedSamProcessor:
    """``processor`` naming ``config``'s modalities and targets; an added modality gets its ``like``'s inference
    settings (object size, mask threshold and smallest body kept per modality), so it also preprocesses as ``like``
    does."""
    processor.modality_names = list(config.modality_names)
    processor.target_names = config.all_target_names
    image_processor = processor.image_processor
    for added in config.added_modalities:
        for field in ("modality_object_sizes", "modality_mask_thresholds", "modality_min_object_fractions"):
            settings = getattr(image_processor, field, None)
            if settings and added["like"] in settings and added["name"] not in settings:
                setattr(image_processor, field, {**settings, added["name"]: settings[added["like"]]})
    return processor


def prepare_modality(model: EspMedSamModel, name: str, like: str, target: str | None,
                     only_new: bool) -> EspMedSamModel:
    """``model`` with modality ``name`` (added like ``like`` unless it has it already), frozen but for its bag and
    query with ``only_new`` (``targets.freeze_all_but_target``: the classifier stays frozen, see
    ``ADDED_CLASS_LOGIT_OFFSET``)."""
    config = model.config
    if name in config.modality_names:
        recorded = {entry["name"]: entry["like"] for entry in config.added_modalities}
        if recorded.get(name) != like:
            raise ValueError(f"the model already has modality {name!r}" + (
                f", added like {recorded[name]!r}, not {like!r}" if name in recorded else
                f" (one of its own: {config.modality_names}); pick a new name for --new-modality"))
        own = config.target_names[config.modality_index(name)]
        if target is not None and target != own:
            raise ValueError(f"the model's modality {name!r} segments {own!r}, not {target!r}")
    else:
        model = add_modality(model, name, like, target)
    if only_new:
        trainable = freeze_all_but_target(model, model.config.modality_index(name))
        logger.info("training only modality %r: %d of %d parameters", name, trainable,
                    sum(p.numel() for p in model.parameters()))
    return model


def domains_modality(specs: dict) -> tuple[str, str, str | None] | None:
    """(new modality, like, target or None) that the prepared domains ``specs`` (``{name: Domain}``) record in their
    ``domain.json`` (``Domain.new_modality``), or None when none records one; domains that disagree (or some of the
    six modalities beside it) are an error."""
    recorded = {(spec.new_modality, spec.modality, spec.target_name) for spec in specs.values()}
    if all(new is None for new, _, _ in recorded):
        return None
    if len(recorded) > 1:
        listed = ", ".join(f"{name}: {spec.new_modality or spec.modality}" for name, spec in specs.items())
        raise ValueError(f"the training domains record different modalities ({listed}); train one new modality at "
                         "a time, on its own domains")
    return next(iter(recorded))
