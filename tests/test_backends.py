"""Inference backends of the user-facing entry points: automatic choice, overrides, export cache, and agreement with
the PyTorch forward within 1e-4 (tiny configuration, CPU)."""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from _inference_helpers import save_tiny_model, single_thread
from esp_medsam_hf import EspMedSamConfig, EspMedSamModel
from esp_medsam_hf.models.esp_medsam import backends
from esp_medsam_hf.data.synthetic import synthetic_example
from esp_medsam_hf.models.esp_medsam.pipeline_esp_medsam import TASK, EspMedSamSegmentationPipeline

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

SIZE = 64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from single_thread()


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    monkeypatch.delenv(backends.BACKEND_ENV, raising=False)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return EspMedSamModel(EspMedSamConfig.tiny(image_size=SIZE, initializer_range=0.2)).eval()


@pytest.fixture
def export_counter(monkeypatch):
    """Counts the exports the backends module starts."""
    from esp_medsam_hf.models.esp_medsam import export

    calls = []
    original = export.export_onnx

    def counting(*args, **kwargs):
        calls.append(args[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(export, "export_onnx", counting)
    return calls


def test_auto_picks_onnxruntime_for_fp32_on_cpu_and_eager_otherwise(model, monkeypatch):
    assert backends.resolve_backend(model) == "onnxruntime"
    assert backends.resolve_backend(model, "eager") == "eager"
    monkeypatch.setenv(backends.BACKEND_ENV, "eager")
    assert backends.resolve_backend(model) == "eager"
    assert backends.resolve_backend(model, "auto") == "onnxruntime"  # the argument wins over the environment
    monkeypatch.setenv(backends.BACKEND_ENV, "tensorrt")
    with pytest.raises(ValueError, match=r"\$ESP_MEDSAM_BACKEND must be one of auto, onnxruntime, eager"):
        backends.resolve_backend(model)
    monkeypatch.delenv(backends.BACKEND_ENV)
    monkeypatch.setattr(backends, "onnxruntime_available", lambda: False)
    assert backends.resolve_backend(model) == "eager"
    with pytest.raises(ImportError, match="pip install"):
        backends.resolve_backend(model, "onnxruntime")


def test_auto_keeps_eager_for_a_bf16_model():
    torch.manual_seed(0)
    bf16 = EspMedSamModel(EspMedSamConfig.tiny(image_size=SIZE)).eval().to(torch.bfloat16)
    assert backends.resolve_backend(bf16) == "eager"
    with pytest.raises(ValueError, match="fp32 models on the CPU"):
        backends.resolve_backend(bf16, "onnxruntime")


@pytest.mark.parametrize("modality", [[4, 0, 5], [-1, -1, -1], [2, -1, 1]], ids=["given", "automatic", "mixed"])
def test_onnxruntime_matches_the_pytorch_forward_within_1e4(model, modality):
    pixels = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(sum(modality) + 10))
    modality = torch.tensor(modality)
    fast = backends.run_inference(model, pixels, modality, backend="onnxruntime")
    eager = backends.run_inference(model, pixels, modality, backend="eager")
    with torch.no_grad():
        plain = model(pixels, modality=eager.modality)
    assert eager.pred_masks.abs().max() > 0.1  # logits of order one, so the tolerance means something
    torch.testing.assert_close(eager.pred_masks, plain.pred_masks, atol=0, rtol=0)
    assert fast.modality.tolist() == eager.modality.tolist()
    for name in ("pred_masks", "patch_logits", "modality_logits"):
        torch.testing.assert_close(getattr(fast, name), getattr(eager, name), atol=1e-4, rtol=0)


def test_modality_out_of_range_is_a_clear_error(model):
    with pytest.raises(ValueError, match="modality index 6 is out of range"):
        backends.run_inference(model, torch.zeros(1, 3, SIZE, SIZE), torch.tensor([6]), backend="onnxruntime")


def test_export_happens_once_per_weights_and_again_when_they_change(export_counter, tmp_path, monkeypatch):
    # A cache of its own: the session's cache may already hold these weights' export (another test's seed 3).
    monkeypatch.setenv(backends.CACHE_ENV, str(tmp_path))
    torch.manual_seed(3)
    first = EspMedSamModel(EspMedSamConfig.tiny(image_size=SIZE)).eval()
    pixels = torch.randn(1, 3, SIZE, SIZE)
    backends.run_inference(first, pixels, backend="onnxruntime")
    backends.run_inference(first, pixels, backend="onnxruntime")
    assert len(export_counter) == 1
    # The same weights in another model object (another process, a reload): the cached file is reused.
    second = EspMedSamModel(first.config).eval()
    second.load_state_dict(first.state_dict())
    backends.run_inference(second, pixels, backend="onnxruntime")
    assert len(export_counter) == 1
    # Weights changed in place: a new export, whose outputs follow the new weights.
    with torch.no_grad():
        second.mask_decoder.mask_queries.weight.mul_(2)
    fast = backends.run_inference(second, pixels, torch.tensor([1]), backend="onnxruntime")
    assert len(export_counter) == 2 and export_counter[0] != export_counter[1]
    eager = backends.run_inference(second, pixels, torch.tensor([1]), backend="eager")
    torch.testing.assert_close(fast.pred_masks, eager.pred_masks, atol=1e-4, rtol=0)


def test_weights_are_hashed_only_when_their_fingerprint_changes(export_counter, tmp_path, monkeypatch):
    """Repeated calls check a cheap fingerprint, not the weights; an in-place edit, a fused optimizer's step (which
    leaves PyTorch's version counters alone) and a reload are all seen; another model's step costs a hash, not an
    export."""
    monkeypatch.setenv(backends.CACHE_ENV, str(tmp_path))
    hashes = []
    original = backends.weights_hash
    monkeypatch.setattr(backends, "weights_hash", lambda m: hashes.append(1) or original(m))
    torch.manual_seed(4)
    model = EspMedSamModel(EspMedSamConfig.tiny(image_size=SIZE)).eval()
    pixels, modality = torch.randn(2, 3, SIZE, SIZE), torch.tensor([1, 4])
    for _ in range(3):
        backends.run_inference(model, pixels, modality, backend="onnxruntime")
    assert (len(hashes), len(export_counter)) == (1, 1)

    with torch.no_grad():
        model.mask_decoder.mask_queries.weight.add_(0.5)
    backends.run_inference(model, pixels, modality, backend="onnxruntime")
    assert (len(hashes), len(export_counter)) == (2, 2)

    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    model(pixels, modality=modality, labels=torch.ones(2, 1, SIZE, SIZE)).loss.backward()
    version = model.mask_decoder.mask_queries.weight._version
    optimizer.step()
    assert model.mask_decoder.mask_queries.weight._version == version  # fused: the counters do not show it
    model.eval()
    fast = backends.run_inference(model, pixels, modality, backend="onnxruntime")
    assert (len(hashes), len(export_counter)) == (3, 3)
    eager = backends.run_inference(model, pixels, modality, backend="eager")
    torch.testing.assert_close(fast.pred_masks, eager.pred_masks, atol=1e-4, rtol=0)

    other = torch.nn.Linear(2, 1)
    torch.optim.SGD(other.parameters(), lr=0.1).step()
    backends.run_inference(model, pixels, modality, backend="onnxruntime")
    backends.run_inference(model, pixels, modality, backend="onnxruntime")
    assert (len(hashes), len(export_counter)) == (4, 3)  # hashed once, same weights: the session is kept


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("backends") / "model", seed=5)


@pytest.fixture(scope="module")
def images():
    sizes = {"isic": 40, "lung": 48, "dsb": 36}
    return [synthetic_example(domain, 0, split="test", size=size)[0][:, 3:] for domain, size in sizes.items()]


def test_pipeline_uses_onnxruntime_by_default_and_eager_on_request(saved, images, monkeypatch):
    used = []
    original = backends.onnx_session
    monkeypatch.setattr(backends, "onnx_session", lambda m, **kwargs: used.append(m) or original(m, **kwargs))
    auto = pipeline(TASK, model=str(saved), pipeline_class=EspMedSamSegmentationPipeline)
    fast = auto(images, modality=["dermoscopy", None, "microscopy"], batch_size=3)
    assert used and all(m is auto.model for m in used)
    used.clear()
    eager = pipeline(TASK, model=str(saved), pipeline_class=EspMedSamSegmentationPipeline, backend="eager")
    plain = eager(images, modality=["dermoscopy", None, "microscopy"], batch_size=3)
    assert not used
    for a, b in zip(fast, plain):
        assert a[0]["modality"] == b[0]["modality"] and a[0]["modality_source"] == b[0]["modality_source"]
        assert a[0]["score"] == pytest.approx(b[0]["score"], abs=1e-4)
        assert a[0]["modality_probability"] == pytest.approx(b[0]["modality_probability"], abs=1e-4)
        agreement = (np.asarray(a[0]["mask"]) == np.asarray(b[0]["mask"])).mean()
        assert agreement > 0.99
    with pytest.raises(ValueError, match="backend must be one of"):
        auto(images[0], backend="tensorrt")


def test_stock_pipeline_through_use_backend(saved, images, monkeypatch):
    used = []
    original = backends.onnx_session
    monkeypatch.setattr(backends, "onnx_session", lambda m, **kwargs: used.append(m) or original(m, **kwargs))
    stock = pipeline("image-segmentation", model=str(saved))
    reference = stock(Image.fromarray(images[0]))
    assert not used
    plain = stock.model
    stock.model = backends.use_backend(plain)
    assert "forward" not in vars(plain)  # the model itself is left as it was
    fast = stock(Image.fromarray(images[0]))
    assert used
    assert [s["label"] for s in fast] == [s["label"] for s in reference]
    for a, b in zip(fast, reference):
        assert (np.asarray(a["mask"]) == np.asarray(b["mask"])).mean() > 0.99
    # Training calls keep the PyTorch forward (gradients flow).
    stock.model.train()
    pixels = torch.randn(1, 3, SIZE, SIZE)
    loss = stock.model(pixels, modality=torch.tensor([0]), labels=torch.zeros(1, 1, SIZE, SIZE)).loss
    loss.backward()
    stock.model.eval()
    assert backends.use_backend(stock.model, "eager") is plain


def test_segment_command_takes_the_backend_option(saved, images, tmp_path, monkeypatch):
    from esp_medsam_hf import cli

    used = []
    original = backends.onnx_session
    monkeypatch.setattr(backends, "onnx_session", lambda m, **kwargs: used.append(m) or original(m, **kwargs))
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(images[0]).save(folder / "a.png")
    assert cli.main(["segment", str(folder), "--model", str(saved), "--output", str(tmp_path / "eager"),
                     "--backend", "eager", "--no-progress", "--device", "cpu"]) == 0
    assert not used
    assert cli.main(["segment", str(folder), "--model", str(saved), "--output", str(tmp_path / "auto"),
                     "--no-progress", "--device", "cpu"]) == 0
    assert used
    eager = np.asarray(Image.open(tmp_path / "eager" / "a_mask.png")) > 0
    fast = np.asarray(Image.open(tmp_path / "auto" / "a_mask.png")) > 0
    assert (eager == fast).mean() > 0.99


def test_inference_batch_size_is_small_on_a_cpu_and_larger_on_an_accelerator():
    from esp_medsam_hf.models.esp_medsam.backends import CPU_INFERENCE_BATCH, inference_batch_size

    assert inference_batch_size("cpu") == inference_batch_size(torch.device("cpu")) == CPU_INFERENCE_BATCH == 2
    assert inference_batch_size("cuda:0") == 8 and inference_batch_size("cuda", accelerator_batch=32) == 32
    assert inference_batch_size("cpu", backend="onnxruntime") == backends.ONNX_CPU_BATCH == 4
    assert inference_batch_size("cpu", backend="eager") == 2


def test_export_is_logged_with_path_and_size_and_the_cache_is_bounded_lru(model, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(backends.CACHE_ENV, str(tmp_path))
    # two older exports of other weights (1 MB each); a user's file that is not an export is never touched
    old, older = tmp_path / "esp_medsam_old.onnx", tmp_path / "esp_medsam_older.onnx"
    for age, path in ((100, old), (200, older)):
        path.write_bytes(b"\0" * 1_000_000)
        os.utime(path, (time.time() - age, time.time() - age))
    mine = tmp_path / "notes.onnx"
    mine.write_bytes(b"\0" * 3_000_000)
    backends.clear_cache(tmp_path / "absent")  # a cache folder that does not exist is empty
    with caplog.at_level(logging.INFO, logger=backends.__name__):
        backends.onnx_session(model)
    (export,) = [p for p in tmp_path.glob("esp_medsam_*.onnx") if p not in (old, older)]
    size = export.stat().st_size
    assert f"exported {export} ({size / 1e6:.1f} MB" in caplog.text
    assert backends.cached_exports(tmp_path)[-1] == export and old.exists() and older.exists()  # under 512 MB

    # a bound that holds the new export and one old one: the least recently used (older) goes first
    monkeypatch.setenv(backends.CACHE_SIZE_ENV, str((size + 1_000_000) / 1e6))
    backends._sessions.clear()
    backends.onnx_session(model)
    assert not older.exists() and old.exists() and export.exists() and mine.exists()
    # a bound below the export in use keeps only that one
    monkeypatch.setenv(backends.CACHE_SIZE_ENV, "0")
    backends._sessions.clear()
    backends.onnx_session(model)
    assert backends.cached_exports(tmp_path) == [export] and mine.exists()

    assert backends.clear_cache(tmp_path) == (1, size)
    assert not export.exists() and mine.exists() and not backends._sessions


def test_cache_bound_and_cli(tmp_path, monkeypatch, capsys):
    from esp_medsam_hf.cli import main

    monkeypatch.setenv(backends.CACHE_SIZE_ENV, "lots")
    with pytest.raises(ValueError, match="ESP_MEDSAM_ONNX_CACHE_MB must be a number of megabytes, got 'lots'"):
        backends.cache_limit_bytes()
    monkeypatch.setenv(backends.CACHE_SIZE_ENV, "64")
    assert backends.cache_limit_bytes() == 64_000_000
    monkeypatch.setenv(backends.CACHE_ENV, str(tmp_path))
    (tmp_path / "esp_medsam_abc.onnx").write_bytes(b"\0" * 2_000_000)
    assert main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path}: 1 export(s), 2.0 MB (bound 64 MB" in out and "esp_medsam_abc.onnx  2.0 MB" in out
    assert main(["cache", "clear"]) == 0
    assert "removed 1 export(s), 2.0 MB" in capsys.readouterr().out and not any(tmp_path.iterdir())
