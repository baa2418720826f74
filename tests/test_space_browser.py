"""The Space running for real (``python app.py`` in a subprocess, a tiny saved model): driven by Debian's headless
chromium through Playwright, and through its API with gradio_client. No request may leave the machine."""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from _space_helpers import ARTIFACTS_DIR, running_app, save_tiny_model
from PIL import Image

from esp_medsam_hf import assets

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Playwright already adds --headless, --no-sandbox and friends; the resolver rule stops every DNS query that is not
# loopback (Chromium's update and account services).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
]
MODALITIES = ("dermoscopy", "x-ray", "ultrasound", "fundus", "microscopy", "colonoscopy")


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    work = tmp_path_factory.mktemp("space")
    model = save_tiny_model(work / "tiny-model")
    with running_app({"ESP_MEDSAM_MODEL": str(model)}, work / "app.log") as url:
        yield url


@pytest.fixture(scope="module")
def nuclei_png(tmp_path_factory) -> Path:
    """The real DSB 2018 nuclei image (stardist) as an 8-bit PNG, as a user would upload it."""
    image, _ = assets.load_dsb2018_pair()
    path = tmp_path_factory.mktemp("upload") / "dsb2018-nuclei.png"
    Image.fromarray(image).save(path)
    return path


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is missing (scripts/install.sh installs it)")
def test_browser_upload_segment_and_download(app_url, nuclei_png):
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS_DIR / "space.png"
    external: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on(
                "request",
                lambda request: request.url.startswith((app_url, "data:", "blob:")) or external.append(request.url),
            )
            # "load", not "networkidle": the click-to-correct state keeps Gradio's session heartbeat connection open
            page.goto(app_url, wait_until="load")
            run = page.get_by_role("button", name="Segment")
            expect(run).to_be_visible()
            expect(page.locator("#model-info")).to_contain_text("tiny-model")

            page.locator("#inp-file input[type=file]").set_input_files(str(nuclei_png))
            expect(page.locator("#inp-preview img")).to_be_visible(timeout=30_000)  # upload and preview done
            page.get_by_role("combobox", name="Modality").click()
            page.get_by_role("option", name="microscopy").click()
            expect(page.get_by_role("combobox", name="Modality")).to_have_value("microscopy")
            run.click()

            # Fail fast on an error toast rather than waiting out the timeout.
            overlay = page.locator("#out-overlay img")
            page.locator("#out-overlay img, .toast-body").first.wait_for(timeout=30_000)
            assert page.locator(".toast-body").count() == 0, page.locator(".toast-body").first.inner_text()
            expect(overlay).to_be_visible()
            expect(page.locator("#out-mask img")).to_be_visible()
            expect(page.locator("#out-label")).to_contain_text("microscopy")
            expect(page.locator("#out-summary textarea")).to_have_value(
                re.compile(r"^Modality: microscopy \(chosen by you; .* time: \d+ ms$")
            )
            size = overlay.evaluate("img => [img.naturalWidth, img.naturalHeight]")
            assert size == [512, 512]

            href = page.locator("#out-file a").first.get_attribute("href")
            body = page.request.get(href if href.startswith("http") else app_url + href).body()
            mask = np.asarray(Image.open(io.BytesIO(body)))
            assert body[:8] == b"\x89PNG\r\n\x1a\n" and mask.shape == (512, 512)
            assert set(np.unique(mask)) <= {0, 255} and 0 < (mask > 0).mean() < 1
            page.screenshot(path=str(screenshot), full_page=True)

            # Click to correct: a positive click on the overlay, undo, a box from two clicks, reset.
            summary = page.locator("#out-summary textarea")
            overlay.click(position={"x": 60, "y": 80})
            expect(summary).to_have_value(re.compile(r"^1 click\(s\), 0 box\(es\) .* cached embedding"), timeout=30_000)
            page.locator("#undo").click()
            expect(summary).to_have_value(re.compile(r"^0 click\(s\), 0 box\(es\)"), timeout=30_000)
            page.get_by_label("box (click two corners)").check()
            overlay.click(position={"x": 20, "y": 20})
            expect(summary).to_have_value(re.compile(r"box corner set"), timeout=30_000)
            overlay.click(position={"x": 150, "y": 150})
            expect(summary).to_have_value(re.compile(r"^0 click\(s\), 1 box\(es\)"), timeout=30_000)
            page.locator("#reset").click()
            expect(summary).to_have_value(re.compile(r"^0 click\(s\), 0 box\(es\)"), timeout=30_000)
            assert page.locator(".toast-body").count() == 0

            # A real example runs on click: the fundus photograph with its modality preset.
            page.get_by_role("button", name="Retina fundus photograph (real, scikit-image)").click()
            expect(page.get_by_role("combobox", name="Modality")).to_have_value("fundus")
            expect(page.locator("#out-label")).to_contain_text("fundus", timeout=30_000)
            expect(page.locator("#out-file").get_by_role("cell", name="retina-mask.png")).to_be_visible()
            assert page.locator(".toast-body").count() == 0
        finally:
            browser.close()
    print(f"\nscreenshot of the Space: {screenshot}")
    assert not external, f"the page made requests off the machine: {external}"


def test_api_dicom_and_rejected_files(app_url, tmp_path, monkeypatch):
    import tempfile

    import httpx
    import pydicom
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    # the client downloads each output through a folder of its own in the temporary directory: the test's folder
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    # analytics_enabled=False: the client ignores GRADIO_ANALYTICS_ENABLED.
    client = Client(app_url, verbose=False, analytics_enabled=False, download_files=str(tmp_path / "downloads"))
    dicom = assets.CHEST_XRAY_DICOM.path()
    header = pydicom.dcmread(dicom, stop_before_pixels=True)
    overlay, mask_image, label, summary, mask_png = client.predict(
        handle_file(str(dicom)), "automatic", api_name="/segment"
    )
    # the label is the classifier's own distribution over the six modalities, whatever the modality's source
    assert sorted(c["label"] for c in label["confidences"]) == sorted(MODALITIES)
    assert "x-ray (from the DICOM Modality tag" in summary
    for path in (overlay, mask_png):
        assert Image.open(path).size == (header.Columns, header.Rows)
    assert Path(mask_png).name == "RG1_UNCR-mask.png"
    np.testing.assert_array_equal(np.asarray(Image.open(mask_png)), np.asarray(Image.open(mask_image).convert("L")))

    text = tmp_path / "report.txt"
    text.write_text("not an image")
    with pytest.raises(AppError, match=r"report\.txt: unsupported file type \.txt"):
        client.predict(handle_file(str(text)), "automatic", api_name="/segment")

    big = tmp_path / "huge.png"
    with big.open("wb") as handle:  # 21 MB, over the default 20 MB limit (sparse: instant to write)
        handle.truncate(21 * 2**20)
    with pytest.raises(ValueError, match="exceeds the maximum file size"):
        client.predict(handle_file(str(big)), "automatic", api_name="/segment")
    # The server enforces the limit too, not only the client.
    with big.open("rb") as handle, httpx.Client(trust_env=False) as http:
        response = http.post(f"{app_url}/gradio_api/upload", files={"files": ("huge.png", handle, "image/png")})
    assert response.status_code == 413, response.text
    assert "maximum" in response.text.lower()
