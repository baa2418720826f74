"""The Dice and Hausdorff ``evaluate`` modules against independent computations and MONAI, empty masks included."""

from __future__ import annotations

import math
import warnings

import evaluate
import numpy as np
import pytest

import esp_medsam_hf
from esp_medsam_hf.metrics.functional import dice_score, hausdorff_distance


def _random_masks(seed: int, count: int = 24, shape=(37, 45)) -> list[np.ndarray]:
    """Blobs, speckle, thin lines, full and empty masks."""
    rng = np.random.default_rng(seed)
    masks = [np.zeros(shape, bool), np.ones(shape, bool)]
    for index in range(count):
        kind = index % 3
        if kind == 0:
            yy, xx = np.mgrid[: shape[0], : shape[1]]
            cy, cx, r = rng.uniform(0, shape[0]), rng.uniform(0, shape[1]), rng.uniform(2, 15)
            masks.append((yy - cy) ** 2 + (xx - cx) ** 2 < r * r)
        elif kind == 1:
            masks.append(rng.random(shape) < rng.uniform(0.01, 0.5))
        else:
            mask = np.zeros(shape, bool)
            mask[int(rng.integers(0, shape[0])), :] = True
            masks.append(mask)
    return masks


def _edges_reference(mask: np.ndarray) -> np.ndarray:
    """Foreground pixels with a 4-neighbour outside the mask or outside the image (written without scipy)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def _hausdorff_reference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Brute force: all pairwise edge distances; empty cases as documented (MONAI's values)."""
    if not a.any() and not b.any():
        return math.nan, math.nan
    if not a.any() or not b.any():
        return math.inf, math.nan
    pa, pb = np.argwhere(_edges_reference(a)), np.argwhere(_edges_reference(b))
    distances = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    forward, backward = distances.min(axis=1), distances.min(axis=0)

    def percentile(values, q):  # linear interpolation between order statistics, as torch.quantile
        values = np.sort(values)
        position = (len(values) - 1) * q
        low = int(np.floor(position))
        high = min(low + 1, len(values) - 1)
        return values[low] + (values[high] - values[low]) * (position - low)

    return max(forward.max(), backward.max()), max(percentile(forward, 0.95), percentile(backward, 0.95))


def _dice_reference(a: np.ndarray, b: np.ndarray) -> float:
    if a.sum() + b.sum() == 0:
        return 100.0
    return 100.0 * 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _same(x: float, y: float, tolerance: float) -> bool:
    if math.isnan(x) or math.isnan(y):
        return math.isnan(x) and math.isnan(y)
    if math.isinf(x) or math.isinf(y):
        return x == y
    return abs(x - y) <= tolerance * max(1.0, abs(y))


@pytest.fixture(scope="module")
def pairs():
    predictions, references = _random_masks(0), _random_masks(1)
    # explicit empty cases: empty prediction, empty reference, both empty
    predictions += [np.zeros((37, 45), bool), references[5], np.zeros((37, 45), bool)]
    references += [references[5], np.zeros((37, 45), bool), np.zeros((37, 45), bool)]
    return predictions, references


def test_dice_module_matches_an_independent_computation(pairs):
    predictions, references = pairs
    dice = evaluate.load(esp_medsam_hf.metric_path("dice"))
    result = dice.compute(predictions=predictions, references=references)
    expected = [_dice_reference(p, r) for p, r in zip(predictions, references)]
    assert len(result["per_image"]) == len(expected)
    np.testing.assert_allclose(result["per_image"], expected, rtol=0, atol=1e-6)
    assert result["dice"] == pytest.approx(np.mean(expected), abs=1e-6)
    assert result["per_image"][-3:] == [0.0, 0.0, 100.0]  # empty prediction, empty reference, both empty


def test_hausdorff_module_matches_an_independent_computation(pairs):
    predictions, references = pairs
    hausdorff = evaluate.load(esp_medsam_hf.metric_path("hausdorff"))
    result = hausdorff.compute(predictions=predictions, references=references)
    expected = [_hausdorff_reference(p, r) for p, r in zip(predictions, references)]
    for got, want in zip(result["per_image"], expected):
        assert _same(got["hd"], want[0], 1e-6) and _same(got["hd95"], want[1], 1e-6), (got, want)
    defined = [want for want in expected if math.isfinite(want[0])]
    assert result["num_undefined"] == len(expected) - len(defined) >= 3
    assert result["hd"] == pytest.approx(np.mean([d[0] for d in defined]), abs=1e-6)
    assert result["hd95"] == pytest.approx(np.mean([d[1] for d in defined]), abs=1e-6)
    last = result["per_image"][-3:]
    assert last[0]["hd"] == math.inf and last[1]["hd"] == math.inf and math.isnan(last[2]["hd"])
    assert all(math.isnan(value["hd95"]) for value in last)


def test_hausdorff_agrees_with_monai(pairs):
    torch = pytest.importorskip("torch")
    monai_metrics = pytest.importorskip("monai.metrics")
    predictions, references = pairs
    for p, r in zip(predictions, references):
        one_hot = [torch.from_numpy(np.stack([~m, m])[None].astype(np.float32)) for m in (p, r)]
        with warnings.catch_warnings():  # MONAI warns about empty masks and a deprecated argument
            warnings.simplefilter("ignore")
            monai_hd = monai_metrics.compute_hausdorff_distance(*one_hot, include_background=False).item()
            monai_hd95 = monai_metrics.compute_hausdorff_distance(
                *one_hot, include_background=False, percentile=95
            ).item()
        monai_dice = monai_metrics.compute_dice(*one_hot, include_background=False, ignore_empty=False).item()
        hd, hd95 = hausdorff_distance(p, r)
        # MONAI works in float32: compare relative to its precision
        assert _same(hd, monai_hd, 1e-6) and _same(hd95, monai_hd95, 1e-6), (hd, monai_hd, hd95, monai_hd95)
        assert dice_score(p, r) == pytest.approx(100 * monai_dice, abs=1e-4)


def test_hausdorff_known_values():
    a = np.zeros((10, 10), bool)
    a[1:3, 1:3] = True
    b = np.zeros((10, 10), bool)
    b[6:8, 1:3] = True
    assert hausdorff_distance(a, b) == (5.0, 5.0)
    assert hausdorff_distance(a, a) == (0.0, 0.0)
    assert dice_score(a, a) == 100.0 and dice_score(a, b) == 0.0


def test_inputs_accept_0_255_and_reject_mismatched_shapes():
    a = np.zeros((6, 6), np.uint8)
    a[:3] = 255
    assert dice_score(a, a > 0) == 100.0
    with pytest.raises(ValueError, match="differs"):
        dice_score(a, np.zeros((5, 6), bool))
    with pytest.raises(ValueError, match="unknown metric"):
        esp_medsam_hf.metric_path("iou")


def test_modules_load_offline_and_fast(tmp_path, monkeypatch):
    import socket
    import time

    def no_network(*args, **kwargs):
        raise AssertionError("evaluate.load tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
    monkeypatch.setattr(evaluate.config, "HF_MODULES_CACHE", tmp_path / "modules")
    start = time.perf_counter()
    metrics = [evaluate.load(esp_medsam_hf.metric_path(name)) for name in ("dice", "hausdorff")]
    seconds = time.perf_counter() - start
    mask = np.zeros((8, 8), bool)
    mask[2:5, 2:5] = True
    assert metrics[0].compute(predictions=[mask], references=[mask])["dice"] == 100.0
    assert metrics[1].compute(predictions=[mask], references=[mask])["hd"] == 0.0
    assert seconds < 2.0


def test_modules_take_the_datasets_own_pil_masks():
    """A prepared dataset's mask column (PIL images) goes straight into compute, add_batch and add."""
    from esp_medsam_hf.data.synthetic import synthetic_domains

    test = synthetic_domains(["isic"], {"test": 3}, seed=0, size=32)["isic"]["test"]
    references = test["mask"]
    assert all(hasattr(mask, "mode") for mask in references)  # PIL images, as datasets decodes them
    arrays = [np.asarray(mask) > 0 for mask in references]
    shifted = [np.roll(mask, 2, axis=1) for mask in arrays]
    dice = evaluate.load(esp_medsam_hf.metric_path("dice"))
    expected = dice.compute(predictions=shifted, references=arrays)
    assert 0 < expected["dice"] < 100
    from PIL import Image

    as_pil = [Image.fromarray(mask.astype(np.uint8) * 255, mode="L") for mask in shifted]
    assert dice.compute(predictions=as_pil, references=references) == expected
    dice.add_batch(predictions=as_pil[:2], references=references[:2])
    dice.add(prediction=as_pil[2], reference=references[2])
    assert dice.compute() == expected
    hausdorff = evaluate.load(esp_medsam_hf.metric_path("hausdorff"))
    assert hausdorff.compute(predictions=as_pil, references=references) == hausdorff.compute(
        predictions=shifted, references=arrays)
    with pytest.raises(ValueError, match=r"predictions\[0\]: expected an HxW mask"):
        dice.compute(predictions=[np.zeros((2, 3, 4))], references=[arrays[0]])
