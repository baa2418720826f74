"""Publishing to the Hugging Face Hub (one branch per training stage) and the embedded local Hub for tests/demos.

Names are imported lazily so that the local Hub's server process does not pay for huggingface_hub's import.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CITATION_BIBTEX": "cards",
    "DomainResult": "cards",
    "ModelCardInfo": "cards",
    "TrainingData": "cards",
    "build_dataset_card": "cards",
    "build_model_card": "cards",
    "LocalHub": "local",
    "LocalHubError": "local",
    "client_env": "local",
    "stop_local_hub": "local",
    "MAIN_BRANCH": "publish",
    "STAGE_BRANCHES": "publish",
    "HubUnavailableError": "publish",
    "PublishError": "publish",
    "RetryPolicy": "publish",
    "StageRelease": "publish",
    "publish_dataset": "publish",
    "publish_model": "publish",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
