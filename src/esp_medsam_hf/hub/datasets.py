"""Publish a folder written by ``esp-medsam prepare`` to a Hub dataset repo: its card and Parquet shards."""

from __future__ import annotations

from pathlib import Path

from ..data.prepared import PreparedDataError, prepared_domains
from .publish import RetryPolicy, publish_dataset


def push_prepared(
    output_dir: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    endpoint: str | None = None,
    retry: RetryPolicy | None = None,
) -> str:
    """Upload a prepared folder (its dataset card and every ``<domain>/data/*.parquet``, not the Arrow copies or the
    reports) to a Hub dataset repo in one commit, through :func:`publish_dataset` (retries; the repo ends up holding
    exactly these files). ``endpoint`` defaults to ``HF_ENDPOINT``. Returns the commit id. Raises
    ``HubUnavailableError`` (a ``ConnectionError``) naming the endpoint if it cannot be reached, ``PublishError`` if
    the upload fails, ``PreparedDataError`` if the folder holds no prepared domain.
    """
    from huggingface_hub import HfApi

    output_dir = Path(output_dir)
    domains = prepared_domains(output_dir)
    if not domains:
        raise PreparedDataError(f"{output_dir}: no prepared domain (no <domain>/data/*.parquet) to push")
    return publish_dataset(
        repo_id, output_dir, api=HfApi(endpoint=endpoint, token=token), private=private, retry=retry or RetryPolicy(),
        allow_patterns=["README.md", *(f"{name}/data/*.parquet" for name in domains)],
    )
