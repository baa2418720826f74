"""Turn a downloaded copy of a public dataset into a ``datasets.DatasetDict`` with the official splits.

``prepare_domain`` finds the files (:mod:`.layouts`), reads and checks every image and mask, and writes
``OUTPUT/<domain>/arrow`` (``save_to_disk``) and ``OUTPUT/<domain>/data/<split>-NNNNN-of-NNNNN.parquet`` (shards
that ``load_dataset("parquet", data_files=..., streaming=True)`` streams), plus a report and the folder's dataset
card (:mod:`.prepared`). ``esp_medsam_hf.hub.datasets.push_prepared`` uploads the folder to a Hub dataset repo.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image as PILImage
from PIL import UnidentifiedImageError

from ..models.esp_medsam.fileio import check_clear_of_inputs, staging_directory
from ..models.esp_medsam.image_reading import (check_image_budget, check_pil_budget, ImageLoadError, read_input_bytes,
                                               repair_non_finite, to_rgb_uint8)
from .domains import Domain, all_official_names, get_domain
from .layouts import PLAIN, Layout, SourceItem, detect_layout, get_layout
from .prepared import check_card_replaceable, prepared_domains, write_card
from .schema import describe, encode_mask, encode_png, features, stored_png

logger = logging.getLogger(__name__)

MAX_SHARD_BYTES = 256 * 1024 * 1024
CACHE_PREFIX = ".cache-"  # + the pid of the run that owns it


class PreparationError(ValueError):
    """A file cannot be turned into a dataset row (the message names it), or the file lists do not match."""


@dataclass
class PreparationReport:
    """What preparing one domain found: rows per split, names not found or not listed, files skipped."""

    domain: str
    layout: str
    data_dir: str
    rows: dict[str, int] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        total = sum(self.rows.values()) + len(self.skipped)
        return total / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "images_per_second": self.images_per_second}


def _as_text(name: str) -> str:
    """``name`` with the bytes of a non-UTF-8 file name (kept by Python as surrogates) as ``\\udcXX`` escapes, so that
    reports, JSON and the terminal can hold it."""
    return name.encode("utf-8", "backslashreplace").decode("utf-8")


def _open_bytes(path: Path) -> io.BytesIO:
    """The file's bytes (``.gz`` inflated) under the package's file limits (``image_reading.read_input_bytes``:
    regular files only, size-limited, gzip bombs refused while inflating)."""
    try:
        return io.BytesIO(read_input_bytes(path))
    except ImageLoadError as error:
        raise PreparationError(f"{path}: {error.reason}") from error


def _check_budget(check, path: Path, *args, **kwargs) -> None:
    """One of the package's memory-budget checks (``image_reading.check_image_budget``/``check_pil_budget``),
    before decoding, as a ``PreparationError`` naming the file."""
    try:
        check(path, *args, **kwargs)
    except ImageLoadError as error:
        raise PreparationError(f"{path}: {error.reason}") from error


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(_open_bytes(path)) as tif:
        page = tif.pages[0]
        _check_budget(check_image_budget, path, page.imagelength, page.imagewidth, frames=max(page.imagedepth, 1),
                      samples=page.samplesperpixel, bytes_per_sample=-(-page.bitspersample // 8))
        array = page.asarray()
        return np.moveaxis(array, 0, -1) if array.ndim == 3 and page.axes.startswith("S") else array


def _read_array(path: Path) -> np.ndarray:
    """Pixels of an image file (PNG, JPEG, TIFF, BMP, GIF, PPM, optionally gzipped) as a numpy array.

    The size is checked from the header before decoding; NaN/inf pixels of float images are repaired with a warning.
    """
    try:
        return repair_non_finite(_read_pixels(path), path)
    except ValueError as error:
        if isinstance(error, PreparationError):
            raise
        raise PreparationError(f"{path}: {error}") from error


def _read_pixels(path: Path) -> np.ndarray:
    try:
        with PILImage.open(_open_bytes(path)) as image:
            _check_budget(check_pil_budget, path, image)
            if image.mode in ("P", "PA"):
                image = image.convert("RGBA" if "transparency" in image.info else "RGB")
            elif image.mode == "1":
                image = image.convert("L")
            return np.asarray(image)
    except PreparationError:
        raise
    except PILImage.DecompressionBombError as error:
        raise PreparationError(f"{path}: image exceeds the limit of the package's image readers ({error})") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        if path.suffix.lower() in (".tif", ".tiff"):
            try:
                return _read_tiff(path)
            except PreparationError:
                raise
            except Exception as tiff_error:  # tifffile raises many types; all mean "unreadable"
                raise PreparationError(f"{path}: unreadable image ({tiff_error})") from tiff_error
        raise PreparationError(f"{path}: unreadable image ({error})") from error


def read_image(path: Path) -> np.ndarray:
    """An image file as HxWx3 uint8 RGB (grey is repeated, alpha dropped, other depths min-max stretched)."""
    array = _read_array(path)
    if array.ndim not in (2, 3) or array.size == 0:
        raise PreparationError(f"{path}: expected a 2-D image, got an array of shape {array.shape}")
    return to_rgb_uint8(array)


def read_mask(path: Path, threshold: float | None = None, labels: bool = False) -> np.ndarray:
    """A mask file as an HxW bool array.

    A mask with a transparency channel (RGBA, grey+alpha) whose alpha varies is read from its alpha: foreground
    where alpha > 0 (the colour channels may hold instance ids or a display colour). Otherwise colour masks count
    as foreground where any channel does. With ``threshold`` foreground is ``value > threshold``; with ``labels``
    any non-zero value is foreground (0/1, 0/255 and instance label maps alike); else the file must be binary
    (0 and at most one other value).
    """
    return mask_from_array(_read_array(path), path, threshold, labels)


def mask_from_array(array: np.ndarray, source: Path | str, threshold: float | None = None,
                    labels: bool = False) -> np.ndarray:
    """:func:`read_mask`'s rules on pixels already read (``source`` names them in errors): a mask an archive holds
    is decoded the way a mask file is."""
    if array.ndim == 3 and array.shape[-1] in (2, 4) and array[..., -1].min() != array[..., -1].max():
        return array[..., -1] > 0
    if array.ndim == 3:
        array = array[..., :3].max(axis=-1) if array.shape[-1] in (3, 4) else array[..., 0]
    if array.ndim != 2:
        raise PreparationError(f"{source}: expected a 2-D mask, got an array of shape {array.shape}")
    if threshold is not None:
        return array > threshold
    if labels:
        return array > 0
    values = np.unique(array)
    if len(values) > 2 or (len(values) == 2 and values[0] != 0):
        shown = ", ".join(str(v) for v in values[:6]) + (", ..." if len(values) > 6 else "")
        raise PreparationError(
            f"{source}: mask is not binary (values {shown}); expected 0 and one foreground value "
            "(pass a mask threshold to binarise it)"
        )
    return array > 0


def load_item(
    item: SourceItem, *, mask_threshold: float | None = None, size: int | None = None, labels: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Read, check and merge one item: (HxWx3 uint8 image, HxW bool mask), resized to ``size`` if given;
    ``labels``: label maps are masks too (any non-zero value is foreground)."""
    try:
        item.name.encode("utf-8")
    except UnicodeEncodeError:
        raise PreparationError(f"{item.image}: the file name is not valid UTF-8 (a dataset's file_name column holds "
                               "text); rename the file") from None
    if not item.masks:
        raise PreparationError(f"{item.image}: no mask found for {item.name}")
    image = read_image(item.image)
    mask = np.zeros(image.shape[:2], dtype=bool)
    for mask_path in item.masks:
        part = read_mask(mask_path, mask_threshold, labels)
        if part.shape != mask.shape:
            raise PreparationError(
                f"{mask_path}: mask size {part.shape[1]}x{part.shape[0]} differs from the image size "
                f"{image.shape[1]}x{image.shape[0]} of {item.image}"
            )
        mask |= part
    if size is not None and image.shape[:2] != (size, size):
        image = np.asarray(PILImage.fromarray(image).resize((size, size), PILImage.BILINEAR))
        mask = np.asarray(PILImage.fromarray(mask).resize((size, size), PILImage.NEAREST))
    return image, mask


def assign_splits(names: list[str], *, validation_fraction: float, test_fraction: float,
                  seed: int) -> dict[str, str]:
    """A reproducible split of ``names`` (sorted, then shuffled by ``seed``): at least one training image, and one
    validation / test image each when the fraction is positive and there are enough images."""
    for label, fraction in (("validation_fraction", validation_fraction), ("test_fraction", test_fraction)):
        if not 0 <= fraction < 1:
            raise PreparationError(f"{label} must be in [0, 1), got {fraction}")
    if validation_fraction + test_fraction >= 1:
        raise PreparationError("validation_fraction + test_fraction must leave images for training (< 1)")
    order = sorted(names)
    np.random.default_rng(seed).shuffle(order)
    total = len(order)
    counts = []
    for fraction in (test_fraction, validation_fraction):
        count = int(round(fraction * total))
        counts.append(max(count, 1) if fraction > 0 and total - sum(counts) - max(count, 1) >= 1 else count)
    test, validation = counts
    return {name: "test" if i < test else "validation" if i < test + validation else "train"
            for i, name in enumerate(order)}


def _split_items(domain: Domain, items: dict[str, SourceItem], report: PreparationReport, strict: bool,
                 split_options: dict):
    if not domain.is_official:
        unsplit = [name for name, item in items.items() if item.split is None]
        seeded = assign_splits(unsplit, **split_options) if unsplit else {}
        splits: dict[str, list[SourceItem]] = {"train": [], "validation": [], "test": []}
        for name, item in items.items():
            splits[item.split or seeded[name]].append(item)
        if unsplit:
            logger.info("%s: %d image(s) without a given split split by seed %d: %s", domain.name, len(unsplit),
                        split_options["seed"], {k: len(v) for k, v in splits.items()})
        return splits
    known = all_official_names()
    listed = domain.all_file_names()
    report.missing = sorted(listed - set(items))
    report.unlisted = sorted(name for name in items if name not in known)
    for label, names in (("listed but not found", report.missing), ("found but not listed", report.unlisted)):
        if names:
            shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
            message = f"{domain.name}: {len(names)} file(s) {label}: {shown}"
            if strict:
                raise PreparationError(message + " (--strict)")
            logger.warning(message)
    return {split: [items[name] for name in names if name in items] for split, names in domain.splits().items()}


def _generate_splits(
    rows, splits: dict[str, list[SourceItem]], report: PreparationReport, cache_dir: Path
) -> dict:
    """One ``Dataset`` per split from the ``rows(split_items, split)`` generator, built in a new folder under
    ``cache_dir``; a split whose every file was skipped is an empty ``Dataset``."""
    import datasets

    # a fresh folder per build: datasets would otherwise reuse a cached build of the same file list even when the
    # files changed on disk (its fingerprint hashes the generator's arguments, not the files)
    cache_dir.mkdir(parents=True, exist_ok=True)
    build_cache = tempfile.mkdtemp(prefix="build-", dir=cache_dir)
    result = {}
    with datasets_progress_bars(False):
        for split, split_items in splits.items():
            skipped_before = len(report.skipped)
            try:
                result[split] = datasets.Dataset.from_generator(
                    rows,
                    features=features(),
                    cache_dir=build_cache,
                    # a tuple, not a list: datasets would shard a list into one generator call per item
                    gen_kwargs={"split_items": tuple(split_items), "split": split},
                    split=datasets.Split(split),
                )
            except datasets.exceptions.DatasetGenerationError as error:
                cause = error.__cause__
                if isinstance(cause, PreparationError):
                    raise PreparationError(str(cause)) from cause
                raise
            except ValueError:
                # datasets cannot build a split from a generator that yields no row: make it empty explicitly
                if len(report.skipped) - skipped_before != len(split_items):
                    raise
                result[split] = datasets.Dataset.from_dict(
                    {name: [] for name in features()}, features=features(), split=datasets.Split(split)
                )
    return result


@contextmanager
def datasets_progress_bars(enabled: bool) -> Iterator[None]:
    """datasets' own progress bars (one per split, shard or map, each a fraction of a second: noise in a log;
    preparation shows one bar per split itself, which ``progress`` turns off) off inside the block unless
    ``enabled``, restored afterwards: ``inference.progress_bars`` for datasets, which keeps its own switch."""
    import datasets

    bars_were_enabled = datasets.is_progress_bar_enabled()
    if not enabled:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if bars_were_enabled:
            datasets.enable_progress_bars()


def _find_items(data_dir: Path, domain: str, layout: str | None) -> tuple[Layout, dict[str, SourceItem]]:
    """The layout of ``data_dir`` (``layout`` by name, else detected) and the items it finds for ``domain``."""
    if layout is None:
        return detect_layout(data_dir, domain)
    chosen = get_layout(domain, layout)
    return chosen, chosen.find(data_dir, domain)


def build_domain(
    domain: str | Domain, data_dir: str | Path, *, cache_dir: str | Path, layout: str | None = None,
    strict: bool = False, skip_invalid: bool = False, mask_threshold: float | None = None, size: int | None = None,
    progress: bool = True, validation_fraction: float = 0.1, test_fraction: float = 0.2, split_seed: int = 0,
    keep_metadata: bool = False,
):
    """Build the ``DatasetDict`` (train/validation/test) of one domain from a folder in an accepted layout.

    ``domain`` is a registered domain's name or a :class:`Domain` (a user's own, see
    :func:`esp_medsam_hf.data.domains.custom_domain`). Official domains take the official lists; other domains
    take the split their layout gives (listing column, split sub-folders) and, for the rest, a split by
    ``split_seed`` with the given fractions. Bad files raise :class:`PreparationError` naming the file, or with
    ``skip_invalid`` are skipped and listed in the report. Text chunks and EXIF of the files (a patient's name...)
    are not stored unless ``keep_metadata``. The Arrow files live in ``cache_dir``. Returns
    ``(DatasetDict, PreparationReport)``.
    """
    import datasets
    from tqdm.auto import tqdm

    spec = domain if isinstance(domain, Domain) else get_domain(domain)
    domain = spec.name
    data_dir = Path(data_dir)
    chosen, items = _find_items(data_dir, domain, layout)
    report = PreparationReport(domain, chosen.name, str(data_dir))
    split_options = {"validation_fraction": validation_fraction, "test_fraction": test_fraction, "seed": split_seed}
    splits = _split_items(spec, items, report, strict, split_options)
    labels = chosen is PLAIN
    logger.info("%s: layout %s, %d item(s) found in %s", domain, chosen.name, len(items), data_dir)

    def rows(split_items: tuple[SourceItem, ...], split: str):
        for item in tqdm(split_items, desc=f"{domain}/{split}", unit="img", disable=not progress):
            try:
                image, mask = load_item(item, mask_threshold=mask_threshold, size=size, labels=labels)
            except PreparationError as error:
                if not skip_invalid:
                    raise
                report.skipped.append({"file_name": _as_text(item.name), "split": split,
                                       "reason": _as_text(str(error))})
                logger.warning("skipped %s", error)
                continue
            resized = size is not None
            yield {
                "image": (not resized and stored_png(item.image, image, "RGB", keep_metadata)) or encode_png(image),
                "mask": (not resized and len(item.masks) == 1 and stored_png(item.masks[0], mask, "L", keep_metadata))
                or encode_mask(mask),
                "modality": spec.modality_index,
                "domain": domain,
                "file_name": item.name,
            }

    start = time.perf_counter()
    result = _generate_splits(rows, splits, report, Path(cache_dir))
    report.seconds = time.perf_counter() - start
    report.rows = {split: len(dataset) for split, dataset in result.items()}
    if report.skipped:
        logger.warning("%s: %d file(s) skipped (listed in the report)", domain, len(report.skipped))
    dataset_dict = datasets.DatasetDict(result)
    describe(dataset_dict, spec)
    return dataset_dict, report


def save_domain(dataset_dict, domain_dir: Path, report: dict | None = None, max_shard_bytes: int = MAX_SHARD_BYTES):
    """Write ``domain_dir/arrow`` (save_to_disk), ``domain_dir/data/*.parquet`` and the report, in place."""
    # an explicit shard count keeps empty splits loadable (datasets writes no shard for them otherwise)
    num_shards = {
        split: max(1, math.ceil(dataset.data.nbytes / max_shard_bytes)) for split, dataset in dataset_dict.items()
    }
    data_dir = domain_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    with datasets_progress_bars(False):
        dataset_dict.save_to_disk(str(domain_dir / "arrow"), num_shards=num_shards)
        for split, dataset in dataset_dict.items():
            shards = num_shards[split]
            for index in range(shards):
                shard = dataset.shard(shards, index, contiguous=True)
                shard.to_parquet(str(data_dir / f"{split}-{index:05d}-of-{shards:05d}.parquet"))
    if report is not None:
        (domain_dir / "preparation_report.json").write_text(json.dumps(report, indent=2) + "\n")


def write_output(
    dataset_dict,
    output_dir: str | Path,
    domain: str | Domain,
    report: dict | None = None,
    overwrite: bool = False,
    synthetic: bool = False,
) -> Path:
    """Save one domain's DatasetDict under ``output_dir/<domain>`` atomically (with ``domain.json``, what the
    domain is) and refresh the dataset card.

    A folder holds either real or synthetic domains (marked by an ``.synthetic`` file), never both.
    """
    spec = domain if isinstance(domain, Domain) else get_domain(domain)
    domain = spec.name
    output_dir = Path(output_dir)
    target = output_dir / domain
    marker = output_dir / ".synthetic"
    existing = [name for name in prepared_domains(output_dir) if name != domain]
    if existing and marker.exists() != synthetic:
        kind = "synthetic" if marker.exists() else "real"
        raise PreparationError(f"{output_dir} holds {kind} domains ({', '.join(existing)}); use another folder")
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it")
    check_card_replaceable(output_dir, overwrite)
    output_dir.mkdir(parents=True, exist_ok=True)
    with staging_directory(target) as staging:
        save_domain(dataset_dict, staging, report)
        (staging / "domain.json").write_text(json.dumps(spec.to_dict(), indent=2) + "\n")
    # marked only once the domain is written: a refused or failed run leaves the folder as it was
    if synthetic:
        marker.touch()
    elif marker.exists():
        marker.unlink()
    write_card(output_dir)
    return target


def _remove_stale_caches(output_dir: Path) -> None:
    """Build caches of runs that were killed (SIGKILL, power loss) before they could clean up after themselves."""
    for folder in output_dir.glob(f"{CACHE_PREFIX}*"):
        pid = folder.name[len(CACHE_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            logger.info("removing %s, left by an interrupted run (process %s)", folder, pid)
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def prepare_domain(
    domain: str | Domain,
    data_dir: str | Path,
    output_dir: str | Path,
    *,
    overwrite: bool = False,
    **options,
):
    """Build one domain from ``data_dir`` and write it to ``output_dir/<domain>``; returns (DatasetDict, report).

    ``options`` are those of :func:`build_domain` (layout, strict, skip_invalid, mask_threshold, size, progress,
    the split fractions and seed). The returned DatasetDict is read back from ``output_dir/<domain>/arrow``.
    """
    import datasets

    spec = domain if isinstance(domain, Domain) else get_domain(domain)
    output_dir = Path(output_dir)
    check_clear_of_inputs(output_dir, [data_dir], option="--output")
    if (output_dir / spec.name).exists() and not overwrite:
        raise FileExistsError(
            f"{output_dir / spec.name} already exists; pass overwrite=True (--overwrite) to replace it"
        )
    check_card_replaceable(output_dir, overwrite)
    output_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_caches(output_dir)
    with tempfile.TemporaryDirectory(prefix=f"{CACHE_PREFIX}{os.getpid()}-", dir=output_dir) as cache_dir:
        dataset_dict, report = build_domain(spec, data_dir, cache_dir=cache_dir, **options)
        target = write_output(dataset_dict, output_dir, spec, report.to_dict(), overwrite=overwrite)
        del dataset_dict
    return datasets.load_from_disk(str(target / "arrow")), report
