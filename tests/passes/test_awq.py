"""awq: folding the scales is exact in float; scaled + clipped weights beat RTN on every linear."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from qcompiler.passes.awq import AWQ, OUTPUT_SCALE_KEY, _fit_channel_map
from qcompiler.passes.canonicalize import Canonicalize
from qcompiler.passes.quantize_weights import QuantizeWeights

from qcompiler.data import make_windows, read_text, tokenize
from qcompiler.irutil import load_model
from qcompiler.pipeline import make_config, run_passes
from qcompiler.quant.awq import awq_scales, clip_ratios, quadratic_error, scaled_rtn, search_scales
from qcompiler.quant.emit import read_dq_weight
from qcompiler.quant.numerics import quantize_rtn
from qcompiler.spec import QuantSpec, Role, linear_info
from tests.helpers import WINDOW, rel_err, run_logits
from tests.passes.calib_helpers import calib_context, linear_outputs, output_mse


def _salient(k: int, n: int, rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weights and inputs with a few large (salient) input channels: (W, XᵀX, mean|X|)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, k)) * np.where(np.arange(k) % 13 == 0, 20.0, 1.0)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    return w, (x.T @ x).astype(np.float32), np.abs(x).mean(axis=0).astype(np.float32)


def test_scale_search_never_worse_than_rtn_and_helps_salient_channels() -> None:
    w, h, xm = _salient(128, 48, 800)
    spec = QuantSpec(bits=4, group_size=32)
    s, alpha, errors = search_scales(w, h, xm, spec, grid=10)
    assert errors[0] == pytest.approx(quadratic_error(w - quantize_rtn(w, spec).dequantize(), h), rel=1e-5)
    assert alpha > 0 and min(errors) < 0.9 * errors[0]
    assert quadratic_error(w - scaled_rtn(w, s, spec), h) == pytest.approx(min(errors), rel=1e-5)
    np.testing.assert_allclose(np.sqrt(s.max() * s.min()), 1.0, rtol=1e-5)
    assert s[0] > s[1]  # channel 0 is salient


def test_tied_channels_share_one_scale() -> None:
    w, h, xm = _salient(64, 16, 300, seed=1)
    tie = np.arange(64) % 16  # four o channels per v channel, as with grouped-query attention
    s, _, _ = search_scales(w, h, xm, QuantSpec(bits=4, group_size=32), grid=8, tie=tie)
    for j in range(16):
        assert np.ptp(s[tie == j]) == 0


def test_clip_ratios_lower_the_output_error() -> None:
    w, h, _ = _salient(96, 32, 500, seed=2)  # K = 3 groups of 32
    spec = QuantSpec(bits=4, group_size=32)
    r = clip_ratios(w, h, spec, grid=20, max_shrink=0.5)
    assert r.shape == (3, 32) and r.min() >= 0.5 and r.max() <= 1.0
    clipped = quadratic_error(w - quantize_rtn(w, spec, r).dequantize(), h)
    assert clipped < quadratic_error(w - quantize_rtn(w, spec).dequantize(), h)


def test_channel_map_fit() -> None:
    rng = np.random.default_rng(3)
    base = rng.standard_normal((1, 20, 12)).astype(np.float32)
    r = (2.0 ** (np.arange(4) / 4)).astype(np.float32)
    m = np.arange(12) // 3
    assert np.array_equal(_fit_channel_map(base, base * r[m], r), m)
    mixed = base * r[m]
    mixed[..., 0] += base[..., 5]  # not a per-channel scaling any more
    assert _fit_channel_map(base, mixed, r) is None


@pytest.fixture(scope="module")
def models(synthetic_dir, synthetic_text: Path):
    folder, _ = synthetic_dir
    float_model = load_model(folder / "model.onnx")
    Canonicalize()(float_model)
    fold_ctx = calib_context(folder, synthetic_text)
    folded, _ = run_passes(load_model(folder / "model.onnx"),
                           [Canonicalize(), AWQ(make_config(AWQ, {"fold_only": True, "grid": 10}), fold_ctx)])
    ctx = calib_context(folder, synthetic_text)
    awq, _ = run_passes(load_model(folder / "model.onnx"),
                        [Canonicalize(), AWQ(make_config(AWQ, {"group_size": 32, "grid": 10}), ctx)])
    rtn, _ = run_passes(load_model(folder / "model.onnx"),
                        [Canonicalize(), QuantizeWeights(make_config(QuantizeWeights, {"group_size": 32}))])
    return float_model, folded, fold_ctx, awq, ctx, rtn


def test_folding_alone_leaves_logits_unchanged(models, synthetic_dir, tmp_path: Path) -> None:
    _, folded, fold_ctx, *_ = models
    groups = fold_ctx.report["awq"]["groups"]
    folded_into = {k.split("+")[0].split(".")[-1]: g["folded_into"] for k, g in groups.items()}
    # q/k/v and gate/up into their RMSNorms, o into v (GQA: 2 query heads per kv head), down into up
    assert folded_into == {"q_proj": "rmsnorm", "o_proj": "v_proj", "gate_proj": "rmsnorm", "down_proj": "up_proj"}
    assert all(g["alpha"] is not None for g in groups.values())
    assert any(g["alpha"] > 0 for g in groups.values())  # the scales are not all trivial
    ref = run_logits(synthetic_dir[0], WINDOW, optimize=False)
    out = run_logits(folded, WINDOW, tmp_path / "folded", optimize=False)
    assert rel_err(ref, out) < 1e-6  # power-of-two scales: every product x·w is bit-for-bit the same
    assert all(read_dq_weight(n.inputs[1]) is None for n in folded.graph if linear_info(n) is not None)


def test_every_linear_output_error_below_rtn(models, synthetic_dir, synthetic_text: Path) -> None:
    float_model, _, _, awq, ctx, rtn = models
    tokens = tokenize(synthetic_dir[0], read_text(synthetic_text))
    windows = make_windows(tokens[len(tokens) // 2 :], 64, 64 * 4).ids
    ref = linear_outputs(float_model, windows)
    err_rtn = output_mse(ref, linear_outputs(rtn, windows))
    # v_proj / up_proj outputs carry 1/s of the o/down scales folded into them: compare in original units
    unscale = {linear_info(n).key: 1.0 / np.asarray(n.meta.get(OUTPUT_SCALE_KEY, 1.0)) for n in awq.graph
               if linear_info(n) is not None}
    assert sorted(k for k, u in unscale.items() if np.ndim(u)) == [f"layers.{i}.{r}" for i in range(2)
                                                                  for r in ("up_proj", "v_proj")]
    err_awq = output_mse(ref, {k: v * unscale[k] for k, v in linear_outputs(awq, windows).items()})
    assert len(err_awq) == 14
    worse = {k: (err_awq[k], err_rtn[k]) for k in err_awq if not err_awq[k] < err_rtn[k]}
    assert not worse, f"AWQ output error not below RTN's for {worse}"
    for node in awq.graph:
        info = linear_info(node)
        if info is not None and info.role != Role.LM_HEAD:
            dq = read_dq_weight(node.inputs[1])
            assert dq is not None and dq.group_size == 32 and dq.bits == 4
    assert ctx.report["weights"]["layers.1.down_proj"] == "awq int4 asym g32"


def test_awq_scales_formula() -> None:
    s = awq_scales(np.array([1.0, 4.0, 16.0]), 0.5)
    np.testing.assert_allclose(s, [0.5, 1.0, 2.0], rtol=1e-6)


def test_gptq_damping_reaches_the_rounding(synthetic_dir, synthetic_text: Path) -> None:
    """awq{gptq=true,damp=...}: GPTQ's damping is the option's (a large one moves the codes towards RTN's)."""
    from qcompiler.passes.awq import AWQConfig

    with pytest.raises(ValueError, match="damp must be in"):
        AWQConfig(damp=0.0)
    folder, _ = synthetic_dir
    codes = {}
    for damp in (0.01, 0.9):
        model, _ = run_passes(load_model(folder / "model.onnx"), [Canonicalize(), AWQ(make_config(
            AWQ, {"group_size": 32, "grid": 4, "gptq": True, "damp": damp}), calib_context(folder, synthetic_text))])
        codes[damp] = {linear_info(n).key: read_dq_weight(n.inputs[1]).q for n in model.graph
                       if linear_info(n) is not None and linear_info(n).role != Role.LM_HEAD}
    assert any(not np.array_equal(codes[0.01][k], codes[0.9][k]) for k in codes[0.01])
