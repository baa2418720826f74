"""Dice coefficient (%) of binary 2-D segmentation masks, as reported by ESP-MedSAM (an ``evaluate`` module)."""

import evaluate

from esp_medsam_hf.metrics.functional import dice_score, mean_dice
from esp_medsam_hf.metrics.mask_metric import MASK_ARGUMENTS, MaskMetric

_DESCRIPTION = """Dice coefficient 2|P & R| / (|P| + |R|) in %, per image and averaged over images. Masks are HxW
arrays; any non-zero value is foreground. Both masks empty: 100. Empty reference, non-empty prediction: 0
(as MONAI's DiceMetric with ignore_empty=False)."""

_KWARGS_DESCRIPTION = MASK_ARGUMENTS + """
Returns:
    dice: mean Dice over images, in %.
    per_image: Dice of each image, in %.
Examples:
    >>> import numpy as np, evaluate, esp_medsam_hf
    >>> dice = evaluate.load(esp_medsam_hf.metric_path("dice"))
    >>> a = np.zeros((4, 4), bool); a[:2] = True
    >>> dice.compute(predictions=[a], references=[a])["dice"]
    100.0
"""

_CITATION = """@article{dice1945,
  title={Measures of the amount of ecologic association between species},
  author={Dice, Lee R.}, journal={Ecology}, volume={26}, number={3}, pages={297--302}, year={1945}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Dice(MaskMetric):
    DESCRIPTION, CITATION, INPUTS_DESCRIPTION = _DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION

    def _compute_masks(self, predictions, references):
        per_image = [dice_score(p, r) for p, r in zip(predictions, references)]
        return {"dice": mean_dice(per_image), "per_image": per_image}
