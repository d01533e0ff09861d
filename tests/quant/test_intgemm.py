"""Integer GEMMs exact on every CPU: weight encoding, the graph invariant, int64 references, the probe.

Nothing here depends on the test machine's ISA except the probe's check of full-range u8×s8,
which is asserted to agree with the CPU's own features either way.
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from qcompiler.passes.fold_zero_point import FoldZeroPoint
from qcompiler.passes.lower_w8a8_cpu import LowerW8A8Cpu

from qcompiler.cli import main
from qcompiler.cpuprobe import CpuInfo, cpu_info, probe_reference
from qcompiler.errors import QCError
from qcompiler.irutil import add_initializer, load_model
from qcompiler.pipeline import PassContext, make_config, parse_pipeline, run_passes
from qcompiler.quant.intgemm import encode_weight, integer_gemms, pair_sum_safe, unsafe_integer_gemms
from qcompiler.quant.numerics import quantize_weight
from qcompiler.quant.w8a8 import (
    PER_TOKEN_EPS,
    emit_int8_weight,
    emit_per_token_activation,
    emit_static_activation,
)
from qcompiler.quantize import build_pipeline_text, make_context, quantize
from qcompiler.recipes import QuantizeOptions
from qcompiler.spec import Granularity, QuantSpec
from tests.helpers import WINDOW, rel_err, run_logits

W8 = QuantSpec(bits=8, symmetric=True, granularity=Granularity.CHANNEL)
K, N = 512, 24


def test_encode_weight_shifts_to_uint8_exactly() -> None:
    w = np.array([[-128, -127, 0], [1, 63, 127]], np.int8)
    stored, zero = encode_weight(w)
    assert stored.dtype == np.uint8 and zero is not None and zero.dtype == np.uint8 and int(zero) == 128
    np.testing.assert_array_equal(stored.astype(np.int64) - 128, w.astype(np.int64))
    stored, zero = encode_weight(w, "vnni")
    assert stored.dtype == np.int8 and zero is None
    with pytest.raises(ValueError, match="cpu_isa"):
        encode_weight(w, "avx2")


@pytest.mark.parametrize(("a", "b", "safe"), [
    ((0, 255), (-64, 63), True),      # 2·255·64 = 32640
    ((0, 255), (-65, 63), False),     # 2·255·65 = 33150
    ((0, 255), (-63, 65), False),     # 2·255·65 = 33150
    ((0, 255), (-128, 127), False),
    ((0, 127), (-128, 127), True),    # 2·127·128 = 32512
])
def test_pair_sum_safe(a, b, safe) -> None:
    assert pair_sum_safe(a, b) == safe


# ----------------------------------------------------------------------------- every emitted form vs int64


def _linear(w: np.ndarray, act: str, dtype: str = "uint8", zp: int = 0, scale: float = 0.05) -> ir.Model:
    x = ir.Value(name="x", shape=ir.Shape([3, K]), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x], [], nodes=[], name="linear", opset_imports={"": 21})
    mm = ir.node("MatMul", [x, add_initializer(graph, "w", w)], name="linear_MatMul")
    graph.append(mm)
    mm.outputs[0].name = "y"
    mm.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    graph.outputs.append(mm.outputs[0])
    qw = quantize_weight(w, W8)
    emit_int8_weight(graph, mm, qw.q, qw.scale.reshape(-1), "w")
    if act == "static":
        emit_static_activation(graph, mm, scale, zp, dtype, "x")
    else:
        emit_per_token_activation(graph, mm, "x")
    return ir.Model(graph, ir_version=10)


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()  # all of ORT's optimizations: what a deployment runs
    proto = ir.serde.serialize_model(model)
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _worst_case() -> tuple[np.ndarray, np.ndarray]:
    """Weights whose int8 codes are ±127 and activations that hit the ends of the integer range."""
    w = np.where(np.indices((K, N)).sum(axis=0) % 3 == 0, -1.0, 1.0).astype(np.float32)
    x = np.stack([np.full(K, 1e3), np.full(K, -1e3), np.tile([1e3, -1e3], K // 2)]).astype(np.float32)
    return w, x


@pytest.mark.parametrize(("form", "act", "dtype", "zp"), [
    ("lower-w8a8-cpu", "per-token", "int8", 0),
    ("lower-w8a8-cpu", "static", "uint8", 97),
    ("lower-w8a8-cpu", "static", "int8", -20),
    ("fold-zero-point msft", "static", "uint8", 97),
    ("fold-zero-point msft", "static", "int8", 0),
    ("fold-zero-point onnx", "static", "uint8", 3),
    ("fold-zero-point onnx", "static", "int8", -20),
])
@pytest.mark.parametrize("data", ["worst-case", "random"])
def test_emitted_form_equals_int64_reference(form: str, act: str, dtype: str, zp: int, data: str) -> None:
    rng = np.random.default_rng(0)
    w, x = _worst_case() if data == "worst-case" else (
        rng.standard_normal((K, N)).astype(np.float32), (rng.standard_normal((3, K)) * 4).astype(np.float32))
    model = _linear(w, act, dtype, zp)
    qw = quantize_weight(w, W8)
    if form == "lower-w8a8-cpu":
        LowerW8A8Cpu(None, PassContext())(model)
    else:
        FoldZeroPoint(make_config(FoldZeroPoint, {"form": form.split()[1]}), PassContext())(model)
    gemms = integer_gemms(model)
    assert gemms and all(g.safe and g.form == "u8×u8" for g in gemms), gemms
    y = _run(model, x).astype(np.float64)
    # int64 reference of the same quantization
    if act == "per-token":
        s = np.maximum(np.abs(x).max(axis=1, keepdims=True), PER_TOKEN_EPS) / np.float32(127.0)
        q = np.clip(np.rint(x / s.astype(np.float32)), -127, 127).astype(np.int64)
        ref = (q @ qw.q.astype(np.int64)) * s.astype(np.float64) * qw.scale.reshape(-1).astype(np.float64)
    else:
        lo, hi = (-128, 127) if dtype == "int8" else (0, 255)
        q = np.clip(np.rint(x / np.float32(0.05)) + zp, lo, hi).astype(np.int64) - zp
        ref = (q @ qw.q.astype(np.int64)) * 0.05 * qw.scale.reshape(-1).astype(np.float64)
    np.testing.assert_allclose(y, ref, rtol=2e-6, atol=2e-6 * np.abs(ref).max())


# ----------------------------------------------------------------------------- the invariant, every recipe


RECIPES = ["w8a8-static", "w8a8-dynamic", "w8a8-smooth", "w8a8-static-smooth", "w8a8-int8mix"]


@pytest.mark.parametrize("target", ["cpu", "npu"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_no_saturating_gemm_is_emitted(recipe, target, synthetic_nokv_dir, synthetic_text, tmp_path,
                                       monkeypatch) -> None:
    monkeypatch.setenv("QC_CALIB_CACHE", str(tmp_path / "calib"))
    folder, _ = synthetic_nokv_dir
    opts = QuantizeOptions(calib=str(synthetic_text), calib_samples=4, seq_len=64, target=target)
    summary = quantize(folder, tmp_path / "out", recipe=recipe, options=opts)
    model = load_model(tmp_path / "out" / "model.onnx")
    gemms = integer_gemms(model)
    assert unsafe_integer_gemms(model) == []
    assert summary["options"]["cpu_isa"] == "any"
    assert sum(summary["integer_gemms"].values()) == len(gemms)
    if target == "cpu":
        assert gemms and {g.form for g in gemms} == {"u8×u8"}
    elif recipe in ("w8a8-static", "w8a8-static-smooth"):  # ORT fuses the QDQ MatMuls: 7-bit weights
        assert gemms and all(g.op == "QDQ MatMul" and g.b_range[0] >= -64 and g.b_range[1] <= 63 for g in gemms)
    # what ORT's integer kernels compute equals the portable QDQ form run in float (ORT_DISABLE_ALL):
    # on AVX2 CPUs without VNNI, u8×s8 GEMMs broke this (w8a8-dynamic: 37.5% top-1 on a tiny Llama)
    if target == "cpu":
        ctx = make_context(folder, opts)
        text = build_pipeline_text(recipe, None, opts, lower=False)
        portable, _ = run_passes(load_model(folder / "model.onnx"), parse_pipeline(text, ctx))
        ref = run_logits(portable, WINDOW, tmp_path / "portable", optimize=False)
    else:
        ref = run_logits(tmp_path / "out", WINDOW, optimize=False)
    out = run_logits(tmp_path / "out", WINDOW)
    # (float fusions move a few values across a rounding boundary: ~4e-3; saturation gave 1.17)
    assert rel_err(ref, out) < 1e-2 and (out.argmax(-1) == ref.argmax(-1)).mean() >= 0.95


def test_vnni_is_explicit_and_recorded(synthetic_nokv_dir, tmp_path) -> None:
    folder, _ = synthetic_nokv_dir
    summary = quantize(folder, tmp_path / "v", recipe="w8a8-dynamic", options=QuantizeOptions(cpu_isa="vnni"))
    assert summary["options"]["cpu_isa"] == "vnni"
    assert summary["integer_gemms"] == {"MatMulIntegerToFloat u8×s8 (VNNI/AMX/ARM CPUs only)": 8}  # q/k/v and gate/up packed
    assert len(unsafe_integer_gemms(load_model(tmp_path / "v" / "model.onnx"))) == 8
    # a pipeline that lowers to u8×s8 without the user declaring VNNI is refused, nothing written
    with pytest.raises(QCError, match=r"saturate int16 on x86 CPUs without VNNI.*--cpu-isa vnni"):
        quantize(folder, tmp_path / "bad", passes="canonicalize,insert-qdq,lower-w8a8-cpu{cpu_isa=vnni}")
    assert not (tmp_path / "bad").exists()
    with pytest.raises(QCError, match="cpu-isa"):
        QuantizeOptions(cpu_isa="avx2")


# ----------------------------------------------------------------------------- CPU report and probe


@pytest.mark.parametrize(("flags", "arch", "vnni"), [
    ("fpu sse2 avx avx2 fma f16c", "x86_64", False),
    ("avx2 avx512f avx512bw", "x86_64", False),          # AVX-512 without VNNI saturates too
    ("avx2 avx512f avx512bw avx512_vnni", "x86_64", True),
    ("avx2 avx_vnni", "x86_64", True),
    ("fp asimd asimddp", "aarch64", True),
])
def test_cpu_info_parses_features(flags, arch, vnni, tmp_path, monkeypatch) -> None:
    f = tmp_path / "cpuinfo"
    key = "Features" if arch == "aarch64" else "flags"
    f.write_text(f"processor\t: 0\nmodel name\t: Test CPU\n{key}\t\t: {flags}\n")
    monkeypatch.setattr("platform.machine", lambda: arch)
    info = cpu_info.__wrapped__(str(f))
    assert isinstance(info, CpuInfo) and info.vnni == vnni and info.model == "Test CPU"
    assert ("saturate" in info.describe()) != vnni


def test_probe_matches_this_cpu() -> None:
    results = {r.form: r for r in probe_reference()}
    assert results["MatMulIntegerToFloat u8×u8 weights [0, 255]"].exact
    assert results["MatMulIntegerToFloat u8×s8 weights [-64, 63]"].exact
    full = results["MatMulIntegerToFloat u8×s8 weights [-128, 127]"]
    # exact where MLAS accumulates u8×s8 in int32 (VNNI, AMX, ARM), wrong on AVX2/AVX-512 without VNNI
    assert full.exact == cpu_info().vnni, full.describe()


def test_qc_check_reports_isa_and_probe(synthetic_nokv_dir, tmp_path, capsys) -> None:
    folder, _ = synthetic_nokv_dir
    quantize(folder, tmp_path / "w8", recipe="w8a8-dynamic")
    assert main(["check", str(tmp_path / "w8"), "--target", "cpu", "--strict"]) == 0
    out = capsys.readouterr().out
    assert "cpu: " in out and "probe: MatMulIntegerToFloat u8×u8 weights" in out and "exact" in out
    # a u8×s8 model that does not declare VNNI (e.g. an older qcompiler or another tool's) is flagged
    quantize(folder, tmp_path / "v", recipe="w8a8-dynamic", options=QuantizeOptions(cpu_isa="vnni"))
    q = tmp_path / "v" / "quantization.json"
    meta = json.loads(q.read_text())
    meta["options"].pop("cpu_isa")
    q.write_text(json.dumps(meta))
    assert main(["check", str(tmp_path / "v"), "--target", "cpu", "--strict"]) == 1
    assert "8 integer GEMM(s) saturate int16 on x86 CPUs without VNNI" in capsys.readouterr().out


def test_eval_no_optimize_runs_the_npu_graph_as_written(synthetic_nokv_dir, synthetic_text, tmp_path, capsys,
                                                        monkeypatch) -> None:
    """``qc eval --no-optimize`` scores the QDQ graph as written (an NPU's semantics); with 7-bit weights
    ONNX Runtime's fused CPU execution of the same graph agrees with it on any CPU."""
    from qcompiler.eval import evaluate

    monkeypatch.setenv("QC_CALIB_CACHE", str(tmp_path / "calib"))
    folder, _ = synthetic_nokv_dir
    opts = QuantizeOptions(calib=str(synthetic_text), calib_samples=4, seq_len=64, target="npu")
    quantize(folder, tmp_path / "npu", recipe="w8a8-static-smooth", options=opts)
    args = ["--text", str(synthetic_text), "--max-tokens", "256", "--seq-len", "64"]
    assert main(["eval", str(tmp_path / "npu"), *args, "--no-optimize"]) == 0
    as_written = json.loads(capsys.readouterr().out)["perplexity"]
    same = evaluate(tmp_path / "npu", synthetic_text, seq_len=64, max_tokens=256, optimize=False, progress=False)
    fused = evaluate(tmp_path / "npu", synthetic_text, seq_len=64, max_tokens=256, progress=False)
    assert as_written == pytest.approx(same.perplexity, rel=1e-9)
    assert fused.perplexity == pytest.approx(as_written, rel=1e-2)
