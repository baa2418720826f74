"""The int8 copy of the ONNX export (the onnxruntime path's default where it holds, microscopy and fundus on a CPU
with VNNI; $ESP_MEDSAM_INT8 or int8= override): close to float32 on a small model, the float32 path bit for bit
when off, and kept in the same bounded cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _inference_helpers import single_thread
from esp_medsam_hf import EspMedSamConfig, EspMedSamModel
from esp_medsam_hf.models.esp_medsam import backends

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

SIZE = 64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from single_thread()


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(backends.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(backends.INT8_ENV, raising=False)
    monkeypatch.delenv(backends.CACHE_SIZE_ENV, raising=False)
    backends._sessions.clear()
    yield
    backends._sessions.clear()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return EspMedSamModel(EspMedSamConfig.tiny(image_size=SIZE, initializer_range=0.2)).eval()


needs_vnni = pytest.mark.skipif(
    not backends.int8_holds_on_this_cpu(),
    reason="int8's accuracy holds where onnxruntime has VNNI; without it (AVX2's saturating products) the automatic "
    "choice runs float32 (test_automatic_int8_needs_vnni)")


@pytest.fixture()
def vnni(monkeypatch):
    """The automatic choice as on a CPU with VNNI, whatever this one has."""
    monkeypatch.setattr(backends, "int8_holds_on_this_cpu", lambda: True)


def forward(model, pixels, int8):
    session = backends.onnx_session(model, int8=int8)
    feed = {"pixel_values": pixels.numpy(), "modality": np.array([0, 3, -1][: len(pixels)])}
    return session.run(None, feed)


@needs_vnni
def test_int8_matches_float32_within_its_tolerance(model):
    """Mask logits within 10 % of their largest magnitude (random weights of a tiny model: 6 % measured) and
    >= 97 % of the mask pixels the same."""
    pixels = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    exact, quantized = forward(model, pixels, False), forward(model, pixels, True)
    scale = np.abs(exact[0]).max()
    assert scale > 0.1
    assert np.abs(quantized[0] - exact[0]).max() <= 0.10 * scale
    assert ((quantized[0] > 0) == (exact[0] > 0)).mean() >= 0.97
    assert not np.array_equal(quantized[0], exact[0])  # it did run the int8 graph


def test_int8_by_default_where_it_holds_and_off_is_the_float32_path_bit_for_bit(model, monkeypatch, tmp_path, vnni):
    """Unset, the onnxruntime path runs the int8 copy for microscopy batches (where it was measured to hold) and the
    float32 export otherwise; ``ESP_MEDSAM_INT8=0`` or ``int8=False`` give exactly what a session of the float32
    export gives, ``ESP_MEDSAM_INT8=1`` int8 for every batch."""
    from esp_medsam_hf.models.esp_medsam.export import export_onnx, onnxruntime_session

    pixels = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    microscopy, other = torch.tensor([4, 4]), torch.tensor([1, -1])
    assert backends.INT8_MODALITIES == ("microscopy", "fundus") and model.config.modality_names[4] == "microscopy"
    plain = onnxruntime_session(export_onnx(model, tmp_path / "plain" / "graph.onnx"), 1)

    def reference(modality):
        return plain.run(None, {"pixel_values": pixels.numpy(), "modality": modality.numpy()})

    def run(modality, **kwargs):
        return backends.run_inference(model, pixels, modality, backend="onnxruntime", **kwargs)

    quantized = run(microscopy, int8=True)
    assert torch.equal(run(microscopy).pred_masks, quantized.pred_masks)  # automatic: int8 for microscopy
    assert np.array_equal(run(other).pred_masks.numpy(), reference(other)[0])  # automatic: float32 otherwise
    keyword = run(microscopy, int8=False)
    monkeypatch.setenv(backends.INT8_ENV, "off")
    environment = run(microscopy)
    for off in (keyword, environment):
        assert np.array_equal(off.pred_masks.numpy(), reference(microscopy)[0])
        assert np.array_equal(off.modality_logits.numpy(), reference(microscopy)[2])
    assert not torch.equal(quantized.pred_masks, keyword.pred_masks)
    monkeypatch.setenv(backends.INT8_ENV, "1")
    assert torch.equal(run(other).pred_masks, run(other, int8=True).pred_masks)
    monkeypatch.setenv(backends.INT8_ENV, "maybe")
    with pytest.raises(ValueError, match="ESP_MEDSAM_INT8 must be 1/on or 0/off .*, got 'maybe'"):
        backends.resolve_int8()


def test_int8_copy_lives_in_the_bounded_cache(model, tmp_path, monkeypatch):
    backends.onnx_session(model, int8=True)
    exports = backends.cached_exports(tmp_path)
    assert len(exports) == 2 and exports[-1].name.endswith(".int8.onnx")
    # a bound below both: only the copy in use stays
    monkeypatch.setenv(backends.CACHE_SIZE_ENV, "0")
    backends._sessions.clear()
    backends.onnx_session(model, int8=True)
    assert [p.name for p in backends.cached_exports(tmp_path)] == [exports[-1].name]
    assert backends.clear_cache(tmp_path)[0] == 1 and not backends.cached_exports(tmp_path)


@needs_vnni
def test_one_modality_graph_matches_the_general_graph_and_is_cached_beside_it(model, tmp_path):
    """Tiles run through their modality's own graph (bag weights as constants): float32 within 1e-4 of the general
    graph, int8 within the int8 tolerance of float32; a batch of mixed modalities keeps the general graph."""
    pixels = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    microscopy = torch.full((3,), 4)
    general = backends.run_inference(model, pixels, microscopy, backend="onnxruntime", int8=False)
    own = backends.run_inference(model, pixels, microscopy, backend="onnxruntime", int8=False,
                                 one_modality_graph=True)
    torch.testing.assert_close(own.pred_masks, general.pred_masks, rtol=0, atol=1e-4)
    assert own.modality.tolist() == [4, 4, 4]
    torch.testing.assert_close(own.modality_logits, general.modality_logits, rtol=0, atol=1e-4)
    names = sorted(path.name for path in tmp_path.glob("esp_medsam_*.onnx"))
    assert len(names) == 2 and any(name.endswith(".m4.onnx") for name in names)
    session = backends.onnx_session(model, int8=False, modality=4)
    assert [item.name for item in session.get_inputs()] == ["pixel_values"]
    quantized = backends.run_inference(model, pixels, microscopy, backend="onnxruntime", int8=True,
                                       one_modality_graph=True)
    scale = float(general.pred_masks.abs().max())
    assert float((quantized.pred_masks - general.pred_masks).abs().max()) <= 0.10 * scale
    # >= 95 % of the pixels the same (the general int8 graph's 97 %, less: the bag's products are int8 too; random
    # weights of a tiny model are the worst case, the real model's tiles are measured in docs/benchmark.md)
    assert ((quantized.pred_masks > 0) == (general.pred_masks > 0)).float().mean() >= 0.95
    assert any(path.name.endswith(".m4.int8.onnx") for path in tmp_path.glob("*.onnx"))
    mixed = backends.run_inference(model, pixels, torch.tensor([4, 0, 4]), backend="onnxruntime", int8=False,
                                   one_modality_graph=True)
    assert mixed.modality.tolist() == [4, 0, 4]
    assert len(list(tmp_path.glob("esp_medsam_*.onnx"))) == 3  # no graph for a mixed batch
    assert backends.clear_cache(tmp_path)[0] == 3


def test_an_int8_batch_of_one_modality_runs_on_its_own_graph_unasked(model, tmp_path, vnni):
    """int8 is where a modality's own graph pays (its bag's products are int8 too: 0.32x against 0.45x the official
    release's latency at batch 1 and 1024 px, docs/benchmark.md), so an int8 batch of one given modality (the
    automatic choice for microscopy) runs on it without ``one_modality_graph``; float32 and mixed batches keep the
    general graph."""
    pixels = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    microscopy = torch.full((2,), 4)
    unasked = backends.run_inference(model, pixels, microscopy, backend="onnxruntime")
    asked = backends.run_inference(model, pixels, microscopy, backend="onnxruntime", int8=True,
                                   one_modality_graph=True)
    assert torch.equal(unasked.pred_masks, asked.pred_masks) and unasked.modality.tolist() == [4, 4]
    assert {key[:2] for key in backends._sessions[model].sessions} == {(True, 4)}
    assert sorted(path.name.split(".", 1)[1] for path in tmp_path.glob("esp_medsam_*.onnx")) == ["m4.int8.onnx",
                                                                                               "m4.onnx"]
    backends.run_inference(model, pixels, microscopy, backend="onnxruntime", int8=False)
    backends.run_inference(model, pixels, torch.tensor([4, 0]), backend="onnxruntime", int8=True)
    assert {key[:2] for key in backends._sessions[model].sessions} == {(True, 4), (False, None), (True, None)}


def test_automatic_int8_needs_vnni(model, monkeypatch, tmp_path):
    """Without VNNI the automatic choice is float32 for every modality (bit for bit the float32 export's session);
    int8 asked for still runs."""
    monkeypatch.setattr(backends, "int8_holds_on_this_cpu", lambda: False)
    assert not backends.resolve_int8(None, ["microscopy"]) and not backends.resolve_int8(None, ["fundus"])
    assert backends.resolve_int8(True, ["x-ray"])
    pixels = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(6))
    microscopy = torch.full((2,), 4)
    unasked = backends.run_inference(model, pixels, microscopy, backend="onnxruntime")
    exact = backends.run_inference(model, pixels, microscopy, backend="onnxruntime", int8=False)
    assert torch.equal(unasked.pred_masks, exact.pred_masks)  # one float32 session, run twice
    assert {key[0] for key in backends._sessions[model].sessions} == {False}
    monkeypatch.setenv(backends.INT8_ENV, "1")
    assert backends.resolve_int8(None, ["microscopy"])
    backends.run_inference(model, pixels, microscopy, backend="onnxruntime")
    assert True in {key[0] for key in backends._sessions[model].sessions}  # the int8 copy ran


def _float_products(path) -> set[str]:
    import onnx

    graph = onnx.load(str(path)).graph
    constants = {tensor.name for tensor in graph.initializer}
    return {node.name for node in graph.node
            if node.op_type in ("MatMul", "Gemm") and any(item in constants for item in node.input)}


@needs_vnni
def test_fundus_and_the_general_graph_keep_the_products_after_a_gelu_float32(model, tmp_path, vnni):
    """The products that read a GELU's output (the TinyViT MLPs' second ones, one a block) stay float32 in the int8
    copy of fundus's own graph and of the general graph, which may see fundus images; microscopy's graph quantises
    them. Fundus batches run int8 by default, within the int8 tolerance of float32."""
    from esp_medsam_hf.models.esp_medsam.export import gelu_fed_products

    fundus, microscopy = (model.config.modality_index(name) for name in ("fundus", "microscopy"))
    pixels = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    exact = backends.run_inference(model, pixels, torch.full((2,), fundus), backend="onnxruntime", int8=False)
    quantized = backends.run_inference(model, pixels, torch.full((2,), fundus), backend="onnxruntime")
    assert not torch.equal(quantized.pred_masks, exact.pred_masks)  # int8 by default
    scale = float(exact.pred_masks.abs().max())
    assert float((quantized.pred_masks - exact.pred_masks).abs().max()) <= 0.10 * scale
    backends.run_inference(model, pixels, torch.full((2,), microscopy), backend="onnxruntime")
    backends.run_inference(model, pixels, torch.tensor([fundus, microscopy]), backend="onnxruntime")
    files = {path.name.split(".", 1)[1]: path for path in tmp_path.glob("esp_medsam_*.onnx")}
    assert set(files) == {"onnx", "int8.onnx", f"m{fundus}.onnx", f"m{fundus}.int8.onnx", f"m{microscopy}.onnx",
                          f"m{microscopy}.int8.onnx"}
    depth = sum(model.config.aggregator_config.depths[1:])  # the TinyViT blocks with an MLP
    for name in ("", f"m{fundus}.", f"m{microscopy}."):
        gelu_fed = set(gelu_fed_products(files[f"{name}onnx"]))
        assert len(gelu_fed) == depth and all("MatMul" in node.rsplit("/", 1)[-1] for node in gelu_fed)
        kept = _float_products(files[f"{name}int8.onnx"])
        if name == f"m{microscopy}.":
            assert not kept & gelu_fed
        else:
            assert gelu_fed <= kept and len(kept) < len(_float_products(files[f"{name}onnx"]))


def test_a_batch_is_shared_between_threads_and_matches_one_call(model):
    """With two torch threads a batch runs image by image on two Python threads, each on a one-thread session:
    float32 within 1e-5 of one call of the whole batch on a two-thread session (another code path: onnxruntime may
    order its sums by thread), and an image's int8 output is the same whichever images share its batch."""
    pixels = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    modality = torch.tensor([0, 3, -1, 4])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        split = backends.run_inference(model, pixels, modality, backend="onnxruntime", int8=False)
        whole = backends.onnx_session(model, num_threads=2, int8=False).run(
            None, {"pixel_values": pixels.numpy(), "modality": modality.numpy()})
        torch.testing.assert_close(split.pred_masks, torch.from_numpy(whole[0]), rtol=0, atol=1e-5)
        torch.testing.assert_close(split.modality_logits, torch.from_numpy(whole[2]), rtol=0, atol=1e-5)
        assert split.modality.tolist() == whole[3].tolist()
        assert (False, None, 1) in backends._sessions[model].sessions  # the split ran on one-thread sessions
        microscopy = torch.full((3,), 4)
        first = backends.run_inference(model, pixels[[0, 1, 2]], microscopy, backend="onnxruntime", int8=True)
        second = backends.run_inference(model, pixels[[0, 3, 3]], microscopy, backend="onnxruntime", int8=True)
        torch.testing.assert_close(first.pred_masks[0], second.pred_masks[0], rtol=0, atol=1e-6)
    finally:
        torch.set_num_threads(threads)
