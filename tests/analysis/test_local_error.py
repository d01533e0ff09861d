"""Local error metrics and the candidates' numerics agree with the quantizers they stand for."""

from __future__ import annotations

import numpy as np
import pytest

from qcompiler.analysis.candidates import (
    fake_quant_activation,
    fake_quant_token,
    fake_quant_weight,
    parse_candidate,
)
from qcompiler.analysis.local_error import LinearErrors, output_error
from qcompiler.quant.numerics import quantize_rtn
from qcompiler.quant.w8a8 import reference_per_token_matmul, reference_static_matmul, static_qparams


def test_metrics_of_a_known_perturbation() -> None:
    rng = np.random.default_rng(0)
    y = rng.standard_normal((64, 32)).astype(np.float32)
    e = output_error(y, y * 1.01)  # every row off by exactly 1% in the same direction
    assert e.rel == pytest.approx(1e-4, rel=1e-4)
    assert e.snr_db == pytest.approx(40.0, abs=1e-3)
    assert e.cosine == pytest.approx(1.0, abs=1e-6)
    assert e.mse == pytest.approx(float(np.mean((0.01 * y.astype(np.float64)) ** 2)), rel=1e-4)
    flipped = output_error(y, -y)
    assert flipped.cosine == pytest.approx(-1.0, abs=1e-6) and flipped.rel == pytest.approx(4.0, rel=1e-6)


def test_rel_weighs_each_token_alike_snr_does_not() -> None:
    """A massive-activation row dominates SNR but counts as one row in ``rel``."""
    rng = np.random.default_rng(1)
    y = rng.standard_normal((100, 16))
    y[0] *= 1000.0
    noisy = y + 0.1 * rng.standard_normal(y.shape)  # the same absolute noise on every row
    e = output_error(y, noisy)
    assert e.snr_db > 45  # the huge row's energy swamps the noise
    assert e.rel > 0.005  # but the 99 ordinary rows have ~1% relative error each


@pytest.mark.parametrize("name", ["w4g128", "w4g32", "w8c", "w3g64"])
def test_weight_candidates_are_the_rtn_quantizer(name: str) -> None:
    w = np.random.default_rng(2).standard_normal((256, 48)).astype(np.float32)
    cand = parse_candidate(name)
    np.testing.assert_array_equal(fake_quant_weight(w, cand.weight), quantize_rtn(w, cand.weight).dequantize())


def test_activation_candidates_are_the_w8a8_reference_forms() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 64)).astype(np.float32)
    x[:, 5] *= 30.0
    w_q = rng.integers(-127, 128, size=(64, 24)).astype(np.int8)
    w_scale = rng.uniform(0.001, 0.01, size=24).astype(np.float32)
    w = w_q.astype(np.float32) * w_scale
    np.testing.assert_allclose(fake_quant_token(x) @ w, reference_per_token_matmul(x, w_q, w_scale), rtol=1e-5,
                               atol=1e-5)
    absmax = float(np.abs(x).max())
    scale, zero = static_qparams(-absmax, absmax, "int8", symmetric=True)
    np.testing.assert_allclose(fake_quant_activation(x, "tensor", absmax) @ w,
                               reference_static_matmul(x, scale, zero, "int8", w_q, w_scale), rtol=1e-5, atol=1e-5)


def test_linear_errors_match_direct_computation() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((128, 96)).astype(np.float32)
    w = rng.standard_normal((96, 40)).astype(np.float32) / 10
    absmax = float(np.abs(x).max())
    le = LinearErrors(x, w, absmax)
    for name in ("w4g32", "a8token", "w8c+a8tensor"):
        cand = parse_candidate(name)
        x_hat = fake_quant_activation(x, cand.activation, absmax)
        w_hat = fake_quant_weight(w, cand.weight) if cand.weight is not None else w
        assert le.error(cand) == output_error(x @ w, x_hat @ w_hat)
    # more bits, less error; per-token beats per-tensor when one channel is an outlier
    assert le.error(parse_candidate("w8c")).snr_db > le.error(parse_candidate("w4g32")).snr_db + 15
    x[:, 3] *= 50
    le = LinearErrors(x, w, float(np.abs(x).max()))
    assert le.error(parse_candidate("a8token")).rel < le.error(parse_candidate("a8tensor")).rel
