"""The embedded local Hub: olah (read side, on a Unix socket) behind our write server on 127.0.0.1 (``launcher.py``).

Standard library (and PyYAML) only, and nothing from the rest of esp_medsam_hf: the write server's process loads
this folder as a stand-alone package, without the torch and transformers imports of ``esp_medsam_hf``.
"""

from __future__ import annotations

from .launcher import LocalHub, LocalHubError, client_env, find_olah, stop_local_hub

__all__ = ["LocalHub", "LocalHubError", "client_env", "find_olah", "stop_local_hub"]
