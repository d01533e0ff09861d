"""Exports record every value's shape (``value_info``); a quantization of such a model skips shape inference and
compiles to the same model as from a copy without the shapes (which infers them); a pass that makes a value
without a shape brings the inference back."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import qcompiler.shapes as shapes
from qcompiler.export import export
from qcompiler.irutil import load_model
from qcompiler.quantize import quantize
from qcompiler.recipes import QuantizeOptions
from tests.conftest import family_export
from tests.helpers import WINDOW, run_logits

FAMILIES = ("llama", "qwen3", "gemma2", "phi3", "gpt2")


def _strip_shapes(src: Path, dst: Path) -> Path:
    """``src`` (a model folder) copied with no ``value_info`` in its ``model.onnx``."""
    shutil.copytree(src, dst)
    proto = onnx.load(str(dst / "model.onnx"), load_external_data=False)
    del proto.graph.value_info[:]
    onnx.save(proto, str(dst / "model.onnx"))
    return dst


def _count_inferences(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = shapes._ort_symbolic_inference

    def counted(model: ir.Model) -> str:
        calls.append(1)
        return real(model)

    monkeypatch.setattr(shapes, "_ort_symbolic_inference", counted)
    return calls


@pytest.mark.parametrize("family", FAMILIES)
def test_export_records_every_shape(family: str) -> None:
    model = load_model(family_export(family) / "onnx" / "model.onnx")
    missing = [o.name for n in model.graph for o in n.outputs if o.name and (o.type is None or o.shape is None)]
    assert not missing, missing[:5]


@pytest.mark.parametrize("recipe", ["w4a16-rtn", "w8a8-dynamic"])
@pytest.mark.parametrize("family", FAMILIES)
def test_recorded_shapes_skip_inference_and_compile_alike(family: str, recipe: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    src = family_export(family) / "onnx"
    bare = _strip_shapes(src, tmp_path / "bare")
    calls = _count_inferences(monkeypatch)
    opts = QuantizeOptions(group_size=32)
    got = quantize(src, tmp_path / "recorded", recipe=recipe, options=opts)
    assert calls == [], "an export with recorded shapes was inferred again"
    ref = quantize(bare, tmp_path / "inferred", recipe=recipe, options=opts)
    assert calls, "the copy without value_info was not inferred (the test proves nothing)"
    assert got["report"]["fusion"] == ref["report"]["fusion"]
    assert got["report"]["fusion"]["fuse-attention"] > 0
    a = onnx.load(str(tmp_path / "recorded" / "model.onnx"), load_external_data=False)
    b = onnx.load(str(tmp_path / "inferred" / "model.onnx"), load_external_data=False)
    assert [(n.op_type, list(n.input), list(n.output)) for n in a.graph.node] == \
           [(n.op_type, list(n.input), list(n.output)) for n in b.graph.node]
    assert (tmp_path / "recorded" / "model.onnx_data").read_bytes() == (tmp_path / "inferred" / "model.onnx_data").read_bytes()
    np.testing.assert_array_equal(run_logits(tmp_path / "recorded", WINDOW), run_logits(tmp_path / "inferred", WINDOW))


def test_an_unshaped_value_brings_inference_back(monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_model(family_export("llama") / "onnx" / "model.onnx")
    calls = _count_inferences(monkeypatch)
    shapes.infer_shapes(model)
    assert calls == []
    # a pass inserts a node on the first norm's input and leaves its output without a shape (a Transpose, which
    # the local propagation does not know: an Identity's shape it fills without inference)
    node = next(n for n in model.graph if n.op_type == "Pow")
    x = node.inputs[0]
    ident = ir.node("Transpose", [x], attributes={"perm": [0, 1, 2]}, name="unshaped",
                    outputs=[ir.Value(name="unshaped_out")])
    model.graph.insert_before(node, ident)
    node.replace_input_with(0, ident.outputs[0])
    shapes.infer_shapes(model)
    assert calls == [1]
    assert ident.outputs[0].shape == x.shape and ident.outputs[0].dtype == x.dtype


def test_streaming_export_records_every_shape(tmp_path: Path) -> None:
    streamed = export(str(family_export("llama") / "hf"), tmp_path / "s", stream=True)
    proto = onnx.load(str(streamed / "model.onnx"), load_external_data=False)
    named = {o for n in proto.graph.node for o in n.output if o}
    assert named <= {v.name for v in proto.graph.value_info} | {o.name for o in proto.graph.output}
    assert shapes.shapes_known(load_model(streamed / "model.onnx").graph)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_writes_constants_as_initializers(family: str) -> None:
    """The export keeps no ``Constant(value=…)`` node: each became an initializer of the same name
    (logits against transformers are checked by the family export tests)."""
    proto = onnx.load(str(family_export(family) / "onnx" / "model.onnx"), load_external_data=False)
    assert not [n.output[0] for n in proto.graph.node if n.op_type == "Constant"
                and [a.name for a in n.attribute] == ["value"]]
