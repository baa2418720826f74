"""Stand-in for transformers' utils/fetch_hub_objects_for_ci.py (not in the sdist).

transformers' CI downloads fixture files beforehand and maps their URLs to the local copies; without a local copy
the URL itself is returned, which is what this stand-in does (the common tests we run build their images in memory).
"""


def url_to_local_path(url: str) -> str:
    """The local path of a fixture URL: here always the URL itself (no local copies)."""
    return url
