"""A Pillow plugin that reads DICOM files, recognised by content (the "DICM" preamble), through
``image_reading.read_dicom``.

Why: code that opens images with Pillow (transformers' ``load_image``, so the stock image-segmentation pipeline)
would otherwise read a DICOM file that also carries a TIFF header in its preamble (as pydicom-data's
``RG1_UNCR.dcm`` does) as a 16-bit TIFF, which ``convert("RGB")`` clips to a white image, or fail on any other
DICOM file. With this plugin, ``PIL.Image.open`` gives the same 8-bit RGB pixels as ``image_reading.load_image``
(modality LUT, VOI window, MONOCHROME1 inversion) and ``image.info["modality"]`` holds the modality the file's
Modality tag names, if any.

Building an image processor registers the plugin (``EspMedSamImageProcessor.__init__``; importing it does not),
so it is in place wherever the model's image processor is loaded, with the package or as remote code;
``esp_medsam_hf.register()`` registers it too. It is tried before every other format, because a DICOM file can look
like a TIFF to the TIFF plugin; for other files it only reads the 4 bytes at offset 128.
"""

from __future__ import annotations

import os

from PIL import Image, ImageFile

from .image_reading import read_dicom

FORMAT = "DICOM"


class DicomImageFile(ImageFile.ImageFile):
    """A DICOM file's first frame as an 8-bit RGB image (pixels decoded by pydicom when the file is opened)."""

    format = FORMAT
    format_description = "DICOM (pixels read with pydicom, windowed to 8-bit RGB)"

    def _open(self) -> None:
        self.fp.seek(128)
        if self.fp.read(4) != b"DICM":
            raise SyntaxError("not a DICOM file (no DICM preamble)")
        self.fp.seek(0)
        source = self.filename if isinstance(self.filename, (str, os.PathLike)) and self.filename else self.fp
        pixels, metadata = read_dicom(source)
        self._pixels = pixels
        self._mode = "RGB"
        self._size = (pixels.shape[1], pixels.shape[0])
        self.info.update({key: metadata[key] for key in ("modality", "dicom_modality") if metadata.get(key)})
        self.tile = []

    def load(self):
        if self._im is None:
            self.im = Image.fromarray(self._pixels, "RGB").im
        return Image.Image.load(self)


def register() -> None:
    """Register the plugin and put it first in Pillow's list of formats to try (idempotent)."""
    if Image.ID[:1] == [FORMAT] and FORMAT in Image.OPEN:
        return
    Image.register_open(FORMAT, DicomImageFile)
    Image.register_extensions(FORMAT, [".dcm", ".dicom"])
    Image.ID.remove(FORMAT)
    Image.ID.insert(0, FORMAT)


__all__ = ["DicomImageFile", "register"]
