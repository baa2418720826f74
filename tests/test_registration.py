"""Importing esp_medsam_hf changes nothing outside it but the Auto classes of its model types; ``register()`` (which
the entry points call) does the rest. Checked in fresh processes, since this test session has called ``register()``
(tests/conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from esp_medsam_hf import EspMedSamImageProcessor, EspMedSamProcessor, MODALITY_NAMES

SRC = Path(__file__).resolve().parents[1] / "src"


def run_fresh(code: str, cwd: Path) -> dict:
    """Run ``code`` in a fresh Python that imports this worktree's package; returns what it prints as JSON."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


GLOBAL_STATE = """
    import json
    from PIL import Image
    from transformers.models.auto import modeling_auto
    from transformers.pipelines import PIPELINE_REGISTRY

    def global_state():
        import esp_medsam_hf
        classes = [esp_medsam_hf.EspMedSamConfig, esp_medsam_hf.EspMedSamModel, esp_medsam_hf.EspMedSamImageProcessor,
                   esp_medsam_hf.EspMedSamProcessor, esp_medsam_hf.EspMedSamTeacherConfig,
                   esp_medsam_hf.EspMedSamTeacherModel]
        return {"pil_formats": list(Image.ID), "dicom_registered": "DICOM" in Image.OPEN,
                "segmentation_models": dict(modeling_auto.MODEL_FOR_IMAGE_SEGMENTATION_MAPPING_NAMES),
                "task": "medical-image-segmentation" in PIPELINE_REGISTRY.supported_tasks,
                "remote_code": [cls._auto_class for cls in classes]}

    Image.preinit(); Image.init()
    formats = list(Image.ID)
    models = dict(modeling_auto.MODEL_FOR_IMAGE_SEGMENTATION_MAPPING_NAMES)
"""


def test_importing_changes_nothing_and_register_declares_everything(tmp_path):
    """Nothing global at import; building an image processor registers the DICOM reader; register() the rest."""
    result = run_fresh(GLOBAL_STATE + """
    import esp_medsam_hf
    from esp_medsam_hf import EspMedSamImageProcessor
    import esp_medsam_hf.inference, esp_medsam_hf.training, esp_medsam_hf.data.evaluation, esp_medsam_hf.commands.train
    from esp_medsam_hf.models.esp_medsam import backends, export, image_processing_esp_medsam, pipeline_esp_medsam
    imported = global_state()
    EspMedSamImageProcessor()  # the DICOM reader, for the stock pipeline (which opens paths with Pillow)
    EspMedSamImageProcessor()
    built = global_state()["pil_formats"]
    esp_medsam_hf.register()
    esp_medsam_hf.register()
    registered = global_state()
    print(json.dumps({"formats": formats, "models": models, "imported": imported, "built": built,
                      "registered": registered}))
    """, tmp_path)
    imported, registered = result["imported"], result["registered"]
    assert imported["pil_formats"] == result["formats"] and not imported["dicom_registered"]
    assert imported["segmentation_models"] == result["models"] and "esp_medsam" not in result["models"]
    assert not imported["task"] and imported["remote_code"] == [None] * 6
    # building an image processor, twice: the DICOM reader first, once
    assert result["built"] == ["DICOM", *result["formats"]]
    # register(), twice: the DICOM reader (still once), the stock pipeline's model list, the task, remote code
    assert registered["pil_formats"] == ["DICOM", *result["formats"]]
    assert registered["segmentation_models"] == {**result["models"], "esp_medsam": "EspMedSamModel"}
    assert registered["task"]
    assert registered["remote_code"] == ["AutoConfig", "AutoModel", "AutoImageProcessor", "AutoProcessor",
                                         "AutoConfig", "AutoModel"]


def test_saving_for_the_hub_writes_remote_code_without_register_and_leaves_the_classes_alone(tmp_path):
    result = run_fresh(GLOBAL_STATE + """
    import torch
    from esp_medsam_hf import EspMedSamConfig, EspMedSamImageProcessor, EspMedSamModel, EspMedSamProcessor
    from esp_medsam_hf.models.esp_medsam.pipeline_esp_medsam import save_pretrained_with_pipeline
    torch.manual_seed(0)
    config = EspMedSamConfig.tiny(image_size=64)
    processor = EspMedSamProcessor(EspMedSamImageProcessor(size={"height": 64, "width": 64}), config.modality_names)
    save_pretrained_with_pipeline(EspMedSamModel(config), processor, "hub")
    EspMedSamModel(EspMedSamConfig.tiny(image_size=64)).save_pretrained("plain")
    print(json.dumps({"remote_code": global_state()["remote_code"]}))
    """, tmp_path)
    assert result["remote_code"] == [None] * 6
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_esp_medsam.EspMedSamConfig",
                                  "AutoModel": "modeling_esp_medsam.EspMedSamModel",
                                  "AutoModelForImageSegmentation": "modeling_esp_medsam.EspMedSamModel"}
    assert "medical-image-segmentation" in config["custom_pipelines"]
    preprocessor = json.loads((tmp_path / "hub" / "preprocessor_config.json").read_text())
    assert preprocessor["auto_map"]["AutoImageProcessor"] == "image_processing_esp_medsam.EspMedSamImageProcessor"
    for name in ("modeling_esp_medsam.py", "pipeline_esp_medsam.py", "image_reading.py", "image_intensity.py",
                 "backends.py"):
        assert (tmp_path / "hub" / name).is_file(), name
    # a plain save_pretrained without register(): transformers' default, no remote code
    assert "auto_map" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    assert not (tmp_path / "plain" / "modeling_esp_medsam.py").exists()


def test_processor_save_load_round_trip_is_equal_with_remote_code_registered(tmp_path):
    """Saving as remote code must not leave an ``auto_map`` on the processor in memory that loading drops."""
    processor = EspMedSamProcessor(EspMedSamImageProcessor(size={"height": 64, "width": 64}), list(MODALITY_NAMES))
    assert EspMedSamProcessor._auto_class == "AutoProcessor"  # the session called register()
    processor.save_pretrained(tmp_path)
    loaded = EspMedSamProcessor.from_pretrained(tmp_path)
    assert "auto_map" not in processor.to_dict()
    assert loaded.to_dict() == processor.to_dict()  # transformers' ProcessorTesterMixin round trip
    assert json.loads((tmp_path / "processor_config.json").read_text())["auto_map"] == {
        "AutoProcessor": "processing_esp_medsam.EspMedSamProcessor"}
