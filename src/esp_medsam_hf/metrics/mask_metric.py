"""The ``evaluate.Metric`` that the package's mask metrics (``dice``, ``hausdorff``) share: their inputs, features,
mask coercion and length check.

``evaluate.load(metric_path(name))`` copies only the metric's own script into its module cache; the script imports
this module (and :mod:`.functional`) from the installed package, so the shared part is not repeated per script.
``MaskMetric`` is abstract: ``evaluate`` takes the first non-abstract ``Metric`` it finds in a script as the
script's metric, and the imported base class comes before the script's own.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import Any

import datasets
import evaluate

from .functional import as_masks

MASK_ARGUMENTS = """
Args:
    predictions: list of HxW binary masks (bool, 0/1 or 0/255 arrays or tensors, or PIL images such as a dataset's
        own mask column).
    references: list of HxW binary masks of the same sizes."""
"""The ``Args`` part of both metrics' input descriptions."""


class MaskMetric(evaluate.Metric, metaclass=ABCMeta):
    """A metric of lists of HxW binary masks. Subclasses set ``DESCRIPTION``, ``CITATION`` and
    ``INPUTS_DESCRIPTION`` and implement ``_compute_masks(predictions, references)`` over boolean arrays."""

    DESCRIPTION = ""
    CITATION = ""
    INPUTS_DESCRIPTION = ""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=self.DESCRIPTION,
            citation=self.CITATION,
            inputs_description=self.INPUTS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("bool"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("bool"))),
                }
            ),
        )

    def compute(self, *, predictions=None, references=None, **kwargs) -> dict[str, Any] | None:
        """As ``evaluate.Metric.compute``; masks may also be PIL images or 0/255 arrays (see ``as_masks``)."""
        return super().compute(
            predictions=as_masks(predictions, "predictions"), references=as_masks(references, "references"), **kwargs
        )

    def add_batch(self, *, predictions=None, references=None, **kwargs) -> None:
        """As ``evaluate.Metric.add_batch``, with the inputs of ``compute``."""
        return super().add_batch(
            predictions=as_masks(predictions, "predictions"), references=as_masks(references, "references"), **kwargs
        )

    def add(self, *, prediction=None, reference=None, **kwargs) -> None:
        """As ``evaluate.Metric.add``, with the inputs of ``compute``."""
        prediction = None if prediction is None else as_masks([prediction], "prediction")[0]
        reference = None if reference is None else as_masks([reference], "reference")[0]
        return super().add(prediction=prediction, reference=reference, **kwargs)

    def _compute(self, predictions, references) -> dict[str, Any]:
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
        return self._compute_masks(predictions, references)

    @abstractmethod
    def _compute_masks(self, predictions, references) -> dict[str, Any]:
        """The metric of equally long lists of HxW boolean arrays."""
