"""Every recipe on fp16 and bf16 graphs: emitted nodes follow the graph's float type.

The seeded synthetic llama (``models/synthetic.py``) is converted to fp16 / bf16
(``models/half.py``).  fp16, target cpu: every recipe's output loads in ONNX Runtime CPU
(graph resolution is its type check), every emitted scale / smoothing vector / folded norm
weight is fp16 (the integer kernels' own float32 scales excepted), and the logits equal the
same recipe's on the float32 model within fp16 rounding.  bf16 (no bf16 MatMul on CPU):
``--target cuda`` and ``--target npu`` outputs pass ONNX's checker and strict type inference
where the ops are standard, and ONNX Runtime's graph resolution otherwise, where the only
allowed refusal is a missing CPU kernel, never a type error.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from qcompiler.models.half import to_float_type
from qcompiler.models.synthetic import SyntheticConfig, build_llama, write_model_dir

from qcompiler.irutil import load_model
from qcompiler.quantize import quantize
from qcompiler.recipes import QuantizeOptions
from tests.helpers import WINDOW, run_logits

CFG = SyntheticConfig(kv_cache=False)
RECIPES = ["w4a16-rtn", "w4a16-hqq", "w4a16-awq", "w4a16-gptq", "w8a16-rtn", "w8a8-dynamic", "w8a8-smooth",
           "w8a8-int8mix", "w8a8-static", "w8a8-static-smooth", "mixed"]
CALIBRATED = {"w4a16-awq", "w4a16-gptq", "w8a8-smooth", "w8a8-int8mix", "w8a8-static", "w8a8-static-smooth", "mixed"}
#: inputs the integer kernels take in float32 whatever the graph's type (ORT CPU has no other)
FLOAT32_SLOTS = {("MatMulIntegerToFloat", 2), ("MatMulIntegerToFloat", 3), ("MatMulIntegerToFloat", 6),
                 ("W8A8MatMul", 2), ("W8A8MatMul", 3),  # qcompiler's op: b_scale, bias float32 (qcompiler/ops)
                 ("W8A8OutlierMatMul", 2), ("W8A8OutlierMatMul", 4), ("W8A8OutlierMatMul", 5)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    proto, _ = build_llama(CFG)
    root = tmp_path_factory.mktemp("half")
    out = {"fp32": write_model_dir(proto, root / "fp32", CFG)}
    for name, dt in (("fp16", ir.DataType.FLOAT16), ("bf16", ir.DataType.BFLOAT16)):
        out[name] = write_model_dir(to_float_type(proto, dt), root / name, CFG)
    return out


def _options(recipe: str, text: Path, **kw) -> QuantizeOptions:
    extra = {"budget": 5.0} if recipe == "mixed" else {}
    calib = {"calib": str(text), "calib_samples": 4, "seq_len": 64} if recipe in CALIBRATED else {}
    return QuantizeOptions(group_size=32, **calib, **extra, **kw)


def _float_types(folder: Path) -> list[tuple[str, int, str]]:
    """(op, input slot, type) of every float constant a node reads (initializers), except the nodes
    keep-fp32 kept in float32 (the synthetic fp16 model's norm statistics: 800² passes 65504)."""
    m = load_model(folder / "model.onnx")
    report = json.loads((folder / "quantization.json").read_text())["report"].get("keep-fp32", {})
    kept = {n for island in report.get("islands", []) for n in island["nodes"]}
    out = []
    for node in m.graph:
        if node.name in kept:
            continue
        for i, v in enumerate(node.inputs):
            if v is not None and v.const_value is not None and v.dtype is not None and v.dtype.is_floating_point():
                out.append((node.op_type, i, v.dtype.name))
    return out


@pytest.mark.parametrize("recipe", RECIPES)
def test_fp16_recipe_types_and_numerics(recipe, folders, synthetic_text, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("QC_CALIB_CACHE", str(tmp_path / "calib"))
    opts = _options(recipe, synthetic_text)
    q16 = tmp_path / "q16"
    quantize(folders["fp16"], q16, recipe=recipe, options=opts)
    quantize(folders["fp32"], tmp_path / "q32", recipe=recipe, options=opts)
    wrong = [(op, i, t) for op, i, t in _float_types(q16) if t != "FLOAT16" and (op, i) not in FLOAT32_SLOTS
             and op not in ("Cos", "Sin")]
    assert not wrong, wrong
    got = run_logits(q16, WINDOW)  # ONNX Runtime resolved the graph: its types are consistent
    ref = run_logits(tmp_path / "q32", WINDOW)
    float_ref = run_logits(folders["fp32"], WINDOW)
    assert np.isfinite(got).all()
    # quantizing the fp16 graph is as accurate as quantizing the fp32 one: its error against the
    # float model is the same up to fp16 rounding (and the rounding flips it causes at the grid)
    e16, e32 = l2_rel(float_ref, got), l2_rel(float_ref, ref)
    assert e16 <= 1.3 * e32 + 0.01, (e16, e32)
    assert l2_rel(ref, got) <= 1.5 * e32 + 0.01


def l2_rel(ref: np.ndarray, x: np.ndarray) -> float:
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def _resolves(folder: Path) -> str:
    """'ok', or the missing kernel ONNX Runtime CPU names; a type error fails the test (qcompiler's ops
    resolve through the op library, whose CPU kernels take bf16 too)."""
    so = ort.SessionOptions()
    if any(o.domain == "qcompiler" for o in onnx.load(str(folder / "model.onnx"), load_external_data=False).opset_import):
        from qcompiler.ops import build_library

        so.register_custom_ops_library(str(build_library(cuda=False).cpu_library))
    try:
        ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
        return "ok"
    except Exception as e:  # ORT raises its own Fail/NotImplemented types
        msg = str(e)
        assert "Type Error" not in msg and "type" not in msg.split("Could not find")[0].lower(), msg
        assert "Could not find an implementation" in msg, msg
        return "no CPU kernel"


@pytest.mark.parametrize(("recipe", "target"), [("w4a16-rtn", "cuda"), ("w8a8-smooth", "cuda"),
                                                ("w4a16-rtn", "npu"), ("w8a8-static-smooth", "npu")])
def test_bf16_graphs_type_check(recipe, target, folders, synthetic_text, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("QC_CALIB_CACHE", str(tmp_path / "calib"))
    kw = {"sym": True} if target == "npu" else {}
    out = tmp_path / "q"
    quantize(folders["bf16"], out, recipe=recipe, options=_options(recipe, synthetic_text, target=target, **kw))
    wrong = [(op, i, t) for op, i, t in _float_types(out) if t not in ("BFLOAT16",) and (op, i) not in FLOAT32_SLOTS
             and op not in ("Cos", "Sin")]
    assert not wrong, wrong
    m = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(m, full_check=True)  # standard ops fully; other domains' ops as nodes
    if all(n.domain in ("", "ai.onnx") for n in m.graph.node):
        onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True)
    assert _resolves(out) in ("ok", "no CPU kernel")
    assert json.loads((out / "quantization.json").read_text())["recipe"] == recipe
    if recipe.startswith("w8a8") and target == "cuda":  # per-token W8A8 lowered to qcompiler's op, in bf16
        w8 = [n for n in load_model(out / "model.onnx").graph if n.op_type == "W8A8MatMul"]
        assert w8 and all(n.domain == "qcompiler" for n in w8)
        assert {(n.inputs[0].dtype, n.outputs[0].dtype) for n in w8} == {(ir.DataType.BFLOAT16,) * 2}


@pytest.mark.parametrize(("label", "kw"), [("embeddings", {"quantize_embeddings": True}),
                                           ("npu-asym", {"target": "npu"}),
                                           ("no-fuse", {"fuse": False})])
def test_fp16_variants(label, kw, folders, synthetic_text, tmp_path) -> None:
    """int4 embeddings (GatherBlockQuantized, fp16 scales), the NPU re-quantization of an asymmetric
    weight, and the unfused graph: fp16 throughout and as accurate as the fp32 graph's."""
    opts = _options("w4a16-rtn", synthetic_text, **kw)
    quantize(folders["fp16"], tmp_path / "q16", recipe="w4a16-rtn", options=opts)
    quantize(folders["fp32"], tmp_path / "q32", recipe="w4a16-rtn", options=opts)
    wrong = [(op, i, t) for op, i, t in _float_types(tmp_path / "q16") if t != "FLOAT16"]
    assert not wrong, wrong
    got, ref = run_logits(tmp_path / "q16", WINDOW), run_logits(tmp_path / "q32", WINDOW)
    float_ref = run_logits(folders["fp32"], WINDOW)
    assert l2_rel(float_ref, got) <= 1.3 * l2_rel(float_ref, ref) + 0.01
