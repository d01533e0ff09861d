"""lower-npu: standard-domain opset-21 QDQ, symmetric int8/int4 weights, static shapes, onnx.checker full."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qcompiler.errors import QCError, UnsupportedModelError
from qcompiler.irutil import load_model, save_model
from qcompiler.pipeline import PassContext, parse_pipeline, run_passes
from qcompiler.quant.emit import read_dq_weight
from qcompiler.quant.intgemm import unsafe_integer_gemms
from qcompiler.quant.numerics import dequantize
from qcompiler.runtime import DecoderRunner, make_session
from qcompiler.spec import linear_info
from tests.helpers import WINDOW, rel_err, run_logits
from tests.ops.helpers import apply_w8a8


def quantized(folder: Path, pipeline: str, ctx: PassContext | None = None) -> ir.Model:
    model = load_model(folder / "model.onnx")
    model, _ = run_passes(model, parse_pipeline(pipeline, ctx or PassContext()))
    return model


def dq_weights(model: ir.Model) -> dict[str, object]:
    return {linear_info(n).key: read_dq_weight(n.inputs[1]) for n in model.graph
            if n.op_type == "MatMul" and linear_info(n) is not None and read_dq_weight(n.inputs[1]) is not None}


def assert_npu_clean(model: ir.Model, tmp: Path) -> None:
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.all_nodes())
    assert model.opset_imports[""] == 21 and set(model.opset_imports) <= {"", "ai.onnx"}
    for dq in dq_weights(model).values():
        assert dq.symmetric and dq.zero_point is None and dq.bits in (4, 8)
        assert dq.bits == 4 or dq.group_size == dq.q.shape[0]  # int8: per channel
    tmp.mkdir(parents=True, exist_ok=True)
    save_model(model, tmp / "model.onnx")
    onnx.checker.check_model(str(tmp / "model.onnx"), full_check=True)


@pytest.mark.parametrize("weights", ["bits=4,group_size=16,sym=true", "bits=8,group_size=0,sym=true"])
def test_conforming_weights_are_kept(synthetic_dir, tmp_path: Path, weights: str) -> None:
    folder, _ = synthetic_dir
    base = f"canonicalize,quantize-weights{{{weights}}}"
    before = quantized(folder, base)
    ctx = PassContext()
    after = quantized(folder, f"{base},lower-npu", ctx)
    for key, dq in dq_weights(after).items():
        np.testing.assert_array_equal(dq.q, dq_weights(before)[key].q)
    report = ctx.report["lower-npu"]
    assert report["checker"] == "passed (full_check)" and sum(report["weights"].values()) == 14
    assert_npu_clean(after, tmp_path / "npu")
    assert rel_err(run_logits(before, WINDOW, tmp_path / "a"), run_logits(after, WINDOW, tmp_path / "b")) < 1e-6


@pytest.mark.parametrize("weights,bits,block", [("bits=4,group_size=32,sym=false", 4, 32),
                                                ("bits=8,group_size=64,sym=false", 8, 0),
                                                ("bits=8,group_size=32,sym=true", 8, 0)])
def test_nonconforming_weights_are_requantized(synthetic_dir, tmp_path: Path, weights: str, bits: int,
                                               block: int) -> None:
    folder, _ = synthetic_dir
    base = f"canonicalize,quantize-weights{{{weights}}}"
    before = dq_weights(quantized(folder, base))
    after_model = quantized(folder, f"{base},lower-npu")
    assert_npu_clean(after_model, tmp_path / "npu")
    after = dq_weights(after_model)
    assert after.keys() == before.keys() and len(after) == 14
    for key, new in after.items():
        old = before[key]
        assert new.bits == bits and new.group_size == (block or new.q.shape[0])
        w_old = dequantize(old.q, old.scale, old.zero_point, old.group_size)
        w_new = dequantize(new.q, new.scale, None, new.group_size)
        if bits == 8:  # min/max range: at most half a step per weight
            half_step = np.repeat(new.scale, new.group_size, axis=0)[: w_old.shape[0]] / 2
            assert np.all(np.abs(w_new - w_old) <= half_step * (1 + 1e-5) + 1e-7), key
        else:  # MSE-clipped int4: no worse than re-quantizing with the min/max range
            from qcompiler.quant.numerics import quantize_rtn
            from qcompiler.spec import Granularity, QuantSpec

            ref = quantize_rtn(w_old, QuantSpec(bits=4, symmetric=True, granularity=Granularity.GROUP,
                                                group_size=block)).dequantize()
            assert np.sum((w_new - w_old) ** 2) <= np.sum((ref - w_old) ** 2) * (1 + 1e-6), key


def test_refuses_to_requantize_when_told(synthetic_dir) -> None:
    folder, _ = synthetic_dir
    with pytest.raises(QCError, match="not symmetric int8 per-channel / int4"):
        quantized(folder, "canonicalize,quantize-weights{bits=4,group_size=32},lower-npu{requantize=false}")


def test_static_shapes(synthetic_nokv_dir, tmp_path: Path) -> None:
    folder, _ = synthetic_nokv_dir
    ctx = PassContext()
    model = quantized(folder, "canonicalize,quantize-weights{bits=4,group_size=16,sym=true},"
                              f"lower-npu{{static_shapes={len(WINDOW)}}}", ctx)
    shapes = {v.name: list(v.shape) for v in model.graph.inputs}
    assert shapes == {n: [1, len(WINDOW)] for n in ("input_ids", "attention_mask", "position_ids")}
    assert list(model.graph.outputs[0].shape) == [1, len(WINDOW), 256]
    report = ctx.report["lower-npu"]["static_shapes"]
    assert report["folded_nodes"] > 0 and report["dynamic_outputs"] == []
    assert not [n for n in model.graph if n.op_type == "Shape"]  # the shape arithmetic is folded away
    assert_npu_clean(model, tmp_path / "npu")
    dynamic = quantized(folder, "canonicalize,quantize-weights{bits=4,group_size=16,sym=true}")
    assert rel_err(run_logits(dynamic, WINDOW, tmp_path / "dyn"), run_logits(tmp_path / "npu", WINDOW)) < 1e-5
    with pytest.raises(Exception, match="Got: 10 Expected: 48"):  # a different length is refused by ORT
        DecoderRunner(make_session(tmp_path / "npu")).logits(WINDOW[:10])


def test_static_shapes_need_a_model_without_kv_cache(synthetic_dir) -> None:
    folder, _ = synthetic_dir
    with pytest.raises(QCError, match=r"without KV cache .*--no-kv-cache"):
        quantized(folder, "canonicalize,quantize-weights{bits=4,group_size=16,sym=true},lower-npu{static_shapes=16}")


def test_non_standard_ops_are_refused(synthetic_dir) -> None:
    folder, _ = synthetic_dir
    with pytest.raises(UnsupportedModelError, match=r"com\.microsoft\.MatMulNBits ×14"):
        quantized(folder, "canonicalize,quantize-weights{bits=4,group_size=16},lower-matmulnbits,lower-npu")


def test_w8a8_portable_forms_are_npu_clean(synthetic_nokv_dir, tmp_path: Path) -> None:
    folder, truth = synthetic_nokv_dir
    for kind, outliers in (("static", ()), ("per-token", truth.outlier_dims)):
        model = load_model(folder / "model.onnx")
        run_passes(model, parse_pipeline("canonicalize"))
        apply_w8a8(model, kind=kind, outliers=outliers)
        ctx = PassContext()
        model, _ = run_passes(model, parse_pipeline(f"lower-npu{{static_shapes={len(WINDOW)}}}", ctx))
        # static QDQ MatMuls are fused by ORT into u8×s8 GEMMs: their weights are narrowed to
        # [-63, 63] so that those are exact on every CPU; per-token ones have no integer GEMM
        expect = "int8 channel → int8 in [-63, 63] (W8A8: exact on every CPU)" if kind == "static" \
            else "int8 channel kept"
        assert ctx.report["lower-npu"]["weights"] == {expect: 14}
        assert unsafe_integer_gemms(model) == []
        assert_npu_clean(model, tmp_path / kind)


def test_w8a8_npu_weights_full_range_only_for_vnni(synthetic_nokv_dir) -> None:
    folder, _ = synthetic_nokv_dir
    model = load_model(folder / "model.onnx")
    run_passes(model, parse_pipeline("canonicalize"))
    apply_w8a8(model, kind="static")
    ctx = PassContext()
    model, _ = run_passes(model, parse_pipeline("lower-npu{cpu_isa=vnni}", ctx))
    assert ctx.report["lower-npu"]["weights"] == {"int8 channel kept": 14}
    unsafe = unsafe_integer_gemms(model)
    assert len(unsafe) == 14 and {g.op for g in unsafe} == {"QDQ MatMul"}
