"""Hausdorff distance (pixels) between binary 2-D segmentation masks, as MONAI computes it (an ``evaluate`` module)."""

import evaluate

from esp_medsam_hf.metrics.functional import hausdorff_distance, mean_hausdorff
from esp_medsam_hf.metrics.mask_metric import MASK_ARGUMENTS, MaskMetric

_DESCRIPTION = """Symmetric Hausdorff distance in pixels, the same definition as MONAI's compute_hausdorff_distance
(Euclidean, include_background=False): edges are the mask minus its erosion (4-connected cross, background
border), hd is the maximum over both directions of the largest edge-to-nearest-edge distance, hd95 the maximum
over both directions of the 95th percentile. The ESP-MedSAM paper reports hd on 1024x1024 masks.
Empty masks, per image (MONAI's values): exactly one empty -> hd inf, hd95 nan; both empty -> both nan. The means
use only the images where both masks are non-empty; num_undefined counts the others."""

_KWARGS_DESCRIPTION = MASK_ARGUMENTS + """
Returns:
    hd: mean Hausdorff distance (the maximum) over the images where it is defined, in pixels.
    hd95: mean 95th-percentile Hausdorff distance over the same images, in pixels.
    per_image: list of {"hd": float, "hd95": float}, one per image (inf/nan for empty masks, as MONAI).
    num_undefined: number of images left out of the means (a mask empty).
Examples:
    >>> import numpy as np, evaluate, esp_medsam_hf
    >>> hausdorff = evaluate.load(esp_medsam_hf.metric_path("hausdorff"))
    >>> a = np.zeros((8, 8), bool); a[1:3, 1:3] = True
    >>> b = np.zeros((8, 8), bool); b[5:7, 1:3] = True
    >>> hausdorff.compute(predictions=[a], references=[b])["hd"]
    4.0
"""

_CITATION = """@article{huttenlocher1993,
  title={Comparing images using the Hausdorff distance},
  author={Huttenlocher, Daniel P. and Klanderman, Gregory A. and Rucklidge, William J.},
  journal={IEEE Transactions on Pattern Analysis and Machine Intelligence}, volume={15}, number={9},
  pages={850--863}, year={1993}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Hausdorff(MaskMetric):
    DESCRIPTION, CITATION, INPUTS_DESCRIPTION = _DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION

    def _compute_masks(self, predictions, references):
        per_image = [hausdorff_distance(p, r) for p, r in zip(predictions, references)]
        hd, undefined = mean_hausdorff([value[0] for value in per_image])
        hd95, _ = mean_hausdorff([value[1] for value in per_image])
        return {
            "hd": hd,
            "hd95": hd95,
            "per_image": [{"hd": a, "hd95": b} for a, b in per_image],
            "num_undefined": undefined,
        }
