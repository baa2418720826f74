"""Segmenting files and folders: masks, overlays and a CSV, batched, across processes under ``accelerate launch``.

Used by ``esp-medsam segment``. Every image is read with ``image_reading.load_image`` (DICOM included: its Modality tag
gives the modality where unambiguous), segmented by the "medical-image-segmentation" pipeline, and written as
``<name>_mask.png`` (0/255, original size) and ``<name>_overlay.png`` (the image with the mask tinted and outlined,
labelled with the modality and its probability). ``segmentation.csv`` gets one row per input. A file that cannot
be read is reported and skipped; existing outputs are never replaced unless ``overwrite=True``.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from .models.esp_medsam.fileio import atomic_file, check_clear_of_inputs
from .drawing import draw_caption, draw_mask, PREDICTION_COLOUR, save_png
from .models.esp_medsam.image_reading import (
    DEFAULT_PERCENTILES,
    ImageLoadError,
    is_dicom,
    load_image,
    SUPPORTED_SUFFIXES,
)

logger = logging.getLogger(__name__)

CSV_NAME = "segmentation.csv"


@dataclass
class SegmentationRecord:
    """One CSV row. ``seconds``: the wall time of the image's batch (reading, model, writing) over its size;
    ``scale``: the zoom factor of the native pixels the image was segmented at in tiles (empty: the whole view);
    ``object_size``: the objects' size (native px) the automatic scale estimated."""

    file: str
    status: str = "ok"
    modality: str = ""
    modality_probability: float | None = None
    modality_source: str = ""
    score: float | None = None
    scale: float | None = None
    object_size: float | None = None
    mask_area: int | None = None
    mask_fraction: float | None = None
    height: int | None = None
    width: int | None = None
    seconds: float | None = None
    mask: str = ""
    overlay: str = ""
    error: str = ""


@dataclass(frozen=True)
class InputFile:
    """An image to segment and the stem of its outputs (relative to the output folder)."""

    path: Path
    output_stem: Path


class OutputExistsError(FileExistsError):
    """An output that would be replaced although ``overwrite`` is off."""


def collect_inputs(paths: Iterable[str | os.PathLike], exclude: str | os.PathLike | None = None) -> list[InputFile]:
    """Files as given and the image files under folders (recursively, by suffix, or by the DICOM preamble for
    files such as ``IM0001`` without one), in a stable order.

    Files under ``exclude`` (the output folder, when it lies inside an input folder) are not collected from folders,
    so that a rerun does not segment its own masks and overlays.

    Outputs of a folder's files keep their path relative to that folder; a file given directly keeps its name.
    Raises ``FileNotFoundError`` for a path that does not exist and ``ValueError`` when two inputs would write the
    same outputs.
    """
    inputs: list[InputFile] = []
    excluded = Path(exclude).resolve() if exclude is not None else None
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and (p.suffix.lower() in SUPPORTED_SUFFIXES or is_dicom(p))
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
                and (excluded is None or excluded not in p.resolve().parents)
            )
            if not found:
                logger.warning("no image files (%s) under %s", ", ".join(SUPPORTED_SUFFIXES), path)
            inputs += [InputFile(p, p.relative_to(path).with_suffix("")) for p in found]
        elif path.is_file():
            inputs.append(InputFile(path, Path(path.stem)))
        else:
            raise FileNotFoundError(f"input path {str(path)!r} does not exist")
    seen: dict[Path, Path] = {}
    for item in inputs:
        if item.output_stem in seen and seen[item.output_stem] != item.path:
            raise ValueError(
                f"{seen[item.output_stem]} and {item.path} would both write {item.output_stem}_mask.png; "
                "segment them into different --output folders"
            )
        seen[item.output_stem] = item.path
    unique = {item.path.resolve(): item for item in inputs}
    return list(unique.values())


def output_paths(item: InputFile, output_dir: Path) -> tuple[Path, Path]:
    """(mask PNG, overlay PNG) of an input."""
    stem = output_dir / item.output_stem
    return stem.with_name(stem.name + "_mask.png"), stem.with_name(stem.name + "_overlay.png")


def write_csv(records: Sequence[SegmentationRecord], path: Path, overwrite: bool = False) -> Path:
    """Write the records atomically; refuses to replace an existing file unless ``overwrite``."""
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} exists; pass --overwrite to replace it")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[f.name for f in fields(SegmentationRecord)], lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({k: ("" if v is None else v) for k, v in asdict(record).items()})
    with atomic_file(path) as temporary:
        # a file name that is not UTF-8 (bytes kept by Python as surrogates) is written with \udcXX escapes
        temporary.write_text(buffer.getvalue(), encoding="utf-8", errors="backslashreplace")
    return path


Loaded = tuple[InputFile, np.ndarray, dict[str, Any], SegmentationRecord]
"""An input read for segmentation: the file, its RGB pixels, its metadata and its CSV record."""


def _run_pipeline(pipe, loaded: Sequence[Loaded], modality: str | int | None) -> list[dict[str, Any] | Exception]:
    """The pipeline's segment for each loaded image; if the batch fails, images are retried one by one so that
    only the offending image is reported."""
    inputs = [
        {"image": image, "modality": modality, "file_modality": metadata.get("modality")}
        for _, image, metadata, _ in loaded
    ]
    try:
        return [result[0] for result in pipe(inputs, batch_size=len(inputs))]
    except Exception as error:  # isolate the failing image; the exception is reported in its CSV row
        if len(inputs) == 1:
            return [error]
    outcomes: list[dict[str, Any] | Exception] = []
    for single in inputs:
        try:
            outcomes.append(pipe([single], batch_size=1)[0][0])
        except Exception as error:
            outcomes.append(error)
    return outcomes


def _batches(items: Sequence[InputFile], size: int) -> Iterable[list[InputFile]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _read_batch(
    batch: Sequence[InputFile], output_dir: Path, overwrite: bool, percentiles=DEFAULT_PERCENTILES
) -> tuple[list[SegmentationRecord], list[Loaded]]:
    """One record per item, and the items to segment: those whose outputs may be written and whose file could be
    read (16-bit and float images stretched with ``percentiles``, the image processor's). The others' records say
    why not."""
    records: list[SegmentationRecord] = []
    loaded: list[Loaded] = []
    for item in batch:
        record = SegmentationRecord(file=str(item.path))
        records.append(record)
        existing = [p for p in output_paths(item, output_dir) if p.exists()]
        if existing and not overwrite:
            record.status, record.error = "error", f"{existing[0]} exists; pass --overwrite to replace it"
            logger.error("%s: %s", item.path, record.error)
            continue
        try:
            image, metadata = load_image(item.path, percentiles)
        except (ImageLoadError, ImportError) as error:
            record.status, record.error = "error", str(error)
            logger.error("%s", error)
            continue
        loaded.append((item, image, metadata, record))
    return records, loaded


def _write_segment(item: InputFile, image: np.ndarray, segment: dict[str, Any], record: SegmentationRecord,
                   output_dir: Path) -> None:
    """Write one image's mask and captioned overlay, and fill its record from the pipeline's segment."""
    mask = np.asarray(segment["mask"]) > 0
    mask_path, overlay_path = output_paths(item, output_dir)
    caption = f"{segment['modality']} {segment['modality_probability']:.2f} ({segment['modality_source']})"
    save_png((mask.astype(np.uint8) * 255), mask_path)
    save_png(draw_caption(draw_mask(image, mask, PREDICTION_COLOUR, alpha=0.4), caption), overlay_path)
    record.modality = segment["modality"]
    record.modality_probability = round(segment["modality_probability"], 6)
    record.modality_source = segment["modality_source"]
    record.score = round(segment["score"], 6)
    record.scale = None if segment.get("scale") is None else round(segment["scale"], 6)
    record.object_size = None if segment.get("object_size") is None else round(segment["object_size"], 3)
    record.mask_area = int(mask.sum())
    record.mask_fraction = round(float(mask.mean()), 6)
    record.height, record.width = mask.shape
    record.mask, record.overlay = str(mask_path), str(overlay_path)


def segment_files(
    items: Sequence[InputFile],
    pipe,
    output_dir: str | os.PathLike,
    *,
    modality: str | int | None,
    batch_size: int,
    overwrite: bool,
    progress: bool,
) -> list[SegmentationRecord]:
    """Segment ``items`` with ``pipe`` (an ``EspMedSamSegmentationPipeline``); write masks and overlays. This is
    one process's share of :func:`run_segmentation`, which documents the options.

    Returns one record per item, in order; unreadable files and files whose outputs exist (without
    ``overwrite``) get ``status="error"`` and a message, and the others go on.
    """
    from tqdm.auto import tqdm

    output_dir = Path(output_dir)
    records: list[SegmentationRecord] = []
    bar = tqdm(total=len(items), desc="segment", unit="image", disable=not progress)
    for batch in _batches(items, max(1, batch_size)):
        start = time.perf_counter()
        percentiles = getattr(pipe.image_processor, "intensity_percentiles", DEFAULT_PERCENTILES)
        batch_records, loaded = _read_batch(batch, output_dir, overwrite, percentiles)
        outcomes = _run_pipeline(pipe, loaded, modality) if loaded else []
        for (item, image, _, record), segment in zip(loaded, outcomes):
            if isinstance(segment, Exception):
                record.status, record.error = "error", f"segmentation failed: {segment}"
                logger.error("%s: %s", item.path, record.error)
            else:
                _write_segment(item, image, segment, record, output_dir)
        seconds = (time.perf_counter() - start) / len(batch)
        for record in batch_records:
            record.seconds = round(seconds, 4)
        records += batch_records
        bar.update(len(batch))
    bar.close()
    return records


def process_state(device: str | None = None):
    """accelerate's ``PartialState`` for this process (one per process: the first call's settings stay).

    On a machine without an accelerator, or with ``device="cpu"``, it is built with ``cpu=True``: only then does
    accelerate recognise several CPU processes (``torchrun``/``mpirun``) as one distributed run.
    """
    import torch
    from accelerate import PartialState

    cpu = (device or "").startswith("cpu") or not torch.accelerator.is_available()
    return PartialState(cpu=cpu)


@contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """transformers' and huggingface_hub's progress bars (weight loading, downloads) off inside the block unless
    ``enabled``; their previous state is restored afterwards."""
    if enabled:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    hub_was_disabled = are_progress_bars_disabled()
    transformers_was_enabled = transformers_logging.is_progress_bar_enabled()
    disable_progress_bars()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not hub_was_disabled:
            enable_progress_bars()
        if transformers_was_enabled:
            transformers_logging.enable_progress_bar()


def check_model_location(model: str | os.PathLike) -> None:
    """Raise ``FileNotFoundError`` naming ``model`` when it can only be a local path (absolute, starting with "." or
    "~", or with more folders than a Hub repo id's "owner/name") and no such folder exists: otherwise the Hub would
    be asked for it and answer that it is not a valid repo id."""
    text = os.fspath(model)
    separators = text.count("/") + (text.count(os.sep) if os.sep != "/" else 0)
    local = os.path.isabs(text) or text.startswith((".", "~")) or separators > 1
    if local and not os.path.isdir(os.path.expanduser(text)):
        raise FileNotFoundError(f"model {text!r}: no such folder (expected a saved model folder, or a Hub repo id "
                                "such as 'owner/name')")


def load_pipeline(model: str, revision: str | None = None, device: str | None = None, progress: bool = True,
                  backend: str | None = None, scale=None, tile_size: int | None = None, overlap: int | None = None):
    """The segmentation pipeline for a saved folder or Hub repo, on ``device`` (default: accelerate's device);
    ``progress=False`` hides the download and weight-loading bars; ``backend`` as in ``backends.resolve_backend``
    (default: automatic); ``scale``, ``tile_size`` and ``overlap`` as in ``prediction.predict`` (default: the
    model's saved ``inference_scale``, usually "auto"). Bad tiling values raise ``ValueError`` naming them; a local
    path that is not a folder, ``FileNotFoundError`` (:func:`check_model_location`)."""
    from transformers import AutoImageProcessor, AutoModelForImageSegmentation

    from .models.esp_medsam.pipeline_esp_medsam import TASK, EspMedSamSegmentationPipeline
    from .registration import register

    check_model_location(model)
    register()  # the Auto classes load the package's model and processor without remote code
    device = device or str(process_state().device)
    with progress_bars(progress):
        network = AutoModelForImageSegmentation.from_pretrained(model, revision=revision)
        image_processor = AutoImageProcessor.from_pretrained(model, revision=revision)
    tiling = {key: value for key, value in (("scale", scale), ("tile_size", tile_size), ("overlap", overlap))
              if value is not None}
    return EspMedSamSegmentationPipeline(
        model=network.eval(), image_processor=image_processor, task=TASK, device=device, backend=backend, **tiling
    )


def run_segmentation(
    inputs: Sequence[str | os.PathLike],
    pipe,
    output_dir: str | os.PathLike,
    *,
    modality: str | int | None = None,
    batch_size: int = 4,
    overwrite: bool = False,
    progress: bool = True,
) -> list[SegmentationRecord]:
    """Collect the inputs, split them across accelerate's processes, segment, gather, and write one CSV.

    ``modality``: a name or index for every image (``None``: the file's DICOM tag, else the model's classifier);
    ``batch_size``: images per pipeline call; ``overwrite``: replace existing outputs; ``progress``: a progress bar
    on the main process.

    Every process writes its own images' outputs; the main process writes ``segmentation.csv`` with all rows
    (input order). Returns all records on every process. An output folder that is or holds an input is refused
    (``FileExistsError``) before anything is written.
    """
    from accelerate.utils import gather_object

    state = process_state(str(pipe.device))
    output_dir = Path(output_dir)
    check_clear_of_inputs(output_dir, inputs, option="--output")
    csv_path = output_dir / CSV_NAME
    if csv_path.exists() and not overwrite:
        raise OutputExistsError(f"{csv_path} exists; pass --overwrite to replace it")
    if modality is not None:
        pipe.model.config.modality_index(modality)  # fail before any work on an unknown modality
    items = collect_inputs(inputs, exclude=output_dir)
    with state.split_between_processes(list(enumerate(items))) as shard:
        if state.num_processes > 1:
            logger.info("process %d of %d: %d of %d inputs", state.process_index + 1, state.num_processes,
                        len(shard), len(items))
        records = segment_files(
            [item for _, item in shard],
            pipe,
            output_dir,
            modality=modality,
            batch_size=batch_size,
            overwrite=overwrite,
            progress=progress and state.is_local_main_process,
        )
        indexed = list(zip([index for index, _ in shard], records))
    if state.num_processes > 1:
        indexed = gather_object(indexed)
    records = [record for _, record in sorted(indexed, key=lambda pair: pair[0])]
    if state.is_main_process:
        write_csv(records, csv_path, overwrite=overwrite)
    state.wait_for_everyone()
    return records


__all__ = [
    "CSV_NAME",
    "InputFile",
    "OutputExistsError",
    "SegmentationRecord",
    "collect_inputs",
    "load_pipeline",
    "output_paths",
    "process_state",
    "run_segmentation",
    "segment_files",
    "write_csv",
]
