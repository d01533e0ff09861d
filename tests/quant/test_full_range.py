"""The full-range symmetric grid (``QuantSpec.full_range``): all 2^b codes through a signed scale.

Each group's value of largest magnitude ``v`` is code ``-2^(b-1)`` exactly (``s = v/-2^(b-1)``), the
step is ``|v|/2^(b-1)``; ONNX Runtime's own symmetric blocks (MLAS, onnxruntime-genai's int4 models)
and llama.cpp's Q4_0 use this grid.  Every weight method that picks scales must keep it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from qcompiler.quant.gptq import gptq_quantize
from qcompiler.quant.hqq import quantize_hqq
from qcompiler.quant.learned_round import LearnedRounding
from qcompiler.quant.numerics import expand_groups, mse_clip_ratios, quantize_rtn, store_scales
from qcompiler.spec import Granularity, QuantSpec

FULL = QuantSpec(bits=4, symmetric=True, group_size=32, full_range=True)


def _weight(seed: int = 0, k: int = 96, n: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.02
    w[rng.integers(0, k, 12), rng.integers(0, n, 12)] *= 25  # outliers of either sign
    return w


def _extremes(w: np.ndarray, group: int) -> np.ndarray:
    """Per group and column, the value of largest magnitude (sign kept): ``[G, N]``."""
    g = w.reshape(-1, group, w.shape[1])
    idx = np.abs(g).argmax(axis=1)
    return np.take_along_axis(g, idx[:, None, :], axis=1)[:, 0, :]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_keeps_each_groups_extreme_exactly(bits: int) -> None:
    spec = dataclasses.replace(FULL, bits=bits)
    w = _weight()
    qw = quantize_rtn(w, spec)
    v = _extremes(w, 32)
    np.testing.assert_allclose(qw.scale, v / -(2 ** (bits - 1)), rtol=1e-7)  # signed: negative where v > 0
    assert (qw.scale < 0).any() and (qw.scale > 0).any()
    assert qw.zero_point is None and qw.q.min() == -(2 ** (bits - 1)) and qw.q.max() <= 2 ** (bits - 1) - 1
    deq = qw.dequantize()
    np.testing.assert_array_equal(_extremes(deq, 32), v)  # the extreme is on the grid
    # inside [-(2^(b-1)-1)·|s|, 2^(b-1)·|s|] (on the extreme's side) the error is at most half a step
    s = np.abs(expand_groups(qw.scale, 32, w.shape[0]))
    inside = np.abs(w) <= (2 ** (bits - 1) - 1) * s
    assert (np.abs(deq - w)[inside] <= s[inside] / 2 * (1 + 1e-6)).all()


def test_finer_than_the_restricted_grid() -> None:
    """8/7 finer steps: lower error than ``s = max|W|/7`` on a weight with outliers."""
    w = _weight(1)
    full = quantize_rtn(w, FULL).dequantize()
    restricted = quantize_rtn(w, dataclasses.replace(FULL, full_range=False)).dequantize()
    assert np.sum((full - w) ** 2) < 0.9 * np.sum((restricted - w) ** 2)


def test_all_zero_group_and_half_scales_keep_their_sign() -> None:
    w = _weight(2)
    w[:32, 0] = 0.0
    qw = quantize_rtn(w, FULL)
    assert qw.scale[0, 0] == 1.0 and (qw.q[:32, 0] == 0).all()
    tiny = np.array([-1e-30, 1e-30, -0.5], np.float32)  # fp16 flushes the first two to 0
    stored = store_scales(tiny, dataclasses.replace(FULL, scale_dtype="fp16"))
    assert stored[0] < 0 < stored[1] and stored[2] == -0.5


def test_spec_and_config_validation() -> None:
    from qcompiler.passes.quantize_weights import QuantizeWeightsConfig

    with pytest.raises(ValueError, match="full_range"):
        QuantSpec(bits=4, symmetric=False, full_range=True)
    with pytest.raises(ValueError, match="full_range"):
        QuantSpec(bits=7, symmetric=True, full_range=True)
    with pytest.raises(ValueError, match="sym=true"):
        QuantizeWeightsConfig(full_range=True)
    assert QuantizeWeightsConfig(sym=True, full_range=True).spec().describe() == "rtn int4 sym-full g128"
    assert FULL.to_dict()["full_range"] is True and "full_range" not in dataclasses.replace(
        FULL, full_range=False).to_dict()


def _on_grid(qw) -> None:
    """Codes in [-8, 7], no zero point, finite values."""
    assert qw.zero_point is None and qw.q.min() >= -8 and qw.q.max() <= 7
    assert np.isfinite(qw.dequantize()).all()


def test_mse_clip_hqq_gptq_and_learned_rounding_keep_the_grid() -> None:
    w = _weight(3)
    rtn = quantize_rtn(w, FULL)
    err_rtn = np.sum((rtn.dequantize() - w) ** 2)
    # MSE clipping: shrink ratios in (0.5, 1]; no group worse than RTN's
    r = mse_clip_ratios(w, FULL)
    clipped = quantize_rtn(w, FULL, r)
    _on_grid(clipped)
    assert np.sum((clipped.dequantize() - w) ** 2) <= err_rtn
    # HQQ refines the signed scales without flipping them
    h = quantize_hqq(w, FULL)
    _on_grid(h)
    assert (np.sign(h.scale) == np.sign(rtn.scale)).all()
    assert np.sum(np.abs(h.dequantize() - w) ** 0.7) <= np.sum(np.abs(rtn.dequantize() - w) ** 0.7) * (1 + 1e-6)
    # GPTQ (static groups: RTN's signed scales) lowers the output error x·(W − Ŵ)
    x = np.random.default_rng(4).standard_normal((256, w.shape[0])).astype(np.float32)
    xtx = x.T @ x
    g = gptq_quantize(w, xtx, FULL)
    _on_grid(g)
    np.testing.assert_array_equal(g.scale, rtn.scale)

    def out_err(d: np.ndarray) -> float:
        return float(np.sum((x @ (d - w)) ** 2))

    assert out_err(g.dequantize()) < out_err(rtn.dequantize())
    # learned rounding starts from the same signed grid
    lr = LearnedRounding(w, FULL).quantized()
    _on_grid(lr)
    np.testing.assert_allclose(lr.scale, rtn.scale, rtol=1e-6)


def test_per_channel() -> None:
    spec = dataclasses.replace(FULL, granularity=Granularity.CHANNEL)
    w = _weight(5)
    qw = quantize_rtn(w, spec)
    assert qw.scale.shape == (1, w.shape[1])
    np.testing.assert_array_equal(_extremes(qw.dequantize(), w.shape[0]), _extremes(w, w.shape[0]))


def test_same_grid_as_onnx_runtimes_symmetric_block_quantizer() -> None:
    """ONNX Runtime's own int4 block quantizer (MLAS, as ``MatMulNBitsQuantizer`` and onnxruntime-genai's
    builder call it, ``is_symmetric``) picks the same signed scales; the codes differ at most where ``W/s``
    is a rounding tie (MLAS multiplies by ``1/s``)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    w = _weight(6, k=128, n=48)
    k, n = w.shape
    packed = np.zeros((n, k // 32, 16), np.uint8)
    scales = np.zeros((n, k // 32), np.float32)
    zp = np.zeros((n, (k // 32 + 1) // 2), np.uint8)
    quantize_matmul_4bits(packed, w, scales, zp, 32, n, k, True)
    ort_q = np.stack([packed & 15, packed >> 4], axis=-1).reshape(n, k).T.astype(np.int32) - 8
    ours = quantize_rtn(w, FULL)
    np.testing.assert_allclose(ours.scale, scales.T, rtol=1e-7)
    assert np.mean(ours.q == ort_q) > 0.999 and np.abs(ours.q - ort_q).max() <= 1
