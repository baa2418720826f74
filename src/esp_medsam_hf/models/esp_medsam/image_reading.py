"""Reading and normalising images for the model.

- Reading: ``load_image(path)`` reads DICOM (through pydicom: modality LUT or rescale, VOI LUT or window,
  MONOCHROME1 inversion, then 8 bit), 16-bit and float PNG/TIFF, greyscale, RGBA (alpha dropped) and palette images
  as HxWx3 uint8 RGB. The DICOM Modality tag gives the modality where it is unambiguous (``DICOM_MODALITIES``);
  otherwise the hint is ``None`` and the model's classifier decides.
- Normalising (``image_intensity.py``, re-exported here): ``to_rgb_uint8`` turns any image into HxWx3 uint8 RGB
  with ``stretch_to_uint8``, the package's one intensity stretch; NaN and infinite pixels are repaired first.

Every reader checks the image's size from its header before decoding anything (``check_image_budget``): more than
``MAX_IMAGE_PIXELS`` pixels (width x height x frames), or more than ``MAX_DECODED_BYTES`` decoded bytes (pixels x
samples x frames x bytes per sample), is refused with an ``ImageLoadError`` naming the file, the same budget for
PIL, tifffile (tiled and compressed TIFF included) and DICOM (deflated datasets are measured while inflating, in
bounded chunks, before pydicom inflates them; encapsulated pixel data is checked before it is decoded). Only
regular files are read, at most ``MAX_FILE_BYTES`` of them (``check_regular_file``: a FIFO, a device such as
``/dev/zero`` or a socket is refused without being opened); ``read_input_bytes`` gives a file's bytes with a
``.gz`` inflated under the same limit. The limits are module attributes, and the environment variables
``ESP_MEDSAM_MAX_DECODED_BYTES`` and ``ESP_MEDSAM_MAX_FILE_BYTES`` override the byte limits.

This module ships with saved models as remote code (the custom pipeline imports it), so it depends only on numpy and
Pillow at import time; pydicom and tifffile are imported when needed.
"""

from __future__ import annotations

import logging
import os
import stat
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .image_intensity import (
    DEFAULT_PERCENTILES,
    check_percentiles,
    repair_non_finite,
    scale_to_uint8,
    stretch_to_uint8,
    to_rgb_uint8,
)

logger = logging.getLogger(__name__)

DICOM_MODALITIES: dict[str, str] = {
    "CR": "x-ray",
    "DX": "x-ray",
    "US": "ultrasound",
    "OP": "fundus",
    "SM": "microscopy",
    "ES": "colonoscopy",
}
"""DICOM Modality (0008,0060) codes that name one of the model's modalities unambiguously."""

MAX_IMAGE_PIXELS = 100_000_000
"""Largest image (width x height, times frames) any reader decodes: 10000 x 10000. Checked from the file's header
before decoding (PIL's own decompression-bomb check, at about 179 million pixels, may refuse a file first)."""

MAX_DECODED_BYTES = 2**30
"""Largest decoded image in bytes (pixels x samples x frames x bytes per sample): 1 GiB, e.g. a 10000 x 10000
16-bit RGB image (600 MB) passes and 1024 x 1024 x 2000 samples does not. ``ESP_MEDSAM_MAX_DECODED_BYTES``
overrides it."""

MAX_FILE_BYTES = 512 * 2**20
"""Largest input file in bytes (after inflating a ``.gz``): 512 MiB. ``ESP_MEDSAM_MAX_FILE_BYTES`` overrides it."""

DEFLATED_TRANSFER_SYNTAX = "1.2.840.10008.1.2.1.99"
_INFLATE_CHUNK = 1 << 20

DICOM_SUFFIXES = (".dcm", ".dicom")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".ppm")
"""Raster image files by suffix: what ``esp-medsam segment`` collects from folders, the dataset layouts read and
natural-image folders hold."""
SUPPORTED_SUFFIXES = IMAGE_SUFFIXES + DICOM_SUFFIXES


class ImageLoadError(ValueError):
    """An image file that cannot be read; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path!r}: {reason}")


def check_pixel_count(path: str | os.PathLike, height: int, width: int, frames: int = 1) -> None:
    """Refuse an image larger than ``MAX_IMAGE_PIXELS`` before it is decoded (a decompression bomb)."""
    pixels = int(height) * int(width) * max(int(frames), 1)
    if pixels > MAX_IMAGE_PIXELS:
        frames_text = f" x {frames} frames" if frames > 1 else ""
        raise ImageLoadError(
            path, f"image of {width} x {height} pixels{frames_text} exceeds the limit of {MAX_IMAGE_PIXELS:,} "
                  "pixels (esp_medsam_hf.models.esp_medsam.image_reading.MAX_IMAGE_PIXELS); downsample it first"
        )


def _limit(name: str) -> int:
    """A byte limit: the environment variable ``ESP_MEDSAM_<name>`` if set, else the module attribute ``name``."""
    value = os.environ.get(f"ESP_MEDSAM_{name}")
    if value is None:
        return int(globals()[name])
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"ESP_MEDSAM_{name} must be a whole number of bytes, got {value!r}") from None


def check_image_budget(path: str | os.PathLike, height: int, width: int, *, frames: int = 1, samples: int = 1,
                       bytes_per_sample: int = 1) -> None:
    """The package's one memory budget for a decoded image, checked from the header before decoding: the pixel
    limit (``check_pixel_count``) and ``MAX_DECODED_BYTES`` for pixels x samples x frames x bytes per sample."""
    check_pixel_count(path, height, width, frames)
    limit = _limit("MAX_DECODED_BYTES")
    size = int(height) * int(width) * max(int(frames), 1) * max(int(samples), 1) * max(int(bytes_per_sample), 1)
    if size > limit:
        raise ImageLoadError(
            path, f"image of {width} x {height} pixels x {max(int(samples), 1)} samples x {max(int(frames), 1)} "
                  f"frame(s) x {bytes_per_sample} byte(s) decodes to {size:,} bytes, over the limit of {limit:,} "
                  "bytes (image_reading.MAX_DECODED_BYTES, or ESP_MEDSAM_MAX_DECODED_BYTES)"
        )


def check_regular_file(path: str | os.PathLike) -> int:
    """Refuse anything but a regular file of at most ``MAX_FILE_BYTES`` (a FIFO, device, socket or folder, also
    behind a symlink, is refused without being opened, so it can neither hang nor stream forever); returns the
    size."""
    try:
        info = os.stat(path)
    except OSError as error:
        raise ImageLoadError(path, f"no such file ({error.strerror})") from error
    if not stat.S_ISREG(info.st_mode):
        raise ImageLoadError(path, "not a regular file (a folder, FIFO, device or socket); expected an image file")
    limit = _limit("MAX_FILE_BYTES")
    if info.st_size > limit:
        raise ImageLoadError(path, f"file of {info.st_size:,} bytes is over the limit of {limit:,} bytes "
                                   "(image_reading.MAX_FILE_BYTES, or ESP_MEDSAM_MAX_FILE_BYTES)")
    return info.st_size


def _refuse_over(path: str | os.PathLike, chunks, limit: int) -> None:
    """Count (not keep) the bytes of ``chunks``; refuse as soon as they pass ``limit``."""
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if total > limit:
            raise ImageLoadError(path, f"compressed data inflates to more than the limit of {limit:,} bytes")


def _inflate_chunks(inflater, handle):
    """The output of ``inflater`` over the rest of ``handle``, in chunks of at most ``_INFLATE_CHUNK`` bytes."""
    while data := handle.read(_INFLATE_CHUNK):
        while data and not inflater.eof:
            yield inflater.decompress(data, _INFLATE_CHUNK)
            data = inflater.unconsumed_tail


def read_input_bytes(path: str | os.PathLike) -> bytes:
    """A regular file's bytes (``check_regular_file``); a ``.gz`` file is inflated, refused once it passes
    ``MAX_FILE_BYTES`` (measured in bounded chunks first, so a gzip bomb is never held in memory)."""
    check_regular_file(path)
    if not str(path).lower().endswith(".gz"):
        with open(path, "rb") as handle:
            return handle.read()
    import gzip

    try:
        with gzip.open(path, "rb") as handle:
            _refuse_over(path, iter(lambda: handle.read(_INFLATE_CHUNK), b""), _limit("MAX_FILE_BYTES"))
        with gzip.open(path, "rb") as handle:
            return handle.read()
    except (OSError, EOFError, zlib.error) as error:
        raise ImageLoadError(path, f"not a readable gzip file ({error})") from error


def _dicom_dataset_offset(handle) -> int | None:
    """Byte offset where a DICOM file's dataset starts (after the preamble and the explicit-VR group 2 file meta),
    or ``None`` when the file has no preamble."""
    handle.seek(128)
    if handle.read(4) != b"DICM":
        return None
    long_vrs = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
    while True:
        start = handle.tell()
        header = handle.read(8)
        if len(header) < 8 or int.from_bytes(header[:2], "little") != 0x0002:
            return start
        if header[4:6] in long_vrs:
            length = int.from_bytes(handle.read(4), "little")
        else:
            length = int.from_bytes(header[6:8], "little")
        handle.seek(length, os.SEEK_CUR)


def check_dicom_inflation(path: str | os.PathLike) -> None:
    """A deflated DICOM dataset (transfer syntax 1.2.840.10008.1.2.1.99) is measured in bounded chunks before
    pydicom inflates it whole: more than ``MAX_DECODED_BYTES`` is refused."""
    from pydicom.filereader import read_file_meta_info

    try:
        syntax = str(read_file_meta_info(path).get("TransferSyntaxUID", ""))
    except Exception:  # no or broken file meta: pydicom's own reader reports it
        return
    if syntax != DEFLATED_TRANSFER_SYNTAX:
        return
    with open(path, "rb") as handle:
        offset = _dicom_dataset_offset(handle)
        if offset is None:
            return
        handle.seek(offset)
        try:
            _refuse_over(path, _inflate_chunks(zlib.decompressobj(-zlib.MAX_WBITS), handle),
                         _limit("MAX_DECODED_BYTES"))
        except zlib.error as error:
            raise ImageLoadError(path, f"not a readable deflated DICOM dataset ({error})") from error


def is_dicom(path: str | os.PathLike) -> bool:
    """True for a ``.dcm``/``.dicom`` file or any file with the DICOM preamble ("DICM" at byte 128)."""
    if str(path).lower().endswith(DICOM_SUFFIXES):
        return True
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # never open a FIFO or device to peek
            return False
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _voi_output_range(ds: Any, apply_voi_lut) -> tuple[float, float] | None:
    """The value range that pydicom's VOI transform maps into, or ``None`` when the file has no VOI transform.

    A VOI LUT maps into the range of its table (read through pydicom at every input it covers); a window maps into
    ``[y_min, y_max]`` of the stored bit depth (pydicom computes these bounds internally), so the window is evaluated
    at the two extremes to read them.
    """
    sequence = ds.get("VOILUTSequence")
    if sequence:
        count, first = int(sequence[0].LUTDescriptor[0]) or 65536, int(sequence[0].LUTDescriptor[1])
        table = np.asarray(apply_voi_lut(np.arange(first, first + count), ds), dtype=np.float64)
        return float(table.min()), float(table.max())
    if "WindowCenter" in ds and "WindowWidth" in ds:
        extremes = np.array([-np.finfo(np.float64).max, np.finfo(np.float64).max])
        with np.errstate(over="ignore"):
            low, high = apply_voi_lut(extremes, ds)
        return float(low), float(high)
    return None


def _dicom_to_rgb(ds: Any, pixels: np.ndarray, photometric: str, path: str | os.PathLike, apply_modality_lut,
                  apply_voi_lut) -> np.ndarray:
    """A DICOM frame -> HxWx3 uint8 RGB: colour as it is; grey through the modality LUT, the VOI LUT or window
    (a window of width < 1 or a rescale that overflows is refused) and MONOCHROME1 inversion."""
    if int(ds.get("SamplesPerPixel", 1)) > 1:  # colour: pydicom already converted YBR to RGB
        return to_rgb_uint8(pixels)
    if "WindowWidth" in ds and "VOILUTSequence" not in ds:
        widths = ds.WindowWidth if ds["WindowWidth"].VM > 1 else [ds.WindowWidth]
        if float(widths[0]) < 1:
            raise ImageLoadError(path, f"WindowWidth {widths[0]} is below 1 (DICOM PS3.3 C.11.2.1.2)")
    with np.errstate(over="ignore", invalid="ignore"):
        modality_values = np.asarray(apply_modality_lut(pixels, ds))
    stored_finite = not np.issubdtype(pixels.dtype, np.floating) or np.isfinite(pixels).all()
    if stored_finite and np.issubdtype(modality_values.dtype, np.floating) and not np.isfinite(modality_values).all():
        raise ImageLoadError(path, "RescaleSlope/RescaleIntercept overflow: the modality values are not finite")
    modality_values = repair_non_finite(modality_values, path)
    voi_range = _voi_output_range(ds, apply_voi_lut)
    if voi_range is not None:
        grey = scale_to_uint8(apply_voi_lut(modality_values, ds), *voi_range)
    else:
        grey = stretch_to_uint8(modality_values, path, percentiles=None)  # no window given: the stored value range
    if photometric == "MONOCHROME1":  # MONOCHROME1: the lowest value is displayed white
        grey = 255 - grey
    return np.repeat(grey[..., None], 3, axis=-1)


def read_dicom(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """A DICOM file -> (HxWx3 uint8 RGB, metadata). Multi-frame files give their first frame."""
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError as error:  # optional for remote-code users who never read DICOM
        raise ImportError("reading DICOM files needs pydicom: pip install pydicom") from error
    check_regular_file(path)
    check_dicom_inflation(path)
    try:
        ds = pydicom.dcmread(path)
    except Exception as error:  # pydicom raises many types (InvalidDicomError, AttributeError, ValueError...)
        raise ImageLoadError(path, f"not a readable DICOM file ({type(error).__name__}: {error})") from error
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        shape = (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))
        samples, bits = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.get("BitsAllocated", 8) or 8)
    except (TypeError, ValueError) as error:
        raise ImageLoadError(path, f"DICOM image header is not numeric ({error})") from error
    check_image_budget(path, *shape, frames=frames, samples=samples, bytes_per_sample=-(-bits // 8))
    try:
        pixels = ds.pixel_array
        if frames > 1:
            logger.warning("%s has %d frames; using the first", path, frames)
            pixels = pixels[0]
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
        image = _dicom_to_rgb(ds, pixels, photometric, path, apply_modality_lut, apply_voi_lut)
    except ImageLoadError:
        raise
    except Exception as error:  # pydicom/numpy raise many types on bad tags (struct.error, ValueError, ...)
        raise ImageLoadError(path, f"not a readable DICOM image ({type(error).__name__}: {error})") from error
    code = str(ds.get("Modality", "") or "").upper()
    metadata = {
        "path": str(path),
        "format": "dicom",
        "dicom_modality": code or None,
        "modality": DICOM_MODALITIES.get(code),
        "photometric_interpretation": photometric,
        "frames": frames,
        "original_dtype": str(pixels.dtype),
    }
    return image, metadata


def check_pil_budget(path: str | os.PathLike, image: Image.Image) -> None:
    """``check_image_budget`` for an opened (not yet decoded) PIL image: its bands and their bytes (mode I and F:
    4, I;16: 2, the rest: 1)."""
    bytes_per_sample = 4 if image.mode in ("I", "F") else 2 if image.mode.startswith("I;16") else 1
    check_image_budget(path, image.height, image.width, samples=len(image.getbands()),
                       bytes_per_sample=bytes_per_sample)


def read_raster(
    path: str | os.PathLike, percentiles: tuple[float, float] | list[float] | None = DEFAULT_PERCENTILES
) -> tuple[np.ndarray, dict[str, Any]]:
    """PNG, JPEG, TIFF, BMP, GIF or WebP -> (HxWx3 uint8 RGB, metadata). EXIF orientation is applied; 16-bit and
    float images are stretched with ``percentiles`` (:func:`stretch_to_uint8`)."""
    suffix = Path(path).suffix.lower()
    check_regular_file(path)
    if suffix in (".tif", ".tiff"):
        # tifffile reads what PIL cannot (16-bit RGB, float, many samples); PIL remains the fallback.
        try:
            import tifffile
        except ImportError:
            tifffile = None
        if tifffile is not None:
            try:
                with tifffile.TiffFile(path) as tif:
                    page = tif.pages[0]
                    # the header gives the size; tiles and compression are only decoded after this check
                    check_image_budget(path, page.imagelength, page.imagewidth, frames=max(page.imagedepth, 1),
                                       samples=page.samplesperpixel, bytes_per_sample=-(-page.bitspersample // 8))
                    array = page.asarray()
                    axes = page.axes
            except ImageLoadError:
                raise
            except Exception as error:
                raise ImageLoadError(path, f"not a readable TIFF image ({type(error).__name__}: {error})") from error
            if array.ndim == 3 and axes.startswith("S"):
                array = np.moveaxis(array, 0, -1)  # planar (C, H, W) storage, known from the header, not guessed
            try:
                image = to_rgb_uint8(repair_non_finite(array, path), percentiles)
            except ValueError as error:
                raise ImageLoadError(path, str(error)) from error
            return image, {"path": str(path), "format": "tiff", "modality": None, "original_dtype": str(array.dtype)}
    try:
        with Image.open(path) as opened:
            check_pil_budget(path, opened)
            opened.seek(0)
            file_format = opened.format
            pil = ImageOps.exif_transpose(opened)
            pil.load()
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageLoadError(path, f"image exceeds the limit of {MAX_IMAGE_PIXELS:,} pixels ({error})") from error
    except Exception as error:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise ImageLoadError(path, f"not a readable image ({type(error).__name__}: {error})") from error
    metadata = {
        "path": str(path),
        "format": (file_format or suffix.lstrip(".") or "unknown").lower(),
        "modality": None,
        "original_mode": pil.mode,
    }
    if pil.mode == "F":  # float images may hold NaN or inf
        return to_rgb_uint8(repair_non_finite(np.asarray(pil), path), percentiles), metadata
    return to_rgb_uint8(pil, percentiles), metadata


def load_image(
    path: str | os.PathLike, percentiles: tuple[float, float] | list[float] | None = DEFAULT_PERCENTILES
) -> tuple[np.ndarray, dict[str, Any]]:
    """Read an image file -> (HxWx3 uint8 RGB array, metadata); a 16-bit or float raster image is stretched with
    ``percentiles`` (the image processor's ``intensity_percentiles``; DICOM files use their own window).

    metadata: ``path``, ``format`` ("dicom", "png", "tiff", ...), ``modality`` (a modality name given by the file,
    i.e. an unambiguous DICOM Modality tag, else ``None``), plus format details (``dicom_modality``,
    ``photometric_interpretation``, ``original_dtype``/``original_mode``). Raises ``ImageLoadError`` (a
    ``ValueError``) naming the file when it is missing or unreadable.
    """
    check_regular_file(path)
    if is_dicom(path):
        return read_dicom(path)
    return read_raster(path, percentiles)


__all__ = [
    "DICOM_MODALITIES",
    "DICOM_SUFFIXES",
    "IMAGE_SUFFIXES",
    "ImageLoadError",
    "MAX_DECODED_BYTES",
    "MAX_FILE_BYTES",
    "MAX_IMAGE_PIXELS",
    "SUPPORTED_SUFFIXES",
    "check_dicom_inflation",
    "check_image_budget",
    "check_pil_budget",
    "check_pixel_count",
    "check_regular_file",
    "is_dicom",
    "load_image",
    "read_dicom",
    "read_input_bytes",
    "read_raster",
    "repair_non_finite",
    "scale_to_uint8",
    "stretch_to_uint8",
    "check_percentiles",
    "DEFAULT_PERCENTILES",
    "to_rgb_uint8",
]
