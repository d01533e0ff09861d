"""smooth-scale folds SmoothQuant scales exactly (norm / v_proj / up_proj / explicit Mul) and helps W8A8."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from qcompiler.models.synthetic import SyntheticConfig, build_llama, write_model_dir
from qcompiler.passes.canonicalize import canonical_summary

from qcompiler.calibrate import StatRequest
from qcompiler.errors import CalibrationError, QCError
from qcompiler.irutil import load_model
from qcompiler.pipeline import PassContext, parse_pipeline, run_passes
from qcompiler.quant.smoothing import loo_ranges, smoothing_scales
from qcompiler.spec import linear_info
from tests.helpers import WINDOW, run_logits
from tests.passes.w8a8_util import compile_model, l2_rel, shared_calibrator


@pytest.fixture(scope="module")
def calib(tmp_path_factory, synthetic_dir, synthetic_text):
    return shared_calibrator(tmp_path_factory, synthetic_dir[0], synthetic_text)


def test_float_model_unchanged_and_folded_where_expected(synthetic_dir, calib, tmp_path) -> None:
    folder, _ = synthetic_dir
    model, ctx = compile_model(folder, "canonicalize,smooth-scale", calib)
    # power-of-two scales (the default): every product x_j·w_j is unchanged, the logits bit-identical
    np.testing.assert_array_equal(run_logits(folder, WINDOW), run_logits(model, WINDOW, tmp_path))
    groups = ctx.report["smooth-scale"]["groups"]
    assert set(groups) == {f"layers.{i}.{g}" for i in range(2) for g in ("qkv", "gate_up", "o_proj", "down_proj")}
    where = {k.split(".")[-1]: v["folded_into"] for k, v in groups.items() if v["alpha"] is not None}
    assert where.get("qkv", "norm") == "norm" and where.get("gate_up", "norm") == "norm"
    assert where.get("o_proj", "v_proj") == "v_proj" and where.get("down_proj", "up_proj") == "up_proj"
    assert not any(n.op_type == "Mul" and n.name.endswith("_smooth_channel_scale_Mul") for n in model.graph)
    for g in groups.values():  # the search never does worse than leaving the group alone
        assert g["error"] <= g["error_none"] + 1e-12
    # the injected outlier channels (γ = 12 on dims 3 and 17) are flattened in every norm-fed group
    qkv = groups["layers.0.qkv"]
    assert qkv["alpha"] is not None and qkv["flatness_after"] < qkv["flatness_before"] / 2


def test_fixed_alpha_formula_and_kv_free_model(synthetic_nokv_dir, synthetic_dir, calib, tmp_path) -> None:
    """A fixed α writes γ/s, s = max|X|^α / max|W|^(1−α), exactly; the KV-free graph folds v → o too."""
    folder, _ = synthetic_dir
    before = load_model(folder / "model.onnx")
    summary = canonical_summary(before)
    norm = summary.norms["layers.0.q_proj"]
    x = summary.linears["layers.0.q_proj"].inputs[0].name
    a = calib(before, [StatRequest(x, ("absmax_channel",))]).get(x, "absmax_channel")
    w = np.concatenate([summary.linears[f"layers.0.{r}_proj"].inputs[1].const_value.numpy() for r in "qkv"], axis=1)
    s = smoothing_scales(a, np.abs(w).max(axis=1), 0.7)
    model, _ = compile_model(folder, "canonicalize,smooth-scale{search=false,alpha=0.7,groups=qkv,pow2=false}", calib)
    gamma = model.graph.initializers[norm.gamma.name].const_value.numpy()
    np.testing.assert_allclose(gamma, norm.gamma.const_value.numpy() / s, rtol=1e-6)
    assert l2_rel(run_logits(folder, WINDOW), run_logits(model, WINDOW, tmp_path / "kv")) < 1e-5
    nokv, _ = synthetic_nokv_dir
    model, ctx = compile_model(nokv, "canonicalize,smooth-scale{search=false,alpha=0.5}", calib)
    assert ctx.report["smooth-scale"]["groups"]["layers.1.o_proj"]["folded_into"] == "v_proj"
    assert l2_rel(run_logits(nokv, WINDOW), run_logits(model, WINDOW, tmp_path / "nokv")) < 1e-5


def test_smoothing_helps_per_token_w8a8(synthetic_dir, calib, tmp_path) -> None:
    folder, _ = synthetic_dir
    ref = run_logits(folder, WINDOW)
    plain, _ = compile_model(folder, "canonicalize,insert-qdq", calib)
    smooth, _ = compile_model(folder, "canonicalize,smooth-scale,insert-qdq", calib)
    e_plain = l2_rel(ref, run_logits(plain, WINDOW, tmp_path / "p"))
    e_smooth = l2_rel(ref, run_logits(smooth, WINDOW, tmp_path / "s"))
    assert e_smooth < 0.8 * e_plain, (e_plain, e_smooth)


def test_shared_norm_weight_gets_a_private_copy(tmp_path, synthetic_text) -> None:
    """An exporter deduplicates equal norm weights: each norm's fold gets its own rescaled γ."""
    cfg = SyntheticConfig(massive_dim=None, super_weight=None, seed=3)
    proto, _ = build_llama(cfg)
    # make layer 0's post-attention norm reuse the input norm's weight
    shared = "/model/layers.0/input_layernorm.weight"
    for node in proto.graph.node:
        if node.op_type == "Mul" and "/model/layers.0/post_attention_layernorm.weight" in node.input:
            node.input[list(node.input).index("/model/layers.0/post_attention_layernorm.weight")] = shared
    kept = [t for t in proto.graph.initializer if t.name != "/model/layers.0/post_attention_layernorm.weight"]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    onnx.checker.check_model(proto)
    folder = write_model_dir(proto, tmp_path / "shared", cfg)
    from tests.passes.w8a8_util import calibrator

    cal = calibrator(folder, synthetic_text, tmp_path / "cache")
    model, ctx = compile_model(folder, "canonicalize,smooth-scale{search=false,alpha=0.5}", cal)
    groups = ctx.report["smooth-scale"]["groups"]
    for key in ("layers.0.qkv", "layers.0.gate_up", "layers.1.qkv"):
        assert groups[key]["folded_into"] == "norm" and groups[key]["norm_form"] == "rmsnorm", groups[key]
    assert not any(n.op_type == "Mul" and "smooth_channel_scale" in (n.name or "") for n in model.graph)
    assert l2_rel(run_logits(folder, WINDOW), run_logits(model, WINDOW, tmp_path / "out")) < 1e-5


def test_bad_options_and_missing_statistics(synthetic_dir) -> None:
    folder, _ = synthetic_dir
    for bad in ("alpha=1.5", "alpha=-0.1", "alpha_max=2"):
        with pytest.raises(QCError, match=r"must be in \[0, 1\]"):
            parse_pipeline(f"smooth-scale{{{bad}}}")
    with pytest.raises(QCError, match="needs calibration data"):
        compile_model(folder, "canonicalize,smooth-scale")

    class Partial:  # statistics for every value but the first
        def __init__(self) -> None:
            self.missing = None

        def __call__(self, model, requests):
            self.missing = requests[0].value
            return self

        def get(self, value, observer):
            if value == self.missing:
                raise CalibrationError(f"no '{observer}' statistics for value '{value}'")
            return np.ones(64, np.float32)

    stub = Partial()
    with pytest.raises(CalibrationError, match=r"smooth-scale: layers\.0\.qkv: no 'absmax_channel' statistics for value"):
        run_passes(load_model(folder / "model.onnx"),
                   parse_pipeline("canonicalize,smooth-scale{search=false}", PassContext(calibrate=stub)))


def test_smoothing_scales_formula() -> None:
    a = np.array([8.0, 1.0, 0.0, 2.0])
    w = np.array([0.5, 2.0, 1.0, 0.0])
    s = smoothing_scales(a, w, 0.5)
    np.testing.assert_allclose(s[:2], [np.sqrt(8 / 0.5), np.sqrt(1 / 2.0)])
    assert s[2] == 1.0 and s[3] == 1.0  # a zero channel on either side is left alone
    np.testing.assert_allclose(smoothing_scales(a[:2], w[:2], 1.0), a[:2])
    p2 = smoothing_scales(a, w, 0.5, pow2=True)
    np.testing.assert_array_equal(np.log2(p2), np.round(np.log2(s)))  # nearest power of two in log scale


def test_linear_annotations_survive(synthetic_dir, calib) -> None:
    folder, _ = synthetic_dir
    model, _ = compile_model(folder, "canonicalize,smooth-scale{search=false}", calib)
    assert sum(linear_info(n) is not None for n in model.graph) == 15


def test_leave_one_window_out_ranges(synthetic_dir, calib) -> None:
    wa = np.array([[1.0, 4.0], [2.0, 1.0], [3.0, 2.0]])  # 3 windows × 2 channels
    s = np.array([1.0, 2.0])
    # window maxima of X/s: 2, 2, 3 → each window's range comes from the others
    np.testing.assert_allclose(loo_ranges(wa, np.array([0, 1, 2, 2]), s), [3, 3, 2, 2])
    folder, _ = synthetic_dir
    _, ctx = compile_model(folder, "canonicalize,smooth-scale{act=static,groups=qkv}", calib)
    assert ctx.report["smooth-scale"]["static_range_estimate"] == "leave-one-window-out"


def test_per_window_channel_absmax_observer(synthetic_dir, calib) -> None:
    folder, _ = synthetic_dir
    model = load_model(folder / "model.onnx")
    x = canonical_summary(model).linears["layers.1.down_proj"].inputs[0].name
    st = calib(model, [StatRequest(x, ("absmax_channel", "absmax_channel_window"))])
    per_window = st.get(x, "absmax_channel_window")
    assert per_window.absmax.shape == (4, 160) and per_window.windows.tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(per_window.absmax.max(axis=0), st.get(x, "absmax_channel"))
