"""A failed download of a model's weights from the (local) Hub names its real cause.

transformers asks for ``model.safetensors`` with missing entries allowed, and huggingface_hub turns a server error
or a timeout into "not found": the user then reads that the repository has no ``pytorch_model.bin``.
``EspMedSamModel.from_pretrained`` fetches the weights directly after such a failure and raises that error; when the
direct fetch works (a transient failure), the load goes through. The local Hub answers 503 for the weights only
(``read-file`` faults)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx2
import pytest
from _hub_helpers import olah_available
from huggingface_hub import HfApi

pytestmark = pytest.mark.skipif(not olah_available(), reason="olah (the local Hub's mirror) is not installed")
REPO = "esp/download-errors"

LOAD = """
import json, sys
from esp_medsam_hf.models.esp_medsam.modeling_esp_medsam import EspMedSamModel
try:
    model = EspMedSamModel.from_pretrained(sys.argv[1])
    print("RESULT " + json.dumps({"loaded": True, "parameters": sum(p.numel() for p in model.parameters())}))
except OSError as error:
    print("RESULT " + json.dumps({"loaded": False, "message": str(error)}))
"""


@pytest.fixture(scope="module")
def published(hub, tmp_path_factory):
    from esp_medsam_hf.models.esp_medsam.configuration_esp_medsam import EspMedSamConfig
    from esp_medsam_hf.models.esp_medsam.modeling_esp_medsam import EspMedSamModel

    folder, model = tmp_path_factory.mktemp("tiny"), EspMedSamModel(EspMedSamConfig.tiny())
    model.save_pretrained(folder)
    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    api.create_repo(REPO, exist_ok=True)
    api.upload_folder(repo_id=REPO, folder_path=folder)
    return sum(p.numel() for p in model.parameters())


def set_faults(hub, *faults: dict) -> None:
    httpx2.post(f"{hub.endpoint}/_local/faults", json={"faults": list(faults)},
                headers={"Authorization": f"Bearer {hub.token}"}).raise_for_status()


def load_with_failures(hub, tmp_path, times: int) -> dict:
    """``load`` while the local Hub answers 503 to the first ``times`` reads of ``model.safetensors``."""
    set_faults(hub, {"route": "read-file", "action": "503", "times": times, "path": "model.safetensors"})
    try:
        return load(hub, tmp_path)
    finally:
        set_faults(hub)


def load(hub, tmp_path) -> dict:
    """``from_pretrained(REPO)`` in a fresh process (huggingface_hub reads HF_ENDPOINT at import), empty cache."""
    env = {**os.environ, **hub.env, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "0"}
    proc = subprocess.run([sys.executable, "-c", LOAD, REPO], env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT ", 1)[1])


def test_a_failing_weights_download_names_the_server_error(hub, published, tmp_path):
    result = load_with_failures(hub, tmp_path, times=100)
    assert not result["loaded"]
    assert "pytorch_model.bin" not in result["message"], result["message"]
    assert "model.safetensors failed" in result["message"] and "503" in result["message"], result["message"]


def test_a_transient_weights_failure_is_survived(hub, published, tmp_path):
    result = load_with_failures(hub, tmp_path, times=1)
    assert result == {"loaded": True, "parameters": published}
