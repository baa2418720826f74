"""Publishing to the Hugging Face Hub: model cards and one branch per training stage, and prepared datasets.

The card of a prepared dataset folder is written with the folder itself (:mod:`esp_medsam_hf.data.prepared`).
The embedded local Hub that tests and the demo publish to is a test double: :mod:`esp_medsam_hf.testing.localhub`.
"""

from __future__ import annotations

from .cards import CITATION_BIBTEX, DomainResult, ModelCardInfo, TrainingData, build_model_card
from .datasets import push_prepared
from .publish import (
    MAIN_BRANCH,
    STAGE_BRANCHES,
    HubUnavailableError,
    PublishError,
    RetryPolicy,
    StageRelease,
    publish_dataset,
    publish_model,
)

__all__ = [
    "CITATION_BIBTEX",
    "MAIN_BRANCH",
    "STAGE_BRANCHES",
    "DomainResult",
    "HubUnavailableError",
    "ModelCardInfo",
    "PublishError",
    "RetryPolicy",
    "StageRelease",
    "TrainingData",
    "build_model_card",
    "publish_dataset",
    "publish_model",
    "push_prepared",
]
