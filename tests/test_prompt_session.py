"""Click-to-correct semantics of EspMedSamPromptSession: a click edits the object under it, nothing else."""

from __future__ import annotations

import numpy as np
import pytest

from _inference_helpers import single_thread, tiny_model
from esp_medsam_hf.data.interactive import click_curve
from esp_medsam_hf.models.esp_medsam.prompt_session import (
    EspMedSamPromptSession,
    add_click,
    box_region,
    click_window,
    combine_boxes,
    descent_region,
    edge_region,
    intensity_map,
    level_region,
    remove_click,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from single_thread()


def discs(shape, centres, radius=5):
    """A mask of discs of ``radius`` at ``centres`` ((x, y), ...)."""
    rows, columns = np.mgrid[: shape[0], : shape[1]]
    mask = np.zeros(shape, dtype=bool)
    for x, y in centres:
        mask |= (columns - x) ** 2 + (rows - y) ** 2 <= radius**2
    return mask


CENTRES = [(10, 10), (40, 12), (70, 10), (12, 45), (45, 45), (75, 48)]


def cones(shape, centres, radius=5, height=4.0):
    """Logits (H, W): a cone per centre ((x, y) or (x, y, height)), ``height`` at its centre and 0 at ``radius``,
    the highest cone where they meet, so two touching objects have a valley between them."""
    rows, columns = np.mgrid[: shape[0], : shape[1]]
    logits = np.full(shape, -height)
    for centre in centres:
        x, y, top = centre if len(centre) == 3 else (*centre, height)
        logits = np.maximum(logits, top * (1 - np.hypot(columns - x, rows - y) / radius))
    return logits


def test_positive_click_adds_only_the_clicked_object():
    reference = discs((64, 96), CENTRES)
    current = discs((64, 96), CENTRES[:3])  # three nuclei missed
    # SAM's decode holds the clicked nucleus, joined to a false blob beside it, and two other nuclei
    decoded = cones((64, 96), [(45, 45), (52, 45, 6.0), (12, 45), (75, 48)])
    corrected = add_click(current, decoded, decoded, 44, 45)
    assert corrected[discs((64, 96), [(45, 45)], radius=2)].all()  # the clicked nucleus comes in ...
    assert not corrected[discs((64, 96), [(53, 45)], radius=3)].any()  # ... without the blob behind the valley
    beyond = (corrected & ~current) & ~discs((64, 96), [(45, 45)])
    assert np.all(decoded[beyond] < 1.7)  # beyond the nucleus: at most the blob's flank below the valley's level
    edited = beyond | discs((64, 96), [(45, 45)])
    assert np.array_equal(corrected[~edited], current[~edited])  # bit-identical elsewhere
    # a decode without the click: the prompt-free logits' object at the click, down to half its height
    rows, columns = np.mgrid[:64, :96]
    dim = -1 - 3 * np.hypot(columns - 30, rows - 30) / 5  # a missed object: -1 at its centre, -4 at 5 px
    free = np.maximum(cones((64, 96), CENTRES[:3]), dim)
    corrected = add_click(current, decoded, free, 31, 30)
    assert np.array_equal(corrected & ~current, dim > -2.5)


def test_positive_click_is_cut_to_the_object_size_window():
    current = discs((64, 96), CENTRES)  # objects 11 px across
    decoded = np.full((64, 96), 2.0)  # a runaway decode: everything, flat
    corrected = add_click(current, decoded, decoded, 45, 30)
    added = corrected & ~current
    rows, columns = np.nonzero(added)
    assert added.any() and np.abs(columns - 45).max() <= 23 and np.abs(rows - 30).max() <= 23


def test_negative_click_removes_only_the_slope_below_it():
    current = discs((64, 96), CENTRES) | discs((64, 96), [(25, 30)], radius=3)  # an extra blob
    logits = np.where(current, 5.0, -5.0)
    corrected = remove_click(current, logits, 25, 30)
    assert np.array_equal(corrected, discs((64, 96), CENTRES))
    # a less sure lobe on a true object: the lobe goes, the object it hangs on stays
    lobe = discs((64, 96), [(10, 18)], radius=4) & ~discs((64, 96), [(10, 10)])
    merged = current | lobe
    logits = np.where(lobe, 1.0, logits)
    corrected = remove_click(merged, logits, 10, 19)
    assert np.array_equal(corrected, current)
    assert np.array_equal(remove_click(current, logits, 90, 60), current)  # a click on the background
    # a bright false blob touching a dimmer true nucleus: the blob goes, the nucleus behind the valley stays
    logits = cones((64, 96), [(45, 45, 2.0), (54, 45, 6.0)])
    mask = logits > 0
    corrected = remove_click(mask, logits, 54, 45)
    assert corrected[discs((64, 96), [(45, 45)], radius=3)].all()
    assert not corrected[discs((64, 96), [(54, 45)], radius=4)].any()


def test_negative_click_removes_a_lobe_as_sure_as_its_nucleus_at_the_neck():
    """One saturated plateau of logits with a pixel-scale ripple over a nucleus and a false lobe (the model as sure
    of both): the logits alone give the click a few pixels; the mask's shape takes the lobe off at the neck."""
    nucleus = discs((48, 48), [(20, 18)], radius=7)
    lobe = discs((48, 48), [(20, 28)], radius=5) & ~nucleus
    mask = nucleus | lobe
    logits = np.where(mask, 8.0 + np.random.default_rng(0).uniform(-1.0, 1.0, mask.shape), -8.0)
    corrected = remove_click(mask, logits, 20, 28)
    assert (corrected & lobe).sum() <= 0.1 * lobe.sum() and (nucleus & ~corrected).sum() <= 0.02 * nucleus.sum()
    by_logits = descent_region(mask & click_window(mask.shape, 20, 28, mask), logits, 20, 28)
    assert (by_logits & lobe).sum() < 0.25 * lobe.sum()  # what the logits' slope alone would have removed
    assert np.array_equal(corrected & ~mask, np.zeros_like(mask))  # a negative click adds nothing


def crescent_image(shape=(64, 64), nucleus=(30, 30)):
    """(image, mask, nucleus, crescent): a bright nucleus (radius 10) with a dim crescent of cytoplasm glow on its
    right (out to radius 16) on a dark background; the model's mask holds both, one plateau of logits."""
    rows, columns = np.mgrid[: shape[0], : shape[1]]
    radius = np.hypot(columns - nucleus[0], rows - nucleus[1])
    inner = radius <= 10
    crescent = (radius > 10) & (radius <= 16) & (columns > nucleus[0] + 2)
    image = np.where(inner, 200, np.where(crescent, 70, 10)).astype(np.uint8)
    return np.stack([image] * 3, axis=-1), inner | crescent, inner, crescent


def test_negative_click_on_a_crescent_around_a_nucleus_ends_at_the_nucleus_edge():
    """A crescent of glow the model is as sure of as of its nucleus: the logits and the shape take part of it (the
    slope below the click); the image's edge between glow and nucleus takes the rest, and the nucleus stays."""
    image, mask, nucleus, crescent = crescent_image()
    logits = np.where(mask, 8.0 + np.random.default_rng(0).uniform(-1.0, 1.0, mask.shape), -8.0)
    intensity = intensity_map(image, mask.shape)
    x, y = 43, 30  # the crescent's thickest part, 3 px from the background
    by_shape = remove_click(mask, logits, x, y)
    by_edges = remove_click(mask, logits, x, y, intensity)
    assert (by_edges & crescent).sum() <= 0.1 * crescent.sum()  # at most its one-pixel rim on the edge
    assert (nucleus & ~by_edges).sum() <= 0.02 * nucleus.sum()
    assert (by_shape & crescent).sum() >= 0.2 * crescent.sum()  # what the rule without the edges leaves
    assert not (by_edges & ~by_shape).any()  # the edges only remove
    # a click in the object's core is on the object itself: the edges take nothing there
    allowed = mask & click_window(mask.shape, 30, 30, mask)
    assert not edge_region(allowed, mask, intensity, 30, 30).any()
    assert np.array_equal(remove_click(mask, logits, 30, 30, intensity), remove_click(mask, logits, 30, 30))
    # the edge's polarity does not matter: dark nuclei on a bright background (brightfield) cut the same
    assert np.array_equal(remove_click(mask, logits, x, y, intensity_map(255 - image, mask.shape)), by_edges)


def haloed_nuclei(shape=(48, 64), centres=((20, 24), (42, 24))):
    """(image, found, radius): nuclei bright (200) out to radius 8 and fading to the background (20) at radius 16,
    each pixel lit by its nearest nucleus; the model found each out to radius 8 (``found``); ``radius``: each
    pixel's distance to its nearest nucleus's centre."""
    rows, columns = np.mgrid[: shape[0], : shape[1]]
    radius = np.min([np.hypot(columns - x, rows - y) for x, y in centres], axis=0)
    image = (200.0 - 180.0 * np.clip((radius - 8.0) / 8.0, 0.0, 1.0)).astype(np.uint8)
    return np.stack([image] * 3, axis=-1), radius <= 8, radius


def test_positive_click_on_a_halo_the_logits_leave_out_adds_it_out_to_the_clicks_contour():
    """A missed halo of a found nucleus, where the logits are flat and the decode ignores the point: the logits add
    nothing; the image's intensity adds the nucleus's pixels as bright as the click, not its neighbour's halo
    behind the saddle between them, and a click on flat background adds nothing."""
    image, found, radius = haloed_nuclei()
    free = np.where(found, 8.0, -8.0)
    decoded = np.full(found.shape, -8.0)
    intensity = intensity_map(image, found.shape)
    x, y = 20, 36  # 12 px below the left nucleus's centre, on its halo, below the saddle's brightness
    assert np.array_equal(add_click(found, decoded, free, x, y), found)
    added = add_click(found, decoded, free, x, y, intensity) & ~found
    rows, columns = np.mgrid[: found.shape[0], : found.shape[1]]
    left = np.hypot(columns - 20, rows - 24) <= 11.5
    assert added[y, x] and (left & ~found & ~added).sum() <= 0.05 * (left & ~found).sum()
    assert not added[radius > 13].any() and not added[:, 32:].any()  # not beyond the contour, nor the neighbour
    flipped = add_click(found, decoded, free, x, y, intensity_map(255 - image, found.shape)) & ~found
    assert (flipped ^ added).sum() <= 2  # dark objects on a bright background: the same contour (but for
    # a pixel or two at the click's own level, where the inverted image's smoothing rounds the other way)
    window = click_window(found.shape, 3, 45, found)
    assert not level_region(found, window, intensity, 3, 45).any()  # the background's level: no object there


def test_intensity_map_reads_the_image_as_the_package_does():
    from PIL import Image

    image, mask, _, _ = crescent_image()
    np.testing.assert_allclose(intensity_map(image, mask.shape), image[..., 0].astype(np.float32), atol=1e-4)
    palette = Image.fromarray(image).convert("P", palette=Image.Palette.ADAPTIVE)
    np.testing.assert_allclose(intensity_map(palette, mask.shape), intensity_map(image, mask.shape),
                               atol=1e-4)  # a palette image: its colours, not its indices
    wide = image[..., 0].astype(np.uint16) * 256  # 16 bits: stretched to 0..255 first
    assert intensity_map(wide, mask.shape).max() == pytest.approx(255.0)
    assert intensity_map(np.moveaxis(image, -1, 0), mask.shape) is None  # channels first: not the mask's layout


def test_negative_click_on_the_clicked_objects_part_of_the_image_equals_the_whole_image_rule():
    """A negative click computes its relief only where the clicked objects lie; the mask it leaves is the one the
    rule gives on the whole image (distance and smoothing of the whole image), for objects of every size, at the
    image's edge and in its middle, among many small ones."""
    from esp_medsam_hf.models.esp_medsam.prompt_session import _relief_crop, removal_relief

    rng = np.random.default_rng(1)
    shape = (160, 200)
    small = [(int(x), int(y)) for x, y in zip(rng.integers(0, 200, 40), rng.integers(0, 160, 40))]
    mask = discs(shape, small, radius=4) | discs(shape, [(100, 80)], radius=30) | discs(shape, [(0, 150)], radius=20)
    logits = np.where(mask, 6.0, -6.0) + rng.normal(0.0, 1.5, shape)
    intensity = np.where(mask, 150.0, 20.0) + rng.normal(0.0, 30.0, shape)
    ys, xs = np.nonzero(mask)
    cropped = edges_cut = 0
    for index in rng.choice(len(xs), 25, replace=False):
        x, y = int(xs[index]), int(ys[index])
        allowed = mask & click_window(shape, x, y, mask)
        whole = mask & ~(descent_region(allowed, logits, x, y)
                         | descent_region(allowed, removal_relief(mask, logits), x, y))
        assert np.array_equal(remove_click(mask, logits, x, y), whole), (x, y)
        with_edges = whole & ~edge_region(allowed, mask, intensity, x, y)
        assert np.array_equal(remove_click(mask, logits, x, y, intensity), with_edges), (x, y)
        edges_cut += not np.array_equal(with_edges, whole)
        crop = _relief_crop(mask, allowed)  # the relief itself, where the click's slopes may run
        on_crop = removal_relief(mask[crop], logits[crop])[allowed[crop]]
        np.testing.assert_allclose(on_crop, removal_relief(mask, logits)[crop][allowed[crop]], rtol=0, atol=1e-9)
        cropped += mask[crop].size < mask.size
    assert cropped >= 5 and edges_cut >= 3  # clicks computed on a part of the image, some cut at edges


def test_box_combination_keeps_the_prompt_free_mask_inside_the_boxes_only():
    free = discs((64, 96), CENTRES)
    boxes = [(0, 0, 24, 24), (30, 0, 55, 25)]  # inclusive pixel indices: column 24 and row 24 are inside
    combined = combine_boxes(free, boxes)
    inside = np.zeros_like(free)
    inside[:25, :25] = inside[:26, 30:56] = True
    assert np.array_equal(combined, free & inside)
    assert np.array_equal(box_region(free.shape, boxes), inside)
    assert np.array_equal(combine_boxes(free, [(0, 0, 95, 63)]), free)  # a box over the whole image

class ScriptedSession(EspMedSamPromptSession):
    """A session whose decoder gives, for any click, every reference object (SAM's output for a point on an image
    of many objects is some of them), so only the click semantics decide what changes."""

    def __init__(self, free_logits, decoded):
        self.free_logit_map, self._decoded, self._clicks, self.intensity = free_logits, decoded, {}, None
        self.free_mask = free_logits > 0

    def decode_logits(self, points=None, labels=None):
        return self._decoded


def test_click_curve_never_falls_on_many_objects_and_undo_restores():
    reference = discs((64, 96), CENTRES)
    # the model: four nuclei found (two of them dim), two missed, two false blobs, one of them bright and touching a
    # dim true nucleus; the decode of any click: every reference nucleus with the bright blob joined to its neighbour
    free = cones((64, 96), [(10, 10), (40, 12, 2.0), (70, 10), (12, 45, 2.0), (25, 30, 3.0), (49, 14, 6.0)])
    decoded = cones((64, 96), [*CENTRES, (49, 14, 6.0)])
    session = ScriptedSession(free, decoded)
    curve = click_curve(session, reference, clicks=5)
    assert all(b >= a for a, b in zip(curve, curve[1:])) and curve[-1] > curve[0] + 10
    points, labels = [(45, 45), (25, 30)], [1, 0]
    before = session.mask(points=points[:1], labels=labels[:1])
    session.mask(points=points, labels=labels)
    assert np.array_equal(session.mask(points=points[:1], labels=labels[:1]), before)  # undo
    assert np.array_equal(session.mask(), session.free_mask)  # reset


def test_session_on_a_tiny_model_corrects_from_the_cached_embedding():
    model, processor = tiny_model(seed=1)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    session = EspMedSamPromptSession(model, processor, image, "microscopy")
    corrected = session.mask(points=[(30, 20)], labels=[1])
    decoded = session.decode_logits(points=[(30, 20)], labels=[1])
    assert np.array_equal(decoded > 0, session.decode(points=[(30, 20)], labels=[1]))
    assert np.array_equal(corrected, add_click(session.free_mask, decoded, session.free_logit_map, 30, 20,
                                               intensity_map(image, (48, 64))))
    assert np.array_equal(session.mask(points=[(30, 20), (5, 5)], labels=[1, 0]),
                          remove_click(corrected, session.free_logit_map, 5, 5, intensity_map(image, (48, 64))))
    np.testing.assert_allclose(session.intensity, image.mean(axis=-1), atol=1e-4)
    assert np.array_equal(session.free_logit_map > 0, session.free_mask)
    with pytest.raises(ValueError, match="one label per point"):
        session.mask(points=[(1, 1)], labels=[1, 0])
    # prompts outside the image are refused whether or not they decode (a negative click or a box needs no decode)
    with pytest.raises(ValueError, match=r"points\[0, 0, 1\] = \[-5.0, 10.0\] lies outside image 0 \(width 64"):
        session.mask(points=[(30, 20), (-5, 10)], labels=[1, 0])
    with pytest.raises(ValueError, match=r"boxes\[0, 0, 1\] = \[70.0, 40.0\] lies outside image 0"):
        session.mask(boxes=[[0, 0, 70, 40]])
    with pytest.raises(ValueError, match=r"lies outside image 0 \(width 64, height 48"):
        session.click(session.free_mask, 10, 48.5, 0)


def test_the_prompt_free_mask_is_cut_at_the_modalitys_calibrated_threshold():
    """The session's prompt-free mask is ``prediction.predict``'s: the modality's calibrated logit threshold."""
    model, processor = tiny_model(seed=1)
    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    logits = EspMedSamPromptSession(model, processor, image, "microscopy").free_logit_map
    cut = float(np.median(logits))
    processor.image_processor.modality_mask_thresholds = {"microscopy": cut}
    try:
        session = EspMedSamPromptSession(model, processor, image, "microscopy")
    finally:
        processor.image_processor.modality_mask_thresholds = None
    assert np.array_equal(session.free_mask, logits.reshape(session.free_mask.shape) > cut)
    assert np.array_equal(session.mask(), session.free_mask)


def test_a_tiled_session_starts_from_the_tiled_mask_and_decodes_a_click_on_its_tile():
    """At a scale that tiles the image, the prompt-free mask is ``predict``'s at that scale (what the pipeline and
    the evaluation show), and a positive click decodes on the tile around it (nearby clicks share it)."""
    from esp_medsam_hf.models.esp_medsam.prediction import predict
    from esp_medsam_hf.models.esp_medsam.prompt_session import TILE_OUTSIDE

    model, processor = tiny_model(seed=1)
    side = processor.image_processor.size["height"]
    image = np.random.default_rng(0).integers(0, 255, (150, 200, 3), dtype=np.uint8)
    session = EspMedSamPromptSession(model, processor, image, "microscopy", scale=1.0)
    expected = predict(model, processor, [image], "microscopy", scale=1.0)
    assert session.scale == 1.0 and np.array_equal(session.free_mask, expected.masks[0])
    np.testing.assert_allclose(session.free_logit_map, expected.logits[0].numpy(), rtol=0, atol=1e-6)
    assert not np.array_equal(session.free_mask, EspMedSamPromptSession(model, processor, image, "microscopy").free_mask)

    x, y = 100, 70
    decoded = session.decode_logits([(x, y)])
    left, top, tile = session._tile_at(x, y)
    assert tile.scale is None and len(session._tiles) == 1
    assert abs(x - left - side / 2) <= side / 8 and abs(y - top - side / 2) <= side / 8
    alone = EspMedSamPromptSession(model, processor, image[top : top + side, left : left + side], "microscopy",
                                   scale="whole").decode_logits([(x - left, y - top)])
    np.testing.assert_allclose(decoded[top : top + side, left : left + side], alone, rtol=0, atol=1e-6)
    outside = np.ones(decoded.shape, dtype=bool)
    outside[top : top + side, left : left + side] = False
    assert (decoded[outside] == TILE_OUTSIDE).all()
    intensity = intensity_map(image, image.shape[:2])  # the whole image's, as the tiled mask is
    assert np.array_equal(session.mask(points=[(x, y)], labels=[1]),
                          add_click(session.free_mask, decoded, session.free_logit_map, x, y, intensity))
    session.decode_logits([(x + 2, y + 1)])
    assert len(session._tiles) == 1  # the same tile, encoded once
    # a negative click edits the tiled mask by the tiled logits
    assert np.array_equal(session.mask(points=[(x, y)], labels=[0]),
                          remove_click(session.free_mask, session.free_logit_map, x, y, intensity))


def test_a_session_given_the_images_prediction_reuses_it():
    """A session given ``predict``'s result for its image (one image of a batch, ``Prediction.item``) starts from
    it: the same mask, logits and clicks as a session that segments the image itself; a prediction of another
    image is refused."""
    from esp_medsam_hf.models.esp_medsam.prediction import predict

    model, processor = tiny_model(seed=1)
    rng = np.random.default_rng(0)
    image, other = (rng.integers(0, 255, shape, dtype=np.uint8) for shape in ((150, 200, 3), (90, 120, 3)))
    batch = predict(model, processor, [image, other], "microscopy", scale=1.0)
    alone = EspMedSamPromptSession(model, processor, image, "microscopy", scale=1.0)
    given = EspMedSamPromptSession(model, processor, image, "microscopy", scale=1.0, prediction=batch.item(0))
    assert given.scale == alone.scale == 1.0
    assert np.array_equal(given.free_mask, alone.free_mask)
    np.testing.assert_allclose(given.free_logit_map, alone.free_logit_map, rtol=0, atol=1e-6)
    clicks = dict(points=[(100, 70), (30, 40)], labels=[1, 0])
    assert np.array_equal(given.mask(**clicks), alone.mask(**clicks))
    with pytest.raises(ValueError, match="prediction: expected one image's prediction of size"):
        EspMedSamPromptSession(model, processor, image, "microscopy", scale=1.0, prediction=batch.item(1))
