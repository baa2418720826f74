"""Model cards: true for the run that wrote them (training data, real vs synthetic, mask sizes, efficiency,
relative paths, metadata per branch), and usage snippets that run verbatim on every branch through the local Hub
in a process that cannot import this package."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard, constants
from huggingface_hub.utils import validate_repo_id
from PIL import Image

from _inference_helpers import run_without_package, save_tiny_model, single_thread
from esp_medsam_hf.data.domains import SOURCE_DOMAINS, get_domain
from esp_medsam_hf.hub import RetryPolicy, StageRelease, build_model_card, publish_model
from esp_medsam_hf.hub.cards import ModelCardInfo, TrainingData, portable_config
from esp_medsam_hf.testing.localhub import LocalHub
from esp_medsam_hf.training.publishing import STAGE_TO_BRANCH, domain_results, stage_card, training_data

BRANCHES = ("stage-1-teacher", "stage-2-distill", "stage-3-esp-medsam", "main")
REPORT = {
    "split": "test",
    "domains": {
        "isic": {"domain": "isic", "dice": 61.5, "hd": 9.25, "mask_sizes": ["128x128"]},
        "ph2": {"domain": "ph2", "dice": 40.0, "hd": float("nan"), "mask_sizes": ["128x128"]},
        "dsb-real": {"domain": "dsb", "dice": 28.0, "hd": 40.5, "mask_sizes": ["512x512"]},
    },
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from single_thread()


def _card(branch: str, **kwargs) -> ModelCard:
    info = stage_card(branch, "esp-medsam-test", **kwargs)
    info.repo_id = "esp/cards"
    return ModelCard(str(build_model_card(info)))


def metadata_dataset_ids(card: ModelCard) -> list[str]:
    """Every dataset the card's metadata names: its ``datasets`` and each model-index result's ``dataset.type``."""
    metadata = card.data.to_dict()
    return list(metadata.get("datasets") or []) + [result["dataset"]["type"] for entry in metadata.get("model-index", [])
                                                   for result in entry["results"]]


def test_synthetic_and_real_rows_are_typed_by_the_runs_facts():
    card = _card("stage-3-esp-medsam", report=REPORT, datasets=training_data(SOURCE_DOMAINS), image_size=128)
    dsb, isic = get_domain("dsb").dataset, get_domain("isic").dataset
    assert f"| microscopy | {dsb} | source | test | 512x512 | 28.00 | 40.50 |" in card.text
    assert f"| dermoscopy | SYNTHETIC {isic} | source | test | 128x128 | 61.50 | 9.25 |" in card.text
    assert "1024x1024" not in card.text
    assert "Trained on SYNTHETIC images" in card.text and "a few public datasets" not in card.text
    real = _card("main", report=REPORT, synthetic=False, datasets=training_data(["dsb"], synthetic=False),
                 base_model="esp/litemedsam")
    assert f"| dermoscopy | {isic} | source |" in real.text and "SYNTHETIC" not in real.text
    assert real.data.base_model == "esp/litemedsam"
    assert f"Trained on {get_domain('dsb').dataset} only" in real.text


def test_card_metadata_names_hub_datasets_only():
    """`datasets:` and the model-index name Hub dataset ids (owner/name); data that is not on the Hub is described in
    the card's text, and its results stay in the table."""
    off_hub = _card("main", report=REPORT, datasets=training_data(SOURCE_DOMAINS))
    assert metadata_dataset_ids(off_hub) == [] and off_hub.data.eval_results is None
    assert "model-index" not in off_hub.data.to_dict() and "model_name" not in off_hub.data.to_dict()
    assert off_hub.data.metrics == ["dice", "hausdorff_distance"]  # the table's metrics
    assert "None of these images is a Hub dataset, so this table is their only record" in off_hub.text
    assert f"- SYNTHETIC {get_domain('isic').dataset} (`synthetic-isic`): SYNTHETIC images" in off_hub.text

    hub_ids = {"isic": "esp/isic-2018"}
    on_hub = _card("main", report=REPORT, synthetic=False, dataset_hub_ids=hub_ids,
                   datasets=training_data(["isic", "dsb"], synthetic=False, hub_ids=hub_ids))
    assert metadata_dataset_ids(on_hub) == ["esp/isic-2018"] * 2  # `datasets`, and the isic row (Dice and HD)
    for dataset_id in metadata_dataset_ids(on_hub):
        validate_repo_id(dataset_id)
    dice, hd = on_hub.data.eval_results  # read back by huggingface_hub's own model-index parser
    assert (dice.dataset_type, dice.dataset_config, dice.dataset_split, dice.metric_value) == (
        "esp/isic-2018", "isic", "test", 61.5)
    assert hd.metric_type == "hausdorff_distance" and hd.metric_value == 9.25
    assert on_hub.data.to_dict()["model-index"][0]["name"] == "esp-medsam-test"
    assert "[`esp/isic-2018`](https://huggingface.co/datasets/esp/isic-2018)" in on_hub.text
    assert f"measured on a Hub dataset ({get_domain('isic').dataset}) are also in this card's" in on_hub.text
    reloaded = ModelCard(str(on_hub))
    assert reloaded.data.to_dict() == on_hub.data.to_dict()

    for bad in ("isic", "synthetic-isic", "esp/isic/2018", "-esp/isic"):
        with pytest.raises(ValueError, match="not a Hub dataset id"):
            TrainingData("ISIC 2018", "isic", hub_id=bad)
        with pytest.raises(ValueError, match="not a Hub dataset id"):
            domain_results(REPORT, hub_ids={"isic": bad})


def test_metadata_has_no_stray_keys_and_efficiency_says_what_was_measured():
    without = _card("stage-2-distill", parameters=1_500_000)
    assert "model_name" not in without.data.to_dict() and not without.data.eval_results
    assert "parameters: 1.50 M" in without.text
    assert "FLOPs and throughput were not measured for this run." in without.text
    assert "not measured" not in _card("main", parameters=1, flops=2.5, throughput=3.0, image_size=128).text
    with_results = _card("stage-2-distill", report=REPORT, dataset_hub_ids={"ph2": "esp/ph2"})
    assert with_results.data.to_dict()["model-index"][0]["name"] == "esp-medsam-test"
    assert with_results.data.metrics == ["dice", "hausdorff_distance"]
    dice_only = {"domains": {"isic": {"domain": "isic", "dice": 50.0, "mask_sizes": ["64x64"]}}}
    assert _card("stage-2-distill", report=dice_only).data.metrics == ["dice"]


def test_training_config_holds_relative_paths_only(tmp_path):
    root = tmp_path / "run"
    config = {"output_dir": str(root / "stage-3"), "init_from": str(root / "stage-2" / "release"), "lr": 1e-4,
              "data": {"folders": [str(root / "data" / "isic")]}, "name": "plain"}
    text = str(build_model_card(ModelCardInfo("m", "main", training_config=config)))
    assert str(tmp_path) not in text
    assert "output_dir: stage-3" in text and "init_from: stage-2/release" in text and "- data/isic" in text
    assert portable_config(config, str(tmp_path))["output_dir"] == "run/stage-3"
    assert portable_config({"a": "relative/x", "b": 2}) == {"a": "relative/x", "b": 2}


def test_teacher_card_says_what_the_branch_is_for():
    teacher = _card(STAGE_TO_BRANCH["teacher"])
    assert "pipeline(" not in teacher.text and "intermediate training stage" in teacher.text
    assert "SAM's frozen ViT" in teacher.text and "no modality classifier" in teacher.text
    assert 'pipeline("medical-image-segmentation"' in _card("stage-2-distill").text
    # the main job's stage 1 is an ESP-MedSAM (TinyViT) model saved with both pipelines: its card says so
    tinyvit = _card(STAGE_TO_BRANCH["teacher"], model_type="esp_medsam")
    assert 'pipeline("medical-image-segmentation"' in tinyvit.text and "TinyViT image encoder" in tinyvit.text
    assert "SAM's frozen ViT" not in tinyvit.text and "no modality classifier" not in tinyvit.text
    assert "classifier is not trained at this stage" in tinyvit.text


def test_card_metadata_and_snippets_are_true_for_any_branch():
    for branch in BRANCHES:
        card = _card(branch, report=REPORT)
        assert branch not in card.data.tags and card.data.training_stage == branch
        # images are read as the evaluation read them (PIL clips 16-bit images): the repo's own reader
        assert "Image.open" not in card.text and 'get_class_from_dynamic_module("image_reading.load_image"' in card.text


def test_stage_notes_leave_out_unmeasured_metrics_and_dsb_is_test_data_only():
    from esp_medsam_hf.training.demo import data_label, stage_metrics_note

    assert stage_metrics_note("distill", {"common_mse": None, "specific_mse": None}) == ""
    assert stage_metrics_note("distill", {"common_mse": None, "specific_mse": 0.01234}) == (
        " Stage metrics: modality-specific embedding MSE 0.01234.")
    assert stage_metrics_note("teacher", {"validation_dice": 81.5}) == " Stage metrics: validation Dice 81.5."
    assert "None" not in stage_metrics_note("teacher", {"validation_dice": None})
    label = data_label(256)
    trained_on, _, tested_on = label.partition("; the stardist")
    assert "DSB" not in trained_on and "test image only, never trained on" in tested_on


def test_usage_snippets_run_verbatim_on_every_branch(tmp_path):
    """Publish a tiny teacher and student per branch with their cards; run each card's code as written."""
    from esp_medsam_hf.models.esp_medsam.configuration_esp_medsam_teacher import EspMedSamTeacherConfig
    from esp_medsam_hf.models.esp_medsam.modeling_esp_medsam_teacher import EspMedSamTeacherModel
    from esp_medsam_hf.training.stages.shared import make_processor, save_with_processor

    teacher = EspMedSamTeacherModel(EspMedSamTeacherConfig.tiny(image_size=64)).eval()
    save_with_processor(teacher, make_processor(64, teacher.config.modality_names), tmp_path / "teacher")
    student = save_tiny_model(tmp_path / "student")
    folders = {"stage-1-teacher": tmp_path / "teacher"}
    Image.fromarray((np.arange(50 * 70 * 3) % 253).astype(np.uint8).reshape(50, 70, 3)).save(tmp_path / "image.png")
    datasets = [TrainingData("SYNTHETIC ISIC 2018", "synthetic-isic", synthetic=True)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_OFFLINE", False)
        with LocalHub(tmp_path / "hub") as hub:
            releases = []
            for branch in BRANCHES:
                info = stage_card(branch, "esp-medsam-test", report=REPORT, datasets=datasets, image_size=64,
                                  dataset_hub_ids={"dsb-real": "esp/dsb-2018"})
                releases.append(StageRelease(branch, folders.get(branch, student), info))
            publish_model("esp/cards", releases, retry=RetryPolicy(attempts=2, base_wait_s=0.1),
                          api=__import__("huggingface_hub").HfApi(endpoint=hub.endpoint, token=hub.token))
            run_without_package(
                f"""
                import json, re
                from huggingface_hub import ModelCard, hf_hub_download
                ran = {{}}
                for branch in {list(BRANCHES)!r}:
                    card = ModelCard.load(hf_hub_download("esp/cards", "README.md", revision=branch))
                    blocks = re.findall(r"```python\\n(.*?)```", card.text, flags=re.S)
                    for code in blocks:
                        namespace = {{}}
                        exec(compile(code, f"{{branch}} card", "exec"), namespace)
                        if "mask" in namespace:
                            assert tuple(namespace["mask"].shape) == (50, 70), branch
                        else:
                            assert [s["mask"].size for s in namespace["segments"]] == [(70, 50)], branch
                    ran[branch] = [len(blocks), [r.dataset_type for r in card.data.eval_results or []]]
                json.dump(ran, open("ran.json", "w"))
                """,
                tmp_path,
                timeout=400,
                hub_env=hub.env,
            )
    ran = json.loads((tmp_path / "ran.json").read_text())
    assert {branch: n for branch, (n, _) in ran.items()} == {
        "stage-1-teacher": 1, "stage-2-distill": 2, "stage-3-esp-medsam": 2, "main": 2}
    assert all(types == ["esp/dsb-2018"] * 2 for _, types in ran.values())  # the Hub dataset only: Dice and HD


def test_measured_efficiency_goes_into_the_card():
    from _inference_helpers import tiny_model
    from esp_medsam_hf.benchmark import count_flops
    from esp_medsam_hf.training.publishing import measured_efficiency

    model, _ = tiny_model()
    facts = measured_efficiency(model, {"model_images_per_second": 12.5})
    pixels, modality = torch.zeros(1, 3, 64, 64), torch.zeros(1, dtype=torch.long)
    assert all(p.requires_grad for p in model.parameters()) and model.config._attn_implementation == "sdpa"
    model.set_attn_implementation("eager")
    model.requires_grad_(False)
    assert facts["flops"] == pytest.approx(count_flops(lambda: model(pixels, modality)) / 1e9) and facts["flops"] > 0
    assert facts["throughput"] == 12.5 and facts["throughput_device"].startswith("cpu (")
    text = _card("main", **facts).text
    assert f"FLOPs per image: {facts['flops']:.3g} G at 64x64" in text and "throughput: 12.50 images/s on cpu" in text
    assert "not measured" not in text
    assert "throughput" not in measured_efficiency(model)


def test_card_image_reader_is_the_repos_own_and_reads_16_bit_tiff_as_the_evaluation(tmp_path):
    """The cards' `get_class_from_dynamic_module("image_reading.load_image", repo)` gives the saved repo's reader,
    which stretches a 16-bit TIFF as the package's loader does, where PIL's convert("RGB") clips it."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from esp_medsam_hf.models.esp_medsam.image_reading import load_image as package_reader

    folder = save_tiny_model(tmp_path / "model")
    repo_reader = get_class_from_dynamic_module("image_reading.load_image", str(folder))
    path = tmp_path / "scan.tif"
    Image.fromarray((np.arange(40 * 50, dtype=np.uint16).reshape(40, 50) * 30)).save(path)
    image, _ = repo_reader(str(path))
    np.testing.assert_array_equal(image, package_reader(path)[0])
    clipped = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape == clipped.shape == (40, 50, 3) and (image != clipped).mean() > 0.9


def test_train_writes_the_runs_card_and_hub_publish_uses_it(tmp_path, monkeypatch, capsys):
    """Issue 24, item 7: a new target's run records its data, its own target name, its metrics and what it started
    from; ``hub publish`` without --card uses them, names only the branches the repository has, and its usage code
    passes the trained modality."""
    from esp_medsam_hf.cli import main
    from esp_medsam_hf.hub.cards import find_run_card

    save_tiny_model(tmp_path / "init")
    run = tmp_path / "disc-run"
    code = main(["train", "--stage", "espmedsam", "--init-from", str(tmp_path / "init"), "--data", "synthetic",
                 "--domains", "isic", "--synthetic-train-images", "2", "--synthetic-valid-images", "1",
                 "--batch-size", "2", "--max-steps", "1", "--no-progress", "--new-target", "optic disc",
                 "--modality", "fundus", "--output-dir", str(run)])
    assert code == 0, capsys.readouterr().err
    assert find_run_card(run / "release") == run / "card.json"
    info = ModelCardInfo.from_json(run / "card.json")
    assert info.stage == "stage-3-esp-medsam" and info.usage_modality == "fundus"
    assert info.targets[-1] == "optic disc" and "retinal vessels" in info.targets
    assert [d.dataset_id for d in info.datasets] == ["synthetic-isic"] and info.datasets[0].synthetic
    assert "Adds the target \"optic disc\" to fundus" in info.notes and "validation_dice" in info.notes
    assert "local model `init`" in info.notes and info.base_model is None
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with LocalHub(tmp_path / "hub") as hub:
        for key, value in hub.env.items():
            monkeypatch.setenv(key, value)
        assert main(["hub", "publish", "--repo", "me/disc", "--endpoint", hub.endpoint, "--attempts", "2",
                     "--stage", f"stage-3-esp-medsam={run / 'release'}", "--stage", f"main={run / 'release'}"]) == 0
        from huggingface_hub import HfApi

        api = HfApi(endpoint=hub.endpoint, token=hub.token)
        texts = {branch: open(api.hf_hub_download("me/disc", "README.md", revision=branch)).read()
                 for branch in ("main", "stage-3-esp-medsam")}
    for branch, text in texts.items():
        assert f"(`{branch}`)" in text
        assert "Branches of this repository: `stage-3-esp-medsam`, `main`" in text
        assert "stage-1-teacher" not in text and "stage-2-distill" not in text
        assert 'modality="fundus"' in text and 'modality="dermoscopy"' not in text
        assert "optic disc" in text and "Not recorded for this revision" not in text
