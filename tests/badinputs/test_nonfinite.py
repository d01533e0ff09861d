"""No fallback turns a NaN/Inf into a usable scale, whichever path computes the scales."""

from __future__ import annotations

import numpy as np
import pytest

from qcompiler.errors import CalibrationError, InputError
from qcompiler.finite import nonfinite_summary, require_finite
from qcompiler.quant.numerics import scales_from_range
from qcompiler.quant.smoothing import smoothing_scales
from qcompiler.quant.w8a8 import static_qparams
from qcompiler.spec import Granularity, QuantSpec


@pytest.mark.parametrize("sym", [True, False])
def test_scales_from_range_refuses_nan(sym: bool) -> None:
    spec = QuantSpec(bits=8, symmetric=sym, granularity=Granularity.CHANNEL)
    lo, hi = np.array([-1.0, np.nan, 0.0], np.float32), np.array([1.0, 2.0, 0.0], np.float32)
    with pytest.raises(ValueError, match="non-finite"):
        scales_from_range(lo, hi, spec)
    scale, _ = scales_from_range(np.array([-1.0, 0.0], np.float32), np.array([1.0, 0.0], np.float32), spec)
    assert np.isfinite(scale).all() and scale[1] == 1.0  # an all-zero channel still gets scale 1


def test_smoothing_scales_refuse_nan_statistics_and_weights() -> None:
    a, w = np.array([1.0, 2.0, 3.0]), np.array([1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="statistics hold NaN/Inf at channel 1"):
        smoothing_scales(np.array([1.0, np.nan, 3.0]), w, 0.5)
    with pytest.raises(ValueError, match="weight abs-max hold NaN/Inf at channel 2"):
        smoothing_scales(a, np.array([1.0, 1.0, np.inf]), 0.5)
    assert np.isfinite(smoothing_scales(a, w, 0.5)).all()


def test_static_qparams_refuse_nan_range() -> None:
    with pytest.raises(CalibrationError, match="not finite"):
        static_qparams(float("nan"), 1.0)


def test_require_finite_names_tensor_and_index() -> None:
    w = np.zeros((4, 5), np.float32)
    w[2, 3] = np.inf
    assert nonfinite_summary(w) == "1 NaN/Inf value(s), the first at [2, 3]"
    with pytest.raises(InputError, match=r"tensor 'w' holds 1 NaN/Inf value\(s\), the first at \[2, 3\]"):
        require_finite(w, "tensor 'w'")
