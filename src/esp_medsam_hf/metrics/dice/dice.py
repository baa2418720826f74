"""Dice coefficient (%) of binary 2-D segmentation masks, as reported by ESP-MedSAM (an ``evaluate`` module)."""

import datasets
import evaluate

from esp_medsam_hf.metrics.functional import as_masks, dice_score, mean_dice

_DESCRIPTION = """Dice coefficient 2|P & R| / (|P| + |R|) in %, per image and averaged over images. Masks are HxW
arrays; any non-zero value is foreground. Both masks empty: 100. Empty reference, non-empty prediction: 0
(as MONAI's DiceMetric with ignore_empty=False)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of HxW binary masks (bool, 0/1 or 0/255 arrays or tensors, or PIL images such as a dataset's
        own mask column).
    references: list of HxW binary masks of the same sizes.
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
class Dice(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("bool"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("bool"))),
                }
            ),
        )

    def compute(self, *, predictions=None, references=None, **kwargs):
        """As ``evaluate.Metric.compute``; masks may also be PIL images or 0/255 arrays (see ``as_masks``)."""
        return super().compute(
            predictions=as_masks(predictions, "predictions"), references=as_masks(references, "references"), **kwargs
        )

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """As ``evaluate.Metric.add_batch``, with the inputs of ``compute``."""
        return super().add_batch(
            predictions=as_masks(predictions, "predictions"), references=as_masks(references, "references"), **kwargs
        )

    def add(self, *, prediction=None, reference=None, **kwargs):
        """As ``evaluate.Metric.add``, with the inputs of ``compute``."""
        prediction = None if prediction is None else as_masks([prediction], "prediction")[0]
        reference = None if reference is None else as_masks([reference], "reference")[0]
        return super().add(prediction=prediction, reference=reference, **kwargs)

    def _compute(self, predictions, references):
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
        per_image = [dice_score(p, r) for p, r in zip(predictions, references)]
        return {"dice": mean_dice(per_image), "per_image": per_image}
