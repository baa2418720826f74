"""A tiny training run for tests/test_distributed.py: ``accelerate launch ... _distributed_training.py OUT BATCH``
(or ``run(OUT, BATCH)`` in-process). ESP-MedSAM's tiny configuration with BatchNorm folded (BatchNorm's batch
statistics are per process, so they alone would make two half batches differ from one whole batch), eight
synthetic 64 px images, one epoch of two optimizer steps with the global batch of four."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from esp_medsam_hf import EspMedSamConfig, EspMedSamModel
from esp_medsam_hf.training.config import TrainingConfig
from esp_medsam_hf.training.loop import StageTask, train

IMAGES, SIZE, GLOBAL_BATCH = 8, 64, 4


def dataset() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        {
            "pixel_values": torch.randn(3, SIZE, SIZE, generator=generator),
            "labels": (torch.rand(1, SIZE, SIZE, generator=generator) > 0.7).float(),
            "modality": torch.tensor(i % 3),
        }
        for i in range(IMAGES)
    ]


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def initial_model() -> EspMedSamModel:
    torch.manual_seed(0)
    model = EspMedSamModel(EspMedSamConfig.tiny(image_size=SIZE)).eval().fuse_batchnorm().train()
    # as the stages' apply_freeze: prompt-free training never runs the prompt encoder, and DDP needs every trainable
    # parameter to get a gradient
    model.prompt_encoder.requires_grad_(False)
    return model


def save(model: torch.nn.Module, folder: Path) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), Path(folder) / "state.pt")


def run(output_dir: str | Path, batch_size: int) -> Path:
    """Train; returns the final model folder."""
    model = initial_model()
    task = StageTask(
        name="distributed-test",
        model=model,
        train_dataset=dataset(),
        collate_fn=collate,
        compute_loss=lambda m, batch: m(batch["pixel_values"], modality=batch["modality"], labels=batch["labels"]).loss,
        save=save,
    )
    config = TrainingConfig(
        output_dir=str(output_dir), epochs=1, batch_size=batch_size, learning_rate=1e-3, validate=False,
        progress=False, keep_checkpoints=1,
    )
    return train(config, task).final_dir


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]))
