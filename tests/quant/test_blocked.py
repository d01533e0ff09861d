"""Blockwise RTN / MSE-clip / HQQ: the same bytes as on the whole matrix, with bounded temporaries."""

from __future__ import annotations

import numpy as np
import pytest

from qcompiler.quant import numerics
from qcompiler.quant.hqq import quantize_hqq
from qcompiler.quant.numerics import mse_clip_ratios, quantize_rtn
from qcompiler.spec import Granularity, QuantSpec

SPECS = [
    QuantSpec(bits=4, symmetric=False, granularity=Granularity.GROUP, group_size=128),
    QuantSpec(bits=4, symmetric=True, granularity=Granularity.GROUP, group_size=64),
    QuantSpec(bits=8, symmetric=False, granularity=Granularity.CHANNEL, group_size=128),
]


def _w(dtype: type) -> np.ndarray:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((300, 257)).astype(np.float32)  # K = 300: a partial last group
    w[:, 5] *= 40.0  # an outlier column
    return w.astype(dtype)


def _same(a: numerics.QuantizedWeight, b: numerics.QuantizedWeight, scale_rtol: float = 0.0) -> None:
    assert np.array_equal(a.q, b.q)
    assert np.array_equal(a.scale, b.scale) if not scale_rtol else np.allclose(a.scale, b.scale, rtol=scale_rtol, atol=0)
    assert (a.zero_point is None) == (b.zero_point is None)
    if a.zero_point is not None:
        assert np.array_equal(a.zero_point, b.zero_point)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_blocked_equals_whole(monkeypatch: pytest.MonkeyPatch, spec: QuantSpec, dtype: type) -> None:
    w = _w(dtype)
    monkeypatch.setattr(numerics, "BLOCK_VALUES", 1 << 40)
    assert len(numerics.column_blocks(*w.shape)) == 1
    whole = quantize_rtn(w, spec), mse_clip_ratios(w, spec), quantize_hqq(w, spec, iters=3)
    monkeypatch.setattr(numerics, "BLOCK_VALUES", 300 * 16)  # 16-column blocks (4 for MSE and HQQ)
    assert len(numerics.column_blocks(*w.shape)) == 17
    blocked = quantize_rtn(w, spec), mse_clip_ratios(w, spec), quantize_hqq(w, spec, iters=3)
    _same(whole[0], blocked[0])
    assert np.array_equal(whole[1], blocked[1])
    # symmetric HQQ refits scales with einsum, whose summation order follows the block width: 1 ulp
    _same(whole[2], blocked[2], scale_rtol=1e-6 if spec.symmetric else 0.0)
    # and the RTN grid is the one the docstring states: |W − Ŵ| ≤ s/2 everywhere (exact range, no clip)
    err = np.abs(blocked[0].dequantize() - w.astype(np.float32))
    half = numerics.expand_groups(blocked[0].scale, blocked[0].group_size, w.shape[0]) / 2
    assert np.all(err <= half * (1 + 1e-5))
