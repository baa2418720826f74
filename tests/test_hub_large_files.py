"""The local Hub under load (issue 24, item 8): a large (LFS) file is answered by the write server from its stored
object, streamed, with the Hub's metadata (sha256 ETag, commit, size), instead of by olah, which reads and hashes
the whole file before its first byte (past huggingface_hub's 10 s timeouts on a busy machine)."""

from __future__ import annotations

import hashlib
import os

import pytest
from huggingface_hub import HfApi, constants, get_hf_file_metadata, hf_hub_download, hf_hub_url

from _hub_helpers import olah_available
from esp_medsam_hf.testing.localhub import LocalHub


@pytest.mark.skipif(not olah_available(), reason="the local Hub needs olah (the dev extra)")
def test_an_lfs_file_is_served_from_its_stored_object_with_the_hubs_metadata(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    content = os.urandom(11 << 20)  # above the 10 MB from which uploads are stored the git-lfs way
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(content)
    (folder / "config.json").write_text('{"model_type": "esp_medsam"}')
    with LocalHub(tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint, token=hub.token)
        api.create_repo("me/big")
        commit = api.upload_folder(repo_id="me/big", folder_path=folder).oid
        url = hf_hub_url("me/big", "model.safetensors", endpoint=hub.endpoint)
        metadata = get_hf_file_metadata(url, token=hub.token)
        assert metadata.etag == hashlib.sha256(content).hexdigest()
        assert (metadata.commit_hash, metadata.size) == (commit, len(content))
        kwargs = dict(endpoint=hub.endpoint, token=hub.token, cache_dir=tmp_path / "cache")
        with open(hf_hub_download("me/big", "model.safetensors", **kwargs), "rb") as handle:
            assert handle.read() == content
        with open(hf_hub_download("me/big", "config.json", **kwargs)) as handle:
            assert handle.read() == '{"model_type": "esp_medsam"}'
        with pytest.raises(Exception, match="does not exist"):
            hf_hub_download("me/big", "missing.safetensors", **kwargs)
        olah_log = next((tmp_path / "hub" / "olah" / "logs").glob("*.log")).read_text()
    assert "resolve/main/config.json" in olah_log  # small files still come from olah
    assert "model.safetensors" not in olah_log
