"""insert-qdq writes the canonical W8A8 forms with calibrated ranges; numerics match the numpy references."""

from __future__ import annotations

import numpy as np
import pytest
from qcompiler.passes.canonicalize import Canonicalize

from qcompiler.calibrate import StatRequest
from qcompiler.errors import CalibrationError, QCError
from qcompiler.irutil import load_model
from qcompiler.pipeline import PassContext, parse_pipeline, run_passes
from qcompiler.quant.numerics import quantize_weight
from qcompiler.quant.w8a8 import (
    activation_range,
    match_w8a8,
    reference_per_token_matmul,
    reference_static_matmul,
    static_qparams,
)
from qcompiler.spec import Granularity, QuantSpec, Role, act_spec, linear_info, set_act_spec
from tests.helpers import WINDOW
from tests.passes.w8a8_util import compile_model, l2_rel, run_values, shared_calibrator

W8 = QuantSpec(bits=8, symmetric=True, granularity=Granularity.CHANNEL)


@pytest.fixture(scope="module")
def calib(tmp_path_factory, synthetic_dir, synthetic_text):
    return shared_calibrator(tmp_path_factory, synthetic_dir[0], synthetic_text)


def _float_linears(folder):
    model = load_model(folder / "model.onnx")
    Canonicalize()(model)
    return {linear_info(n).key: (n.inputs[0].name, n.outputs[0].name, n.inputs[1].const_value.numpy().copy())
            for n in model.graph if linear_info(n) is not None}


def test_per_token_form_shared_and_exact(synthetic_dir, tmp_path) -> None:
    folder, _ = synthetic_dir
    lin = _float_linears(folder)
    model, ctx = compile_model(folder, "canonicalize,insert-qdq")
    matches = {linear_info(n).key: match_w8a8(n) for n in model.graph if linear_info(n) is not None}
    assert matches.pop("lm_head") is None  # lm_head stays float
    assert len(matches) == 14 and all(m is not None and m.kind == "per-token" for m in matches.values())
    # q/k/v (and gate/up) share one quantization of their input: 4 distinct inputs per layer
    assert sum(n.op_type == "ReduceMax" for n in model.graph) == 8
    for key, m in matches.items():
        ref = quantize_weight(lin[key][2], W8)
        np.testing.assert_array_equal(m.w_q, ref.q)
        np.testing.assert_allclose(m.w_scale, ref.scale.reshape(-1), rtol=1e-6)
    # each quantized linear computes the numpy reference on its (float) input
    keys = ["layers.0.q_proj", "layers.1.gate_proj", "layers.1.down_proj"]
    got = run_values(model, [v for k in keys for v in lin[k][:2]], WINDOW, tmp_path / "q")
    for k in keys:
        ref = reference_per_token_matmul(got[lin[k][0]][0], matches[k].w_q, matches[k].w_scale)
        assert l2_rel(ref, got[lin[k][1]][0]) < 1e-5
    assert "lm_head" in ctx.report["insert-qdq"]["float"]


@pytest.mark.parametrize(("method", "dtype", "sym"), [("minmax", "int8", True), ("percentile", "uint8", False),
                                                      ("mse", "uint8", True)])
def test_static_ranges_from_calibration(synthetic_dir, calib, tmp_path, method, dtype, sym) -> None:
    folder, _ = synthetic_dir
    lin = _float_linears(folder)
    model, ctx = compile_model(folder, f"canonicalize,insert-qdq{{act=static,method={method},dtype={dtype},sym={sym}}}",
                               calib)
    m = next(match_w8a8(n) for n in model.graph if linear_info(n) and linear_info(n).key == "layers.0.q_proj")
    assert m.kind == "static" and m.x_zero_dtype == dtype
    name = lin["layers.0.q_proj"][0]
    s = calib(load_model(folder / "model.onnx"), [StatRequest(name, ("minmax", "histogram"))])
    mm, hist = s.get(name, "minmax"), s.get(name, "histogram")
    lo, hi = activation_range(method, (mm.min, mm.max), hist, 99.99, sym)
    scale, zp = static_qparams(lo, hi, dtype, sym)
    assert m.x_scale == pytest.approx(scale, rel=1e-6) and m.x_zero == zp
    if method != "minmax":  # clipping never widens the observed range
        assert max(-lo, hi) <= max(-mm.min, mm.max) + 1e-6
    if sym:
        assert zp == (0 if dtype == "int8" else 128)
    got = run_values(model, [name, lin["layers.0.q_proj"][1]], WINDOW, tmp_path / "q")
    x, y = got[name][0], got[lin["layers.0.q_proj"][1]][0]
    ref = reference_static_matmul(x, m.x_scale, m.x_zero, dtype, m.w_q, m.w_scale)
    assert l2_rel(ref, y) < 1e-5
    assert ctx.report["insert-qdq"]["activations"]["layers.0.q_proj"]["dtype"] == dtype


def test_static_qparams_grids() -> None:
    s, z = static_qparams(-1.0, 3.0, "uint8", False)
    assert s == pytest.approx(4 / 255) and z == round(1 / s)
    s, z = static_qparams(-1.0, 3.0, "int8", False)
    assert s == pytest.approx(4 / 255) and -128 <= z <= 127 and z == round(-128 + 1 / s)
    assert static_qparams(0.5, 3.0, "int8", True) == (pytest.approx(3 / 127), 0)  # range widened to hold 0
    assert static_qparams(0.0, 0.0, "uint8", False)[0] == 1.0


def test_clipped_ranges_from_histogram() -> None:
    from qcompiler.calibrate import Histogram

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(400_000), [12.0, -9.0]])  # two outliers stretch min/max
    bins = 4096
    width = 2 * 12.0 * (1 + 1e-6) / bins
    counts = np.bincount(((x + bins * width / 2) / width).astype(int), minlength=bins)
    hist = Histogram(counts, width)
    mm = (float(x.min()), float(x.max()))
    assert activation_range("minmax", mm, hist) == mm
    for method in ("percentile", "entropy", "mse"):
        lo, hi = activation_range(method, mm, hist, percentile=99.9)
        assert -8 < lo < -2 and 2 < hi < 8, (method, lo, hi)  # the bulk kept, the outliers clipped
    lo, hi = activation_range("percentile", mm, hist, percentile=99.9, symmetric=False)
    assert lo < 0 < hi
    with pytest.raises(ValueError, match="needs a histogram"):
        activation_range("mse", mm, None)


def test_activation_spec_annotation_wins(synthetic_dir, calib) -> None:
    folder, _ = synthetic_dir
    model = load_model(folder / "model.onnx")
    Canonicalize()(model)
    down = next(n for n in model.graph if linear_info(n) and linear_info(n).role == Role.DOWN)
    set_act_spec(down, QuantSpec(bits=8, symmetric=True, granularity=Granularity.TENSOR, method="minmax"))
    model, _ = run_passes(model, parse_pipeline("insert-qdq", PassContext(calibrate=calib)))
    kinds = {linear_info(n).key: match_w8a8(n).kind for n in model.graph
             if linear_info(n) and linear_info(n).role != Role.LM_HEAD}
    assert kinds[linear_info(down).key] == "static"
    assert sum(k == "per-token" for k in kinds.values()) == 13
    assert act_spec(down).granularity == Granularity.TENSOR


def test_errors(synthetic_dir) -> None:
    folder, _ = synthetic_dir
    with pytest.raises(QCError, match="needs calibration data"):
        compile_model(folder, "canonicalize,insert-qdq{act=static}")
    with pytest.raises(QCError, match="dtype must be int8 or uint8"):
        parse_pipeline("insert-qdq{dtype=int4}")
    with pytest.raises(QCError, match="method must be one of"):
        parse_pipeline("insert-qdq{act=static,method=magic}")

    class NoStats:  # a calibrator whose statistics lack the requested values
        def __call__(self, model, requests):
            return self

        def get(self, value, observer):
            raise KeyError(value)

    with pytest.raises(CalibrationError, match=r"statistics missing for value '.*'"):
        model = load_model(folder / "model.onnx")
        run_passes(model, parse_pipeline("canonicalize,insert-qdq{act=static}", PassContext(calibrate=NoStats())))


def test_margin_held_back_and_fallback(synthetic_dir, calib) -> None:
    """margin widens every static range; held_back widens each by its leave-one-window-out overshoot
    (top window abs-max / second); fallback leaves inputs above the threshold with float activations."""
    folder, _ = synthetic_dir
    lin = _float_linears(folder)
    x = lin["layers.0.q_proj"][0]
    stats = calib(load_model(folder / "model.onnx"), [StatRequest(x, ("minmax", "absmax_channel_window"))])
    mm = stats.get(x, "minmax")
    per = np.sort(np.asarray(stats.get(x, "absmax_channel_window").absmax).max(axis=1))
    o = float(per[-1] / per[-2])
    absmax = max(abs(float(mm.min)), abs(float(mm.max)))
    for opts, factor in (("", 1.0), (",margin=1.5", 1.5), (",held_back=true", o), (",held_back=true,margin=2", 2 * o)):
        _, ctx = compile_model(folder, f"canonicalize,insert-qdq{{act=static{opts}}}", calib)
        rep = ctx.report["insert-qdq"]
        np.testing.assert_allclose(rep["activations"]["layers.0.q_proj"]["scale"], absmax * factor / 127, rtol=1e-5)
        if "held_back" in opts:
            assert rep["held_back_overshoot"]["layers.0.q_proj"] == pytest.approx(o, abs=1e-3)
    _, ctx = compile_model(folder, "canonicalize,insert-qdq{act=static,fallback=1.0}", calib)
    rep = ctx.report["insert-qdq"]
    # every input whose top window exceeds the others falls back (> 1.0); none is quantized statically
    assert rep["fallback"] and set(rep["fallback"]).isdisjoint(rep["activations"])
    assert all(v["held_back_overshoot"] > 1.0 for v in rep["fallback"].values())
    # fallback_error: the static error on the calibration rows (every row: fewer than the sample's 4096),
    # recomputed here for layers.0.q_proj; from the rows (error_stats=sample) exactly, from the bounded
    # log-histogram (the default) within its rounding-noise model
    rows = np.asarray(calib(load_model(folder / "model.onnx"), [StatRequest(x, ("sample",))]).get(x, "sample").rows,
                      np.float64)
    scale = absmax / 127
    xq = np.clip(np.rint(rows / scale), -128, 127) * scale
    want = ((rows - xq) ** 2).sum() / (rows**2).sum()
    for stats_from, rel in (("sample", 1e-3), ("histogram", 0.1)):
        _, ctx = compile_model(folder, f"canonicalize,insert-qdq{{act=static,fallback_error=1e-9,error_stats={stats_from}}}",
                               calib)
        rep = ctx.report["insert-qdq"]
        assert not rep["activations"] and len(rep["fallback"]) == 8  # every input has some error
        assert rep["fallback"]["layers.0.q_proj"]["static_error"] == pytest.approx(want, rel=rel)
    with pytest.raises(QCError, match="margin must be at least 1"):
        parse_pipeline("insert-qdq{margin=0.5}")


def test_fallback_budget_ranks_by_static_error_and_int16(synthetic_dir, calib, tmp_path) -> None:
    """fallback_budget keeps the inputs of largest static error (sampled calibration rows) at higher
    precision within the budget of linears; fallback_dtype=int16 writes a static int16 QDQ that ORT runs
    exactly as the numpy reference, and that no W8A8 lowering takes for an 8-bit form."""
    folder, _ = synthetic_dir
    lin = _float_linears(folder)
    _, ctx = compile_model(folder, "canonicalize,insert-qdq{act=static,fallback_error=1e-12}", calib)
    errors = {k: v["static_error"] for k, v in ctx.report["insert-qdq"]["fallback"].items()}
    # 14 linears over 8 inputs (q/k/v and gate/up share one): a budget of 0.3 allows 4 linears
    _, ctx = compile_model(folder, "canonicalize,insert-qdq{act=static,fallback_budget=0.3}", calib)
    rep = ctx.report["insert-qdq"]
    chosen = rep["fallback"]
    assert 0 < rep["fallback_linears"] <= 4 and rep["fallback_dtype"] == "float"
    for k, v in chosen.items():
        assert v["static_error"] == pytest.approx(errors[k], rel=1e-3)
    # greedy by error: every input ranked above a chosen one was too wide for the budget
    best = max(errors, key=errors.get)
    width = 3 if best.endswith(("q_proj", "k_proj", "v_proj")) else 2 if best.endswith(("gate_proj", "up_proj")) else 1
    assert (best in chosen) == (width <= 4)
    assert set(chosen).isdisjoint(rep["activations"])
    # int16 activations for the chosen inputs: exact against the numpy reference
    model16, ctx16 = compile_model(folder, "canonicalize,insert-qdq{act=static,fallback_budget=0.3,fallback_dtype=int16}",
                                   calib)
    rep16 = ctx16.report["insert-qdq"]
    assert set(rep16["fallback"]) == set(chosen) and rep16["fallback_dtype"] == "int16"
    key = next(iter(chosen))
    node = next(n for n in model16.graph if linear_info(n) is not None and linear_info(n).key == key)
    assert match_w8a8(node) is None and node.metadata_props["qc.quant"] == "a16w8-static"
    s16 = rep16["fallback"][key]["int16_scale"]
    w = quantize_weight(lin[key][2], W8)
    got = run_values(model16, list(lin[key][:2]), WINDOW, tmp_path / "a16")
    x = got[lin[key][0]][0].astype(np.float64)
    xq = np.clip(np.rint(x / s16), -32767, 32767) * s16
    ref = xq @ (w.q.astype(np.float64) * w.scale.reshape(1, -1))
    assert l2_rel(ref, got[lin[key][1]][0]) < 1e-5
    # int16 on a 16x wider range (fallback_margin): still a step 8x finer than uint8, the error far below
    assert s16 == pytest.approx(16 * np.abs(x).max() / 32767, rel=0.5)
    assert l2_rel(x, xq) < 0.3 * np.sqrt(errors[key])
    with pytest.raises(QCError, match="fallback_budget"):
        parse_pipeline("insert-qdq{fallback_budget=1.5}")
    with pytest.raises(QCError, match="fallback_dtype"):
        parse_pipeline("insert-qdq{fallback_dtype=fp8}")
