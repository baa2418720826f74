"""Hostile inputs (issue 22, rows 4-6 and 15): one memory budget for every reader, checked before decoding or
inflating; only regular files; DICOM tags that break pydicom's transforms are a per-file error.

Every probe is a small file that DECLARES a size over a budget the test sets small; nothing allocates more than a few
megabytes (tracemalloc checks the peak where the old code held the inflated data).
"""

from __future__ import annotations

import gzip
import os
import threading
import tracemalloc

import numpy as np
import pytest
import tifffile
from PIL import Image

from _inference_helpers import write_dicom
from esp_medsam_hf.data.layouts import LayoutError, get_layout
from esp_medsam_hf.data.prepare import PreparationError, read_image
from esp_medsam_hf.models.esp_medsam import image_reading as imaging
from esp_medsam_hf.models.esp_medsam.image_reading import ImageLoadError, load_image


def _deflated_dicom(path, rows: int, columns: int, payload: int):
    """A deflated DICOM (1.2.840.10008.1.2.1.99) declaring ``rows`` x ``columns`` whose dataset inflates to
    ``payload`` bytes of zeros (a few KB on disk)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, columns, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(payload)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_deflated_dicom_is_measured_in_chunks_before_pydicom_inflates_it(tmp_path, monkeypatch):
    """Row 4: a deflated dataset is refused while inflating, with a bounded peak, not after inflating it whole."""
    limit = 1 << 20
    monkeypatch.setattr(imaging, "MAX_DECODED_BYTES", limit)
    path = _deflated_dicom(tmp_path / "deflated.dcm", 8, 8, 8 * limit)
    assert path.stat().st_size < 100_000
    tracemalloc.start()
    try:
        with pytest.raises(ImageLoadError, match=r"deflated\.dcm.*inflates to more than the limit of 1,048,576"):
            load_image(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * limit
    small = _deflated_dicom(tmp_path / "small.dcm", 16, 16, 256)
    assert load_image(small)[0].shape == (16, 16, 3)


def test_encapsulated_and_multi_sample_dicom_counts_samples_and_bytes(tmp_path, monkeypatch):
    """Row 4: pixels x samples x frames x bytes against the budget, from the header, before pixel_array."""
    path = write_dicom(tmp_path / "rgb16.dcm", np.zeros((16, 16, 3), np.uint16))
    monkeypatch.setattr(imaging, "MAX_DECODED_BYTES", 16 * 16 * 3 * 2 - 1)
    with pytest.raises(ImageLoadError, match=r"rgb16\.dcm.*3 samples x 1 frame\(s\) x 2 byte\(s\)"):
        load_image(path)
    monkeypatch.setattr(imaging, "MAX_DECODED_BYTES", 16 * 16 * 3 * 2)
    assert load_image(path)[0].shape == (16, 16, 3)


def test_tiff_samples_count_against_the_budget(tmp_path, monkeypatch):
    """Row 5: 32 x 32 pixels x 600 samples passes the pixel limit but not the byte budget (in both readers)."""
    path = tmp_path / "samples.tif"
    tifffile.imwrite(path, np.zeros((600, 32, 32), np.uint8), photometric="minisblack", planarconfig="separate")
    monkeypatch.setattr(imaging, "MAX_DECODED_BYTES", 32 * 32 * 599)
    decoded = []
    monkeypatch.setattr(tifffile.TiffPage, "asarray", lambda *a, **k: decoded.append(1))
    with pytest.raises(ImageLoadError, match=r"samples\.tif.*600 samples"):
        load_image(path)
    with pytest.raises(PreparationError, match=r"samples\.tif.*600 samples"):
        read_image(path)
    assert decoded == []


def test_png_bands_and_depth_count_against_the_budget(tmp_path, monkeypatch):
    path = tmp_path / "rgba.png"
    Image.fromarray(np.zeros((20, 20, 4), np.uint8)).save(path)
    monkeypatch.setattr(imaging, "MAX_DECODED_BYTES", 20 * 20 * 4 - 1)
    with pytest.raises(ImageLoadError, match=r"rgba\.png.*4 samples"):
        load_image(path)
    with pytest.raises(PreparationError, match=r"rgba\.png.*4 samples"):
        read_image(path)


def test_a_gzip_bomb_is_refused_while_inflating(tmp_path, monkeypatch):
    """Row 6: a ``.png.gz`` that inflates past the file limit is refused without holding the inflated data."""
    limit = 1 << 20
    monkeypatch.setattr(imaging, "MAX_FILE_BYTES", limit)
    path = tmp_path / "bomb.png.gz"
    with gzip.open(path, "wb") as handle:
        for _ in range(64):
            handle.write(bytes(limit))
    tracemalloc.start()
    try:
        with pytest.raises(PreparationError, match=r"bomb\.png\.gz: compressed data inflates to more than"):
            read_image(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * limit  # the old reader held all 64 MB
    good = tmp_path / "good.png.gz"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "good.png")
    good.write_bytes(gzip.compress((tmp_path / "good.png").read_bytes()))
    assert read_image(good).shape == (8, 8, 3)


def _finishes(function, *args) -> list:
    """Run ``function`` in a daemon thread: [outcome] if it ends within 5 s, [] if it hangs."""
    outcome: list = []

    def target():
        try:
            function(*args)
            outcome.append("read")
        except (ImageLoadError, PreparationError) as error:
            outcome.append(error)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(5)
    return outcome


@pytest.mark.parametrize("reader", [load_image, read_image], ids=["load_image", "prepare"])
def test_a_fifo_named_png_is_refused_without_hanging(tmp_path, reader):
    """Row 6: a FIFO is never opened (opening one blocks until a writer comes)."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    outcome = _finishes(reader, fifo)
    assert outcome and "not a regular file" in str(outcome[0]) and "pipe.png" in str(outcome[0])


def test_special_files_and_oversize_files_are_refused(tmp_path, monkeypatch):
    """Row 6: a symlink to a device is refused by what it points to; a file over MAX_FILE_BYTES by its size."""
    device = tmp_path / "zero.png"
    device.symlink_to("/dev/null")  # a character device that cannot stream forever if the check regressed
    with pytest.raises(ImageLoadError, match=r"zero\.png.*not a regular file"):
        load_image(device)
    with pytest.raises(PreparationError, match=r"zero\.png.*not a regular file"):
        read_image(device)
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(big)
    monkeypatch.setattr(imaging, "MAX_FILE_BYTES", 10)
    with pytest.raises(ImageLoadError, match=r"big\.png': file of \d+ bytes is over the limit of 10 bytes"):
        load_image(big)
    monkeypatch.setenv("ESP_MEDSAM_MAX_FILE_BYTES", str(1 << 20))
    assert load_image(big)[0].shape == (64, 64, 3)


def test_plain_layout_refuses_a_symlink_leading_outside_the_input(tmp_path):
    """Row 6: a symlink in images/ pointing outside the data folder is refused when the layout is read."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    outside = tmp_path / "elsewhere.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(outside)
    (root / "images" / "a.png").symlink_to(outside)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "masks" / "a.png")
    with pytest.raises(LayoutError, match=r"a\.png is a symlink to .*elsewhere\.png, outside the input folder"):
        get_layout("mine", "plain").find(root, "mine")
    inside = root / "images" / "b.png"
    inside.symlink_to(root / "masks" / "a.png")
    (root / "images" / "a.png").unlink()
    assert list(get_layout("mine", "plain").find(root, "mine")) == ["b.png"]


@pytest.mark.parametrize("tags, reason", [
    ({"WindowCenter": 100, "WindowWidth": 0}, "WindowWidth 0"),
    ({"RescaleSlope": "1e308", "RescaleIntercept": 0}, "overflow"),
], ids=["window-width-0", "rescale-1e308"])
def test_dicom_tags_that_break_the_transforms_are_an_image_error(tmp_path, tags, reason):
    """Row 15: a clear ImageLoadError naming the file (segment records it in its CSV), not a raw exception."""
    path = write_dicom(tmp_path / "bad.dcm", np.arange(64, dtype=np.uint16).reshape(8, 8) * 100, **tags)
    with pytest.raises(ImageLoadError, match=rf"bad\.dcm.*{reason}"):
        load_image(path)


def test_a_two_byte_voi_lut_is_an_image_error(tmp_path):
    """Row 15: a VOI LUT whose data is shorter than its descriptor (pydicom raises struct.error)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    path = write_dicom(tmp_path / "lut.dcm", np.arange(64, dtype=np.uint16).reshape(8, 8))
    import pydicom

    ds = pydicom.dcmread(path)
    item = Dataset()
    item.LUTDescriptor = [256, 0, 16]
    item.LUTData = b"\x00\x01"
    ds.VOILUTSequence = Sequence([item])
    ds.save_as(path)
    with pytest.raises(ImageLoadError, match=r"lut\.dcm"):
        load_image(path)
