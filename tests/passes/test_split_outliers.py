"""split-outliers: exact in float, within its channel budget, and it shrinks the quantization ranges."""

from __future__ import annotations

import numpy as np
import pytest
from qcompiler.passes.split_outliers import pick_activation_levels, pick_weight_rows, split_cost

from qcompiler.errors import QCError
from qcompiler.quant.smoothing import quantize_per_channel_int8
from qcompiler.spec import linear_info
from tests.helpers import WINDOW, run_logits
from tests.passes.w8a8_util import compile_model, l2_rel, shared_calibrator


@pytest.fixture(scope="module")
def calib(tmp_path_factory, synthetic_dir, synthetic_text):
    return shared_calibrator(tmp_path_factory, synthetic_dir[0], synthetic_text)


@pytest.mark.parametrize("mode", ["both", "act", "weight"])
def test_float_model_unchanged_within_budget(synthetic_dir, calib, tmp_path, mode) -> None:
    folder, truth = synthetic_dir
    model, ctx = compile_model(folder, f"canonicalize,split-outliers{{budget=0.05,mode={mode}}}", calib)
    assert l2_rel(run_logits(folder, WINDOW), run_logits(model, WINDOW, tmp_path)) < 1e-5
    rep = ctx.report["split-outliers"]
    assert rep["extra_channels"] > 0
    for key, g in rep["groups"].items():
        k = g["channels"] - g["extra"]
        assert g["extra"] == split_cost(np.array(g["act_levels"])) + len(g["weight_channels"]), key
        assert g["extra"] <= int(0.05 * k), key
        assert not set(g["act_channels"]) & set(g["weight_channels"])
        if mode == "weight":
            assert not g["act_channels"]
        if g["act_channels"]:
            assert g["range_after"] < g["range_before"]
    if mode != "weight":  # the injected outlier dims are the ones split in the norm-fed inputs
        assert set(truth.outlier_dims) <= set(rep["groups"]["layers.0.qkv"]["act_channels"])
    # each split linear reads the widened input and has the extra weight rows
    nodes = {linear_info(n).key: n for n in model.graph if linear_info(n) is not None}
    for g in rep["groups"].values():
        for key in g["linears"]:
            assert nodes[key].inputs[0].producer().op_type == "Concat"
            assert nodes[key].inputs[1].const_value.shape[0] == g["channels"]


def test_after_smoothing_and_static_w8a8(synthetic_dir, calib, tmp_path) -> None:
    """smooth-scale → split-outliers is still exact; static W8A8 on top gets closer to float than without the split."""
    folder, _ = synthetic_dir
    ref = run_logits(folder, WINDOW)
    split, _ = compile_model(folder, "canonicalize,smooth-scale{act=static},split-outliers", calib)
    assert l2_rel(ref, run_logits(split, WINDOW, tmp_path / "f")) < 1e-5
    plain, _ = compile_model(folder, "canonicalize,insert-qdq{act=static}", calib)
    with_split, _ = compile_model(folder, "canonicalize,split-outliers{budget=0.1},insert-qdq{act=static}", calib)
    e_plain = l2_rel(ref, run_logits(plain, WINDOW, tmp_path / "p"))
    e_split = l2_rel(ref, run_logits(with_split, WINDOW, tmp_path / "s"))
    assert e_split < e_plain, (e_plain, e_split)


def test_picking_channels() -> None:
    a = np.array([1.0, 9.0, 2.0, 6.0, 4.0, 5.0])
    # greedy halving of the channel that sets the range: 9 → 6 → 5 → 4.5 costs 1 + 1 + 1 channels
    np.testing.assert_array_equal(pick_activation_levels(a, budget=4), [0, 1, 0, 1, 0, 1])
    np.testing.assert_array_equal(pick_activation_levels(a, budget=1), [0, 1, 0, 0, 0, 0])  # range 9 → 6
    assert not pick_activation_levels(a, budget=1, min_gain=2.0).any()  # 9 → 6 is not worth it
    # one dominant channel is split again: 4 copies of x/4 (3 extra channels) bring 40 → 10
    big = np.array([40.0, 10.0, 9.0, 1.0])
    lv = pick_activation_levels(big, budget=3)
    np.testing.assert_array_equal(lv, [2, 0, 0, 0])
    assert split_cost(lv) == 3 and (big / 2.0**lv).max() == 10.0
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    w[5] *= 8.0  # an outlier row sets every column's scale
    rows = pick_weight_rows(w, budget=3, exclude=np.array([], np.int64))
    assert rows[0] == 5 and len(set(rows.tolist())) == len(rows)
    assert 5 not in pick_weight_rows(w, budget=3, exclude=np.array([5]))
    # halving and duplicating row 5 lowers the per-channel quantization error of X·W
    x = rng.standard_normal((256, 64)).astype(np.float32)
    w_split = np.concatenate([np.where(np.arange(64)[:, None] == 5, w / 2, w), w[5:6] / 2])
    x_split = np.concatenate([x, x[:, 5:6]], axis=1)
    np.testing.assert_allclose(x_split @ w_split, x @ w, rtol=1e-4, atol=1e-4)
    err = np.linalg.norm(x @ quantize_per_channel_int8(w) - x @ w)
    err_split = np.linalg.norm(x_split @ quantize_per_channel_int8(w_split) - x @ w)
    assert err_split < 0.7 * err


def test_bad_options() -> None:
    from qcompiler.pipeline import parse_pipeline

    with pytest.raises(QCError, match=r"budget must be in \(0, 1\]"):
        parse_pipeline("split-outliers{budget=0}")
    with pytest.raises(QCError, match="mode must be act, weight or both"):
        parse_pipeline("split-outliers{mode=all}")


def test_missing_statistics_name_the_value(synthetic_dir) -> None:
    from qcompiler.errors import CalibrationError
    from qcompiler.irutil import load_model
    from qcompiler.pipeline import PassContext, parse_pipeline, run_passes
    from tests.passes.w8a8_util import NoStatistics

    folder, _ = synthetic_dir
    with pytest.raises(CalibrationError, match=r"split-outliers: layers\.0\.\w+: statistics missing for value '[^']+': no '"):
        run_passes(load_model(folder / "model.onnx"),
                   parse_pipeline("canonicalize,split-outliers", PassContext(calibrate=NoStatistics())))
