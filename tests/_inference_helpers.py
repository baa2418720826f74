"""Shared helpers of the inference tests: a tiny saved model, small DICOM files, a Python that cannot import us."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from types import SimpleNamespace

import numpy as np
import torch

from esp_medsam_hf import EspMedSamConfig, EspMedSamImageProcessor, EspMedSamModel, EspMedSamProcessor
from esp_medsam_hf.models.esp_medsam.pipeline_esp_medsam import save_pretrained_with_pipeline

IMAGE_SIZE = 64


def single_thread():
    """Generator for a module fixture: one torch thread while the module runs (tiny models on a loaded 2-core
    machine run ~50x faster than with OpenMP threads competing), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed: int = 0, image_size: int = IMAGE_SIZE) -> tuple[EspMedSamModel, EspMedSamProcessor]:
    """A random tiny model (eval mode) and its processor, deterministic by seed."""
    torch.manual_seed(seed)
    config = EspMedSamConfig.tiny(image_size=image_size)
    model = EspMedSamModel(config).eval()
    # "whole": a random model's masks are noise, which the automatic scale would read as tiny objects and tile; the
    # pipelines' tests compare against the whole-view forward and the stock pipeline (which is whole-view), and
    # tests/test_tiling.py covers every scale
    image_processor = EspMedSamImageProcessor(size={"height": image_size, "width": image_size}, inference_scale="whole")
    return model, EspMedSamProcessor(image_processor, config.modality_names)


def pointwise_model() -> tuple[EspMedSamModel, EspMedSamProcessor]:
    """A tiny model answering with a pointwise function of its input: logits = 4 x (channel mean - 0.5) at the
    input's full size, modality 0; its processor feeds intensities in [0, 1] (no mean/std), so the model thresholds
    the image at half its range. Tiling such a model must give the same map as applying it to the whole image."""
    model, processor = tiny_model()
    processor.image_processor.image_mean = [0.0, 0.0, 0.0]
    processor.image_processor.image_std = [1.0, 1.0, 1.0]

    def forward(pixel_values, modality=None, **kwargs):
        batch = pixel_values.shape[0]
        return SimpleNamespace(
            pred_masks=4.0 * (pixel_values.mean(1, keepdim=True) - 0.5), patch_logits=None, image_embeddings=None,
            modality_logits=torch.zeros(batch, model.config.num_modalities),
            modality=torch.zeros(batch, dtype=torch.long),
        )

    model.forward = forward
    return model, processor


def save_tiny_model(directory: Path, seed: int = 0) -> Path:
    """Save a tiny model with both pipelines' files (config, weights, code, preprocessor, custom pipeline)."""
    model, processor = tiny_model(seed)
    return save_pretrained_with_pipeline(model, processor, directory)


def write_dicom(path: Path, pixels: np.ndarray, **tags) -> Path:
    """A minimal valid DICOM file (explicit VR little endian) holding ``pixels`` and the given tags."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = tags.pop("Modality", "OT")
    ds.Rows, ds.Columns = pixels.shape[:2]
    colour = pixels.ndim == 3
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = tags.pop("PhotometricInterpretation", "RGB" if colour else "MONOCHROME2")
    if colour:
        ds.PlanarConfiguration = 0
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated = bits
    ds.BitsStored = tags.pop("BitsStored", bits)
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    for name, value in tags.items():
        setattr(ds, name, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


HIDE_PACKAGE = textwrap.dedent(
    """
    import sys
    sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    sys.path = [p for p in sys.path if not p.rstrip("/").endswith("/src")]
    for name in list(sys.modules):
        if name.startswith("esp_medsam_hf"):
            del sys.modules[name]
    try:
        import esp_medsam_hf
    except ImportError:
        pass
    else:
        raise SystemExit("esp_medsam_hf is still importable: the test would not exercise remote code")
    """
)


def run_without_package(
    code: str, cwd: Path, timeout: float = 240, hub_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python where esp_medsam_hf cannot be imported (only remote code is available);
    offline, unless ``hub_env`` (a local Hub's client environment) is given."""
    script = cwd / "fresh_process.py"
    script.write_text(HIDE_PACKAGE + textwrap.dedent(code))
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(cwd),
           "HF_HOME": str(cwd / "hf_home"), "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    if hub_env is not None:
        env.update({**hub_env, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0"})
    proc = subprocess.run([sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"fresh process failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


MASK_AGREEMENT = 0.9999
"""Masks from two code paths (another process, backend or CPU) may differ where a logit sits at the threshold: they
must agree on this share of pixels. One machine differed on 3 of 1,990,921 pixels (0.00015 %)."""


def assert_masks_agree(actual: np.ndarray, expected: np.ndarray, min_agreement: float = MASK_AGREEMENT) -> None:
    """Two boolean masks of one shape agree on at least ``min_agreement`` of their pixels."""
    actual, expected = np.asarray(actual, dtype=bool), np.asarray(expected, dtype=bool)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    agreement = float((actual == expected).mean())
    assert agreement >= min_agreement, f"masks agree on {agreement:.6%} of pixels, expected >= {min_agreement:.4%}"


TARGET_SIZE = 64
"""Input size of the tiny models of the target tests."""


def base_model() -> EspMedSamModel:
    """The target tests' tiny model (seed 0, eval mode)."""
    torch.manual_seed(0)
    return EspMedSamModel(EspMedSamConfig.tiny(image_size=TARGET_SIZE)).eval()


def model_with_disc() -> EspMedSamModel:
    """:func:`base_model` with the extra target "optic disc" (fundus), its query moved so that its masks are its own
    (not fundus's)."""
    from esp_medsam_hf.training.targets import add_target

    model = add_target(base_model(), "optic disc", "fundus").eval()
    with torch.no_grad():
        model.mask_decoder.target_queries[0].add_(0.5)
    return model


def masks(model: EspMedSamModel, images: torch.Tensor, **kwargs) -> torch.Tensor:
    """``model``'s mask logits for ``images`` without gradients."""
    with torch.no_grad():
        return model(images, **kwargs).pred_masks
