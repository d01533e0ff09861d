"""gptq: sequential Hessian-aware rounding lowers every linear's output error below RTN's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from qcompiler.passes.canonicalize import Canonicalize
from qcompiler.passes.gptq import GPTQ
from qcompiler.passes.quantize_weights import QuantizeWeights

from qcompiler.data import make_windows, read_text, tokenize
from qcompiler.errors import QCError
from qcompiler.irutil import load_model
from qcompiler.pipeline import PassContext, make_config, run_passes
from qcompiler.quant.emit import read_dq_weight
from qcompiler.quant.gptq import gptq_quantize, output_error
from qcompiler.quant.numerics import quantize_rtn
from qcompiler.quant.packing import pack_matmulnbits, unpack_matmulnbits
from qcompiler.spec import Granularity, QuantSpec, Role, linear_info
from tests.passes.calib_helpers import calib_context, linear_outputs, output_mse


def _correlated(k: int, n: int, rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A weight and the Hessian XᵀX of inputs with correlated, unevenly scaled channels."""
    rng = np.random.default_rng(seed)
    mix = np.eye(k) + 0.15 * rng.standard_normal((k, k))
    x = (rng.standard_normal((rows, k)) @ mix) * np.exp(rng.standard_normal(k))
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    return w, (x.T @ x).astype(np.float32)


def _spec(group: int, sym: bool, bits: int = 4) -> QuantSpec:
    gran = Granularity.GROUP if group else Granularity.CHANNEL
    return QuantSpec(bits=bits, symmetric=sym, granularity=gran, group_size=group or 128, method="gptq")


@pytest.mark.parametrize("group,sym,act_order", [(32, False, True), (32, True, False), (0, False, True),
                                                  (64, False, False), (16, True, True)])
def test_numerics_beat_rtn_and_keep_the_format(group: int, sym: bool, act_order: bool) -> None:
    w, h = _correlated(96, 40, 600)
    spec = _spec(group, sym)
    qw = gptq_quantize(w, h, spec, act_order=act_order, block=32)
    rtn = quantize_rtn(w, spec)
    assert output_error(w, qw.dequantize(), h) < 0.7 * output_error(w, rtn.dequantize(), h)
    g = group or 96
    assert qw.group_size == g and qw.scale.shape == (-(-96 // g), 40)
    lo, hi = (-8, 7) if sym else (0, 15)
    assert qw.q.min() >= lo and qw.q.max() <= hi
    assert (qw.zero_point is None) == sym
    # static groups: the scales are the RTN scales of the contiguous groups of the original weight
    if act_order:
        np.testing.assert_allclose(qw.scale, rtn.scale, rtol=1e-6)


def test_k_not_divisible_by_group_is_padded_like_matmulnbits() -> None:
    w, h = _correlated(72, 24, 300, seed=1)  # K = 2.25 groups of 32
    qw = gptq_quantize(w, h, _spec(32, False))
    assert qw.scale.shape == (3, 24) and qw.q.shape == (72, 24)
    packed, scales, zps = pack_matmulnbits(qw.q, qw.scale, qw.zero_point, 4, 32)
    assert packed.shape == (24, 3, 16)  # K padded to 96
    np.testing.assert_allclose(unpack_matmulnbits(packed, scales, zps, 72, 24, 4, 32), qw.dequantize(), rtol=1e-6)


def test_dead_input_channels_are_zeroed() -> None:
    w, h = _correlated(64, 16, 300, seed=2)
    h[5, :] = h[:, 5] = 0.0
    qw = gptq_quantize(w, h, _spec(32, True))
    assert np.all(qw.q[5] == 0)
    assert np.isfinite(qw.scale).all()


@pytest.fixture(scope="module")
def quantized(synthetic_dir, synthetic_text: Path):
    folder, _ = synthetic_dir
    float_model = load_model(folder / "model.onnx")
    Canonicalize()(float_model)
    rtn, _ = run_passes(load_model(folder / "model.onnx"),
                        [Canonicalize(), QuantizeWeights(make_config(QuantizeWeights, {"group_size": 32}))])
    ctx = calib_context(folder, synthetic_text)
    gptq, _ = run_passes(load_model(folder / "model.onnx"),
                         [Canonicalize(), GPTQ(make_config(GPTQ, {"group_size": 32}), ctx)])
    tokens = tokenize(folder, read_text(synthetic_text))
    windows = make_windows(tokens[len(tokens) // 2 :], 64, 64 * 4).ids  # held-out half of the text
    return float_model, rtn, gptq, ctx, windows


def test_every_linear_output_error_below_rtn(quantized) -> None:
    float_model, rtn, gptq, _, windows = quantized
    ref = linear_outputs(float_model, windows)
    err_rtn = output_mse(ref, linear_outputs(rtn, windows))
    err_gptq = output_mse(ref, linear_outputs(gptq, windows))
    assert len(err_gptq) == 14
    worse = {k: (err_gptq[k], err_rtn[k]) for k in err_gptq if not err_gptq[k] < err_rtn[k]}
    assert not worse, f"GPTQ output error not below RTN's for {worse}"


def test_writes_the_portable_group_form_and_a_report(quantized) -> None:
    _, _, gptq, ctx, _ = quantized
    seen = 0
    for node in gptq.graph:
        info = linear_info(node)
        if info is None or info.role == Role.LM_HEAD:
            continue
        dq = read_dq_weight(node.inputs[1])
        assert dq is not None and dq.bits == 4 and dq.group_size == 32 and not dq.symmetric, info.key
        seen += 1
    assert seen == 14 and gptq.opset_imports[""] == 21
    report = ctx.report["gptq"]
    assert report["calibration_windows"] == 6
    assert set(report["relative_output_error"]) == {f"layers.{i}.{r.value}" for i in range(2) for r in
                                                    (Role.Q, Role.K, Role.V, Role.O, Role.GATE, Role.UP, Role.DOWN)}
    assert report["mean_error_ratio_vs_rtn"] < 1.0


def test_needs_calibration_data(synthetic_dir) -> None:
    folder, _ = synthetic_dir
    model = load_model(folder / "model.onnx")
    with pytest.raises(QCError, match="gptq needs calibration data: pass --calib"):
        run_passes(model, [Canonicalize(), GPTQ(None, PassContext())])
