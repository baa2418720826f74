"""Fitting the modality classifier alone, on pooled stage-0 features computed once (the encoder stays frozen)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ...models.esp_medsam.backends import inference_batch_size
from ...models.esp_medsam.modeling_esp_medsam import EspMedSamModel
from ...models.esp_medsam.processing_esp_medsam import EspMedSamProcessor
from ..data import Collator, SegmentationDataset


def fit_modality_classifier(
    model: EspMedSamModel, processor: EspMedSamProcessor, data: dict, *, epochs: int, seed: int = 0,
    batch_size: int = 32, learning_rate: float = 3e-3, progress: bool = True,
    known: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict:
    """Train the modality classifier alone on the ``train`` splits of ``data`` (the encoder stays frozen).

    The classifier reads detached stage-0 features, so the segmentation is unchanged. The pooled stage-0 features
    of every image (and of its mirror image) are computed once, by an inference-optimized copy of the model,
    ``backends.inference_batch_size`` images at a time; the head then trains on them for ``epochs`` epochs.
    ``known``: (pooled features, modalities) of more views already computed (a stage-3 feature cache's).
    Returns {"accuracy": training accuracy (%), "images": views seen / 2}.
    """
    from tqdm.auto import tqdm

    was_training = model.training
    device = next(model.parameters()).device
    features, labels = [known[0]] if known else [], [known[1]] if known else []
    if data:
        encoder = copy.deepcopy(model).optimize_for_inference()
        loader = torch.utils.data.DataLoader(SegmentationDataset(data, "train"), batch_size=inference_batch_size(device),
                                             collate_fn=Collator(processor.image_processor))
        with torch.no_grad():
            for batch in loader:
                pixels = batch["pixel_values"].to(device)
                for view in (pixels, pixels.flip(-1)):
                    features.append(encoder.modality_classifier.pool(encoder.aggregator.stem(view)).cpu())
                    labels.append(batch["modality"])
        del encoder
    features, labels = torch.cat(features), torch.cat(labels)
    classifier = model.modality_classifier
    classifier.train()
    optimizer = torch.optim.Adam(classifier.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc="modality classifier", unit="epoch", disable=not progress):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            loss = F.cross_entropy(classifier.head(features[index].to(device)), labels[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        predicted = torch.cat([classifier.head(features[i : i + 256].to(device)).argmax(-1).cpu()
                               for i in range(0, len(labels), 256)])
    model.train(was_training)
    return {"accuracy": float((predicted == labels).float().mean() * 100), "images": len(labels) // 2}
