"""A tiny training run for tests/test_distributed.py: ``accelerate launch ... _distributed_training.py OUT BATCH``
(or ``run(OUT, BATCH)`` in-process). ESP-MedSAM's tiny configuration with BatchNorm folded (BatchNorm's batch
statistics are per process, so they alone would make two half batches differ from one whole batch), eight
synthetic 64 px images, one epoch of two optimizer steps with the global batch of four. Launched, it then encodes
features and evaluates (``shared_work``: each process its share, counted in ``OUT/work-RANK.json``) and runs the
train command, whose final line only the main process prints."""

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


def shared_work(output_dir: str | Path) -> dict:
    """Feature encoding and evaluation of six synthetic images, one at a time; returns the features and each image's
    Dice, and writes how many images this process encoded and segmented to ``OUT/work-RANK.json``."""
    import json

    from accelerate import PartialState

    from esp_medsam_hf import EspMedSamImageProcessor, EspMedSamProcessor
    from esp_medsam_hf.data import evaluation
    from esp_medsam_hf.data.synthetic import synthetic_domains
    from esp_medsam_hf.training import features
    from esp_medsam_hf.training.data import SegmentationDataset

    counts = {"encoded": 0, "segmented": 0}
    encode, predict = features.encode, evaluation.predict

    def counted_encode(model, pixel_values, *args, **kwargs):
        counts["encoded"] += len(pixel_values)
        return encode(model, pixel_values, *args, **kwargs)

    def counted_predict(model, processor, images, *args, **kwargs):
        counts["segmented"] += len(images)
        return predict(model, processor, images, *args, **kwargs)

    features.encode, evaluation.predict = counted_encode, counted_predict
    try:
        data = synthetic_domains(["isic", "dsb"], {"train": 3}, seed=0, size=SIZE)
        model = initial_model().eval().requires_grad_(False)
        processor = EspMedSamProcessor(EspMedSamImageProcessor(size={"height": SIZE, "width": SIZE}))
        cache = features.cache_features(model, processor.image_processor, SegmentationDataset(data, "train"),
                                        views=1, batch_size=1, progress=False)
        report = evaluation.evaluate_model(model, processor, data, split="train", batch_size=1, progress=False,
                                           compute_hausdorff=False, distributed=True)
    finally:
        features.encode, evaluation.predict = encode, predict
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / f"work-{PartialState().process_index}.json").write_text(json.dumps(counts))
    dice = [entry["dice"] for row in report["domains"].values() for entry in row["per_image"]]
    return {"features": cache.features, "pooled": cache.pooled, "dice": dice}


def train_command(output_dir: str | Path) -> int:
    """``esp-medsam train`` of the tiny model for one step (its final line is what the test counts)."""
    from accelerate import PartialState

    from esp_medsam_hf.cli import main

    if PartialState().is_main_process:
        initial_model().save_pretrained(Path(output_dir) / "init")
    PartialState().wait_for_everyone()
    return main(["train", "--stage", "espmedsam", "--init-from", str(Path(output_dir) / "init"), "--data",
                 "synthetic", "--domains", "isic", "dsb", "--synthetic-train-images", "2", "--synthetic-valid-images",
                 "1", "--batch-size", "1", "--max-steps", "1", "--no-progress", "--output-dir",
                 str(Path(output_dir) / "command")])


if __name__ == "__main__":
    from accelerate import PartialState

    run(sys.argv[1], int(sys.argv[2]))
    work = shared_work(sys.argv[1])
    if PartialState().is_main_process:
        torch.save(work, Path(sys.argv[1]) / "work.pt")
    sys.exit(train_command(sys.argv[1]))
