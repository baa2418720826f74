"""Automatic modality: the classifier on the aggregator's stage-0 features, trained briefly on the 12 SYNTHETIC
domains, picks the modality of held-out images, and the pipelines use its choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _inference_helpers import single_thread
from esp_medsam_hf import EspMedSamConfig, EspMedSamImageProcessor, EspMedSamModel
from esp_medsam_hf.data.domains import DOMAIN_NAMES, get_domain
from esp_medsam_hf.data.synthetic import synthetic_example
from esp_medsam_hf.models.esp_medsam.pipeline_esp_medsam import segment

SIZE = 64
TRAIN_PER_DOMAIN = 20
TEST_PER_DOMAIN = 20


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from single_thread()


def _domain_images(split: str, count: int) -> tuple[list[np.ndarray], torch.Tensor, list[str]]:
    images, labels, domains = [], [], []
    for domain in DOMAIN_NAMES:
        for index in range(count):
            images.append(synthetic_example(domain, index, split=split, size=SIZE)[0])
            labels.append(get_domain(domain).modality_index)
            domains.append(domain)
    return images, torch.tensor(labels), domains


@pytest.fixture(scope="module")
def trained():
    """A tiny model whose modality classifier was trained with the model's modality loss (cross-entropy on the
    detached stage-0 features; nothing else changes, so the features are computed once)."""
    torch.manual_seed(0)
    model = EspMedSamModel(EspMedSamConfig.tiny(image_size=SIZE)).eval()
    processor = EspMedSamImageProcessor(size={"height": SIZE, "width": SIZE})
    images, labels, _ = _domain_images("train", TRAIN_PER_DOMAIN)
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        features = model.aggregator.stem(pixel_values)
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("modality_classifier.")}
    optimizer = torch.optim.Adam(model.modality_classifier.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        batch = torch.randperm(len(labels), generator=generator)[:64]
        loss = F.cross_entropy(model.modality_classifier(features[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = model.state_dict()
    assert all(torch.equal(value, after[key]) for key, value in before.items())
    return model, processor


def test_classifier_reaches_99_percent_on_held_out_images_of_all_12_domains(trained):
    model, processor = trained
    images, labels, domains = _domain_images("test", TEST_PER_DOMAIN)
    with torch.no_grad():
        outputs = model(processor(images=images, return_tensors="pt")["pixel_values"])
    correct = outputs.modality == labels
    assert torch.equal(outputs.modality, outputs.modality_logits.argmax(-1))
    per_domain = {d: correct[[i for i, x in enumerate(domains) if x == d]].float().mean().item() for d in DOMAIN_NAMES}
    accuracy = correct.float().mean().item()
    assert accuracy >= 0.99, f"accuracy {accuracy:.3f}; per domain {per_domain}"
    assert min(per_domain.values()) >= 0.95, per_domain


def test_untrained_classifier_is_near_chance(trained):
    """The figure above comes from training: a fresh classifier on the same features does not reach it."""
    torch.manual_seed(1)
    fresh = EspMedSamModel(EspMedSamConfig.tiny(image_size=SIZE)).eval()
    model, processor = trained
    images, labels, _ = _domain_images("test", 4)
    with torch.no_grad():
        outputs = fresh(processor(images=images, return_tensors="pt")["pixel_values"])
    assert (outputs.modality == labels).float().mean().item() < 0.6


def test_pipeline_uses_the_trained_classifier(trained):
    model, processor = trained
    domains = ["ph2", "nih", "busi", "stare", "tnbc", "cvccdb"]
    images = [synthetic_example(d, 50, split="test", size=48)[0] for d in domains]
    results = segment(images, model, processor, batch_size=3)
    assert [r[0]["modality"] for r in results] == [get_domain(d).modality for d in domains]
    assert all(r[0]["modality_source"] == "classifier" and r[0]["modality_probability"] > 0.5 for r in results)


def test_predict_modality_gives_the_forward_modality_logits(trained):
    """Callers with images of unknown modality ask the model (``predict_modality``) instead of reaching into it."""
    model, processor = trained
    images, _, _ = _domain_images("test", 1)
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = model.predict_modality(pixel_values)
        outputs = model(pixel_values)
    assert logits.shape == (len(images), model.config.num_modalities)
    torch.testing.assert_close(logits, outputs.modality_logits, rtol=0, atol=0)
