"""The embedded REAL evaluation case: stardist's DSB 2018 nuclei image with its 125-nucleus mask.

stardist (BSD-3) ships one image of the Data Science Bowl 2018 (the microscopy source domain) and its
hand-annotated instance labels; :func:`esp_medsam_hf.assets.load_dsb2018_pair` reads them from the installed
package. Here they become a one-row ``test`` split in the package's dataset schema (domain ``dsb``).
"""

from __future__ import annotations

from ..assets import DSB2018_IMAGE, load_dsb2018_pair
from .domains import get_domain
from .schema import encode_mask, encode_png, features

FILE_NAME = "stardist_dsb2018_img2d.png"


def dsb2018_real_case():
    """``DatasetDict({"test": 1 row})``: the real DSB 2018 image (512x512 RGB) and its binary nuclei mask.

    Raises ``FileNotFoundError`` naming the pip requirement if stardist is not installed.
    """
    import datasets

    image, mask = load_dsb2018_pair()
    domain = get_domain("dsb")
    row = {
        "image": [encode_png(image)],
        "mask": [encode_mask(mask)],
        "modality": [domain.modality_index],
        "domain": [domain.index],
        "file_name": [FILE_NAME],
    }
    info = datasets.DatasetInfo(
        description=(
            "REAL microscopy case: one Data Science Bowl 2018 image and its 125 hand-annotated nuclei, as shipped "
            f"by {DSB2018_IMAGE.requirement} (data/images/img2d.tif, mask2d.tif; mask = labels > 0)."
        ),
        citation=domain.citation,
        features=features(),
    )
    test = datasets.Dataset.from_dict(row, info=info, split=datasets.Split.TEST)
    return datasets.DatasetDict({"test": test})
