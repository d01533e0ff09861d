"""The w8a8-* recipes end to end (synthetic), and the outlier passes' algebra on the real SmolLM2."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qcompiler.data import read_text, tokenize
from qcompiler.errors import QCError
from qcompiler.irutil import load_model, op_types
from qcompiler.quant.w8a8 import match_w8a8, reference_static_matmul
from qcompiler.quantize import quantize
from qcompiler.recipes import QuantizeOptions, available_recipes
from qcompiler.spec import linear_info
from tests.helpers import WINDOW, run_logits
from tests.passes.w8a8_util import calibrator, compile_model, l2_rel, run_values

RECIPES = ["w8a8-static", "w8a8-dynamic", "w8a8-smooth", "w8a8-static-smooth", "w8a8-int8mix"]


def test_recipes_registered() -> None:
    recipes = available_recipes()
    assert set(RECIPES) <= set(recipes)
    assert not recipes["w8a8-dynamic"].needs_calibration and recipes["w8a8-smooth"].needs_calibration
    o = QuantizeOptions()
    assert "fold-zero-point" in recipes["w8a8-static-smooth"].build(o)
    assert "fold-zero-point" not in recipes["w8a8-static-smooth"].build(QuantizeOptions(target="npu"))
    assert "search=false,alpha=0.7" in recipes["w8a8-smooth"].build(QuantizeOptions(alpha=0.7))
    with pytest.raises(QCError, match=r"alpha must be in \[0, 1\]"):
        from qcompiler.pipeline import parse_pipeline

        parse_pipeline(recipes["w8a8-smooth"].build(QuantizeOptions(alpha=1.5)))


@pytest.mark.parametrize(("recipe", "target"), [(r, "cpu") for r in RECIPES] + [("w8a8-static-smooth", "npu")])
def test_recipe_runs_on_ort_cpu(recipe, target, synthetic_nokv_dir, synthetic_text, tmp_path, monkeypatch) -> None:
    """cpu: explicit integer ops (MatMulIntegerToFloat); npu: the plain QDQ graph, which ORT CPU runs too."""
    monkeypatch.setenv("QC_CALIB_CACHE", str(tmp_path / "calib"))
    folder, _ = synthetic_nokv_dir
    opts = QuantizeOptions(calib=str(synthetic_text), calib_samples=4, seq_len=64, target=target)
    summary = quantize(folder, tmp_path / "out", recipe=recipe, options=opts)
    q = json.loads((tmp_path / "out" / "quantization.json").read_text())
    assert q["recipe"] == recipe and "kept_float" in q["scope"]  # lm_head is listed there with its reason
    assert [k["role"] for k in q["kept_float"] if not k["reason"].startswith("outlier")] == ["lm_head"]
    report = q["report"]
    main = "mixed-decompose" if recipe == "w8a8-int8mix" else "insert-qdq"
    assert "lm_head" in report[main]["float"] and "KV cache" in report[main]["float"]
    if recipe == "w8a8-smooth":
        assert len(report["smooth-scale"]["groups"]) == 8
    if recipe == "w8a8-static-smooth":  # the MLP inputs get online transforms, the attention inputs smoothing
        assert len(report["smooth-scale"]["groups"]) == 4
        assert report["rotate"]["online_down"] == 2 and report["rotate"]["online_in"]["inputs"] == 2
    ops = op_types(load_model(tmp_path / "out" / "model.onnx"))
    if target == "npu":
        assert "fold-zero-point" not in report and ops["QuantizeLinear"] == 8 and ops["DequantizeLinear"] >= 14
        assert not [op for op in ops if "." in op]  # standard ONNX only
    elif recipe == "w8a8-static-smooth":
        assert report["fold-zero-point"]["form"] == "msft"
    if target == "cpu":
        assert ops.get("com.microsoft.MatMulIntegerToFloat", 0) + ops.get("com.microsoft.DynamicQuantizeMatMul", 0) >= 4
    ref = run_logits(folder, WINDOW)
    out = run_logits(tmp_path / "out", WINDOW)
    assert np.isfinite(out).all() and l2_rel(ref, out) < 1.0
    assert summary["pipeline"].startswith("canonicalize")


# ----------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smol_calib(smollm2_kv, calib_text, tmp_path_factory):
    return calibrator(smollm2_kv, calib_text, tmp_path_factory.mktemp("smolcal"), samples=2, seq_len=128)


@pytest.fixture(scope="module")
def smol_ids(smollm2_kv, eval_text):
    return tokenize(smollm2_kv, read_text(eval_text))[:40]


@pytest.mark.slow
def test_smollm2_algebraic_passes_keep_logits(smollm2_kv, smol_calib, smol_ids, tmp_path) -> None:
    """smooth-scale → split-outliers and the float LLM.int8 decomposition leave SmolLM2's logits unchanged."""
    ref = run_logits(smollm2_kv, smol_ids)
    model, ctx = compile_model(smollm2_kv, "canonicalize,smooth-scale{search=false,alpha=0.8},split-outliers",
                               smol_calib)
    assert l2_rel(ref, run_logits(model, smol_ids, tmp_path / "smooth")) < 1e-5
    groups = ctx.report["smooth-scale"]["groups"]
    assert len(groups) == 120  # every scale folded: norms for q/k/v and gate/up, v_proj for o, up_proj for down
    assert {k.rsplit(".", 1)[1]: g["folded_into"] for k, g in groups.items()} == {
        "qkv": "norm", "gate_up": "norm", "o_proj": "v_proj", "down_proj": "up_proj"}
    assert ctx.report["split-outliers"]["extra_channels"] > 0
    del model
    model, ctx = compile_model(smollm2_kv, "canonicalize,mixed-decompose{quantize=false}", smol_calib)
    assert l2_rel(ref, run_logits(model, smol_ids, tmp_path / "mix")) < 1e-5
    assert sum(v["count"] for v in ctx.report["mixed-decompose"]["inputs"].values()) > 0


@pytest.mark.slow
def test_smollm2_fold_zero_point_matches_qdq(smollm2_kv, smol_calib, smol_ids, tmp_path) -> None:
    """Every folded integer GEMM computes the unfolded QDQ semantics on its own input."""
    pipe = "canonicalize,insert-qdq{act=static,dtype=uint8,sym=false,skip=%s}"
    skip = ":".join(f"layers.{i}.{r}" for i in range(2, 30) for r in
                    ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    qdq, _ = compile_model(smollm2_kv, pipe % skip, smol_calib)
    params = {linear_info(n).key: match_w8a8(n) for n in qdq.graph if linear_info(n) and match_w8a8(n)}
    assert len(params) == 14
    del qdq
    model, _ = compile_model(smollm2_kv, pipe % skip + ",fold-zero-point", smol_calib)
    names = {linear_info(n).key: (params[linear_info(n).key].x.name, n.outputs[0].name)
             for n in model.graph if n.op_type == "MatMulIntegerToFloat"}
    assert len(names) == 14
    got = run_values(model, [v for pair in names.values() for v in pair], smol_ids, tmp_path)
    for key, (xn, yn) in names.items():
        p = params[key]
        assert p.x_zero != 0
        ref = reference_static_matmul(got[xn][0], p.x_scale, p.x_zero, p.x_zero_dtype, p.w_q, p.w_scale)
        assert l2_rel(ref, got[yn][0]) < 1e-5, key
