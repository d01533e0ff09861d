"""mixed-decompose (LLM.int8): finds the outlier dims, is exact before rounding, beats plain per-token int8."""

from __future__ import annotations

import numpy as np
import pytest
from qcompiler.passes.mixed_decompose import MixedDecomposeConfig, select_outliers

from qcompiler.errors import QCError
from qcompiler.irutil import op_types
from qcompiler.ops.emit import match_outlier_split
from qcompiler.pipeline import parse_pipeline
from qcompiler.quant.w8a8 import match_w8a8
from qcompiler.spec import linear_info
from tests.helpers import WINDOW, run_logits
from tests.passes.w8a8_util import compile_model, l2_rel, shared_calibrator


@pytest.fixture(scope="module")
def calib(tmp_path_factory, synthetic_dir, synthetic_text):
    return shared_calibrator(tmp_path_factory, synthetic_dir[0], synthetic_text)


def test_float_decomposition_is_exact(synthetic_dir, calib, tmp_path) -> None:
    folder, truth = synthetic_dir
    model, ctx = compile_model(folder, "canonicalize,mixed-decompose{quantize=false}", calib)
    assert l2_rel(run_logits(folder, WINDOW), run_logits(model, WINDOW, tmp_path)) < 1e-5
    inputs = ctx.report["mixed-decompose"]["inputs"]
    for layer in range(2):  # the injected outlier dims (|x| ≥ 6 in every layer) go to float in norm-fed inputs
        for kind in ("qkv", "gate_up"):
            assert inputs[f"layers.{layer}.{kind}"]["outlier_dims"] == sorted(truth.outlier_dims)


def test_quantized_form_and_accuracy(synthetic_dir, calib, tmp_path) -> None:
    folder, truth = synthetic_dir
    model, _ = compile_model(folder, "canonicalize,mixed-decompose", calib)
    splits = [m for n in model.graph if n.op_type == "Add" and (m := match_outlier_split(n)) is not None]
    assert len(splits) >= 10  # q/k/v and gate/up of both layers at least
    for m in splits:
        if m.outlier_idx.tolist() == sorted(truth.outlier_dims):
            assert not m.int8.w_q[m.outlier_idx].any()  # outlier rows live in the float side only
    plain = sum(1 for n in model.graph if linear_info(n) and match_w8a8(n) is not None
                and not any(u.node.op_type == "Add" and match_outlier_split(u.node) for u in n.outputs[0].uses()))
    assert len(splits) + plain == 14
    ref = run_logits(folder, WINDOW)
    per_token, _ = compile_model(folder, "canonicalize,insert-qdq", calib)
    e_mix = l2_rel(ref, run_logits(model, WINDOW, tmp_path / "mix"))
    e_tok = l2_rel(ref, run_logits(per_token, WINDOW, tmp_path / "tok"))
    assert e_mix < 0.7 * e_tok, (e_mix, e_tok)
    # the CPU lowering turns each int8 part into MatMulIntegerToFloat and the result still runs
    lowered, _ = compile_model(folder, "canonicalize,mixed-decompose,lower-w8a8-cpu", calib)
    assert op_types(lowered)["com.microsoft.MatMulIntegerToFloat"] == 14
    assert l2_rel(run_logits(model, WINDOW, tmp_path / "a"), run_logits(lowered, WINDOW, tmp_path / "b")) < 1e-2


def test_selection_rules() -> None:
    cfg = MixedDecomposeConfig(min_tokens=0.06, min_layers=0.5, max_fraction=0.5)
    f = {f"l{i}": np.zeros(8) for i in range(4)}
    f["l0"][[1, 2]] = 0.5  # dim 1 in layers 0 and 1 (2 of 4 layers), dim 2 only in layer 0
    f["l1"][1] = 0.07
    f["o0"] = np.array([0.0, 0.9, 0.0, 0.05, 0, 0, 0, 0])  # not residual stream: its own candidates
    layers = {"l0": 0, "l1": 1, "l2": 2, "l3": 3, "o0": 0}
    out = select_outliers(f, {"l0", "l1", "l2", "l3"}, layers, cfg)
    assert all(out[f"l{i}"].tolist() == [1] for i in range(4))
    assert out["o0"].tolist() == [1]
    capped = select_outliers({"o0": np.linspace(1.0, 0.3, 8)}, set(), {"o0": 0},
                             MixedDecomposeConfig(max_fraction=0.25))
    assert capped["o0"].tolist() == [0, 1]  # at most 25% of K, the most frequent first


def test_bad_options() -> None:
    with pytest.raises(QCError, match=r"min_tokens must be in \[0, 1\]"):
        parse_pipeline("mixed-decompose{min_tokens=6}")
    with pytest.raises(QCError, match="threshold must be positive"):
        parse_pipeline("mixed-decompose{threshold=0}")


def test_missing_statistics_name_the_value(synthetic_dir) -> None:
    from qcompiler.errors import CalibrationError
    from qcompiler.irutil import load_model
    from qcompiler.pipeline import PassContext, parse_pipeline, run_passes
    from tests.passes.w8a8_util import NoStatistics

    folder, _ = synthetic_dir
    with pytest.raises(CalibrationError, match=r"mixed-decompose: layers\.0\.\w+: statistics missing for value '[^']+': no '"):
        run_passes(load_model(folder / "model.onnx"),
                   parse_pipeline("canonicalize,mixed-decompose", PassContext(calibrate=NoStatistics())))
