"""Helpers for the local Hub tests: small model folders, file hashes, and the EspMedSamModel acceptance script.

The acceptance script runs in a subprocess because huggingface_hub reads HF_ENDPOINT once, at import time:
``python tests/_hub_helpers.py ENDPOINT WORKDIR`` publishes a tiny EspMedSamModel per stage branch, reloads each
branch through the local Hub with ``from_pretrained(repo, revision=...)``, also round-trips transformers'
``push_to_hub(revision=...)`` and a private repository (refused without the token, loaded with it), and prints
one JSON line with the largest output differences.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

BRANCHES = ("stage-1-teacher", "stage-2-distill", "stage-3-esp-medsam", "main")


def olah_available() -> bool:
    """Whether the olah mirror the local Hub reads through is installed (tests needing it skip otherwise)."""
    from esp_medsam_hf.testing.localhub import LocalHubError, find_olah

    try:
        find_olah()
    except LocalHubError:
        return False
    return True


def tree_hashes(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file below ``folder`` (to prove that publishing never changes them)."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file()
    }


def make_stage_folder(folder: Path, seed: int) -> Path:
    """A saved-model-like folder: safetensors weights (LFS), configs and a remote-code .py file (regular blobs)."""
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    save_file({"encoder.weight": rng.standard_normal((64, 96)).astype(np.float32),
               "decoder.bias": rng.standard_normal(17).astype(np.float32)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "esp_medsam", "seed": seed}, indent=2))
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_size": 128}))
    (folder / "modeling_esp_medsam.py").write_text(f"# remote code, revision with seed {seed}\n")
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "notes.txt").write_text(f"nested file {seed}\n")
    return folder


def acceptance(workdir: Path) -> dict:
    """Publish tiny EspMedSamModels per branch, reload them through the local Hub and compare outputs."""
    import torch
    from huggingface_hub import HfApi

    from esp_medsam_hf.models.esp_medsam.configuration_esp_medsam import EspMedSamConfig
    from esp_medsam_hf.hub.publish import RetryPolicy, StageRelease, publish_model
    from esp_medsam_hf.models.esp_medsam.modeling_esp_medsam import EspMedSamModel

    config = EspMedSamConfig.tiny()
    size = config.image_size
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, size, size, generator=generator)
    modality = torch.tensor([0, 4])
    references, releases = {}, []
    for seed, branch in enumerate(BRANCHES):
        torch.manual_seed(100 + seed)
        model = EspMedSamModel(config).eval()
        with torch.no_grad():  # make each stage's weights clearly different from the others'
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.05)
        folder = workdir / branch
        model.save_pretrained(folder)
        with torch.no_grad():
            references[branch] = model(pixel_values=pixels, modality=modality).pred_masks
        releases.append(StageRelease(branch, folder))
    before = {branch: tree_hashes(workdir / branch) for branch in BRANCHES}
    publish_model("esp/tiny-esp-medsam", releases, api=HfApi(), retry=RetryPolicy(attempts=3, base_wait_s=0.1))
    diffs, distinct = {}, {}
    for branch in BRANCHES:
        loaded = EspMedSamModel.from_pretrained("esp/tiny-esp-medsam", revision=branch).eval()
        with torch.no_grad():
            out = loaded(pixel_values=pixels, modality=modality).pred_masks
        diffs[branch] = float((out - references[branch]).abs().max())
        other = references[BRANCHES[(BRANCHES.index(branch) + 1) % len(BRANCHES)]]
        distinct[branch] = float((out - other).abs().max())
    # the Auto class (as the model card shows it) loads a branch too; in this process the package's own
    # registration provides the class, the uploaded code files are compared byte for byte by the snapshot test
    from transformers import AutoModel

    auto = AutoModel.from_pretrained("esp/tiny-esp-medsam", revision="stage-2-distill", trust_remote_code=True)
    with torch.no_grad():
        out = auto.eval()(pixel_values=pixels, modality=modality).pred_masks
    auto_diff = float((out - references["stage-2-distill"]).abs().max())
    # transformers' own push_to_hub(revision=...) against the write server, then a load of that branch
    pushed = EspMedSamModel(config).eval()
    pushed.push_to_hub("esp/pushed", revision="stage-2-distill")
    reloaded = EspMedSamModel.from_pretrained("esp/pushed", revision="stage-2-distill").eval()
    with torch.no_grad():
        push_diff = float((reloaded(pixel_values=pixels, modality=modality).pred_masks
                           - pushed(pixel_values=pixels, modality=modality).pred_masks).abs().max())
    untouched = all(tree_hashes(workdir / branch) == before[branch] for branch in BRANCHES)
    private_without_token, private_diff = private_round_trip(workdir / "main", pixels, modality, references["main"])
    return {"diffs": diffs, "distinct": distinct, "push_diff": push_diff, "auto_diff": auto_diff,
            "untouched": untouched, "private_without_token": private_without_token, "private_diff": private_diff}


def private_round_trip(folder: Path, pixels, modality, reference) -> tuple[list[str], float]:
    """Publish ``folder`` to a private repository; from_pretrained without the token (the error's class and its
    causes, by name), then with it (the largest output difference from ``reference``)."""
    import torch

    from esp_medsam_hf.hub.publish import RetryPolicy, StageRelease, publish_model
    from esp_medsam_hf.models.esp_medsam.modeling_esp_medsam import EspMedSamModel

    publish_model("esp/tiny-private", [StageRelease("main", folder)], private=True,
                  retry=RetryPolicy(attempts=3, base_wait_s=0.1))
    refused: list[str] = []
    try:
        EspMedSamModel.from_pretrained("esp/tiny-private", token=False)
    except Exception as err:  # noqa: BLE001 - the chain of errors is what the test checks
        cause: BaseException | None = err
        while cause is not None:
            refused.append(type(cause).__name__)
            cause = cause.__cause__ or cause.__context__
    loaded = EspMedSamModel.from_pretrained("esp/tiny-private").eval()  # HF_TOKEN: the hub's token
    with torch.no_grad():
        out = loaded(pixel_values=pixels, modality=modality).pred_masks
    return refused, float((out - reference).abs().max())


if __name__ == "__main__":
    import os

    endpoint, workdir = sys.argv[1], Path(sys.argv[2])
    if os.environ.get("HF_ENDPOINT") != endpoint:
        raise SystemExit("HF_ENDPOINT must be set in the environment before huggingface_hub is imported")
    print("RESULT " + json.dumps(acceptance(workdir)))
