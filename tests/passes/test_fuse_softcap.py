"""fuse-attention on soft-capped scores (Gemma 2): ``c·tanh(α·q·kᵀ) + mask`` → GroupQueryAttention(softcap=c).

The tiny ``gemma2-softcap`` variant (caps 1.0 / 2.0, scale √20 so the cap changes the scores,
sliding window 4 on layer 0, KV cache), exported with eager attention (``tests/test_export_softcap.py``
checks that export against transformers).  Fused and unfused graphs run in ONNX Runtime on a
window longer than the sliding window, through the cache and greedily.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from qcompiler.families.tiny import TINY_VARIANTS, VOCAB
from qcompiler.irutil import load_model
from tests.conftest import family_export
from tests.passes.fusion_util import ALL_FUSIONS, rel_err, run, runner

VARIANT = "gemma2-softcap"
LAYERS = 2
CAP = TINY_VARIANTS[VARIANT][1]["attn_logit_softcapping"]
SCALE = TINY_VARIANTS[VARIANT][1]["query_pre_attn_scalar"] ** -0.5
IDS = np.random.default_rng(3).integers(0, VOCAB, 14)  # > sliding window 4
STEPS = 16
#: logits tolerance (relative to the largest): float and weight-only graphs compute the same function up
#: to float rounding; dynamic int8 activations turn a last-bit difference (the fused norms', the kernel's
#: softmax) into one int8 step (~1/127 of a row's range) now and then (test_fuse_after_lowering.py: 2e-2)
TOL = {"float": 1e-5, "w4a16-rtn": 1e-5, "w8a8-dynamic": 1e-2}


def _float_graph() -> ir.Model:
    return load_model(family_export(VARIANT) / "onnx" / "model.onnx")


def _gqa_attrs(model: ir.Model) -> list[dict[str, float]]:
    return [{k: a.value for k, a in n.attributes.items()} for n in model.graph
            if n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft"]


def _assert_same(ref, test, tol: float = TOL["float"]) -> None:  # DecoderRunners
    """Logits (whole window, and prefill 5 + decode through the cache) within ``tol``; greedy tokens equal."""
    assert rel_err(ref.logits(IDS), test.logits(IDS)) < tol
    assert rel_err(ref.logits_through_cache(IDS, 5), test.logits_through_cache(IDS, 5)) < tol
    prompt = [int(t) for t in IDS[:8]]
    assert list(ref.generate(prompt, STEPS)) == list(test.generate(prompt, STEPS))


def _check_gqa(attrs: list[dict[str, float]], cap: float = CAP, scale: float = SCALE) -> None:
    assert len(attrs) == LAYERS
    for a in attrs:
        assert a["softcap"] == pytest.approx(cap, rel=1e-6)
        assert a["scale"] == pytest.approx(scale, rel=1e-6)
        assert a["causal"] == 0


def test_float_graph_fused_with_softcap(tmp_path: Path) -> None:
    fused = run(_float_graph(), ALL_FUSIONS)
    _check_gqa(_gqa_attrs(fused))
    assert sum(n.op_type == "Softmax" for n in fused.graph) == 0
    _assert_same(runner(_float_graph(), tmp_path / "ref"), runner(fused, tmp_path / "fused"))


def test_fp16_graph_fused_with_softcap(tmp_path: Path) -> None:
    """The fp16 export (eager attention as before; its ``α`` an fp16 constant) fuses the same way; the
    fused graph's logits stay within fp16 rounding of the unfused graph's and of fp32 transformers'."""
    from qcompiler.export import export

    base = family_export(VARIANT)
    export(str(base / "hf"), tmp_path / "fp16", dtype="fp16")
    plain = load_model(tmp_path / "fp16" / "model.onnx")
    fused = run(load_model(tmp_path / "fp16" / "model.onnx"), ALL_FUSIONS)
    _check_gqa(_gqa_attrs(fused), scale=float(np.float16(SCALE)))
    ref, test = runner(plain, tmp_path / "ref"), runner(fused, tmp_path / "fused")
    _assert_same(ref, test, tol=2e-3)
    assert rel_err(runner(_float_graph(), tmp_path / "fp32").logits(IDS), test.logits(IDS)) < 3e-3


@pytest.mark.parametrize("recipe", ["w4a16-rtn", "w8a8-dynamic"])
def test_recipe_fused_with_softcap(recipe: str, tmp_path: Path) -> None:
    from qcompiler.quantize import quantize
    from qcompiler.recipes import QuantizeOptions
    from qcompiler.runtime import open_runner

    src = family_export(VARIANT) / "onnx"
    for fuse in (True, False):
        quantize(src, tmp_path / str(fuse), recipe=recipe, options=QuantizeOptions(group_size=32, fuse=fuse))
    _check_gqa(_gqa_attrs(load_model(tmp_path / "True" / "model.onnx")))
    _assert_same(open_runner(tmp_path / "False", threads=1), open_runner(tmp_path / "True", threads=1), TOL[recipe])


# ---- edited graphs: the caps around each layer's Tanh -------------------------------------------------------

def _cap_nodes(model: ir.Model) -> list[tuple[ir.Node, ir.Node, ir.Node]]:
    """Per layer (outer Mul, Tanh, inner Div) of ``Softmax(Add(Mul(Tanh(Div(·, c)), c), mask))``."""
    out = []
    for sm in (n for n in model.graph if n.op_type == "Softmax"):
        add = sm.inputs[0].producer()
        mul = next(p for p in (i.producer() for i in add.inputs) if p is not None and p.op_type == "Mul")
        tanh = mul.inputs[0].producer()
        div = tanh.inputs[0].producer()
        assert (tanh.op_type, div.op_type) == ("Tanh", "Div")
        out.append((mul, tanh, div))
    assert len(out) == LAYERS
    return out


def _init(model: ir.Model, name: str, arr: np.ndarray) -> ir.Value:
    v = ir.Value(name=name, const_value=ir.tensor(np.asarray(arr, np.float32), name=name))
    model.graph.register_initializer(v)
    return v


def _node(model: ir.Model, before: ir.Node, op: str, inputs: list[ir.Value], **attrs: object) -> ir.Value:
    node = ir.node(op, inputs, attributes=attrs)
    model.graph.insert_before(before, node)
    return node.outputs[0]


def test_different_caps_inside_and_outside_fuse_exactly(tmp_path: Path) -> None:
    """``1.5·tanh(α·q·kᵀ/1.0)`` is GQA's form too: softcap 1.5, scale 1.5·α."""
    def edit() -> ir.Model:
        m = _float_graph()
        for i, (mul, _, _) in enumerate(_cap_nodes(m)):
            mul.replace_input_with(1, _init(m, f"outer_cap_{i}", np.array(1.5)))
        return m

    fused = run(edit(), ALL_FUSIONS)
    _check_gqa(_gqa_attrs(fused), cap=1.5, scale=1.5 * SCALE / CAP)
    _assert_same(runner(edit(), tmp_path / "ref"), runner(fused, tmp_path / "fused"))


def _per_head_divisor(m: ir.Model) -> None:  # a [1, N, 1, 1] tensor inside the tanh: not GQA's scalar scale
    for i, (_, _, div) in enumerate(_cap_nodes(m)):
        div.replace_input_with(1, _init(m, f"per_head_{i}", np.array([1.0, 0.5, 2.0, 1.0]).reshape(1, 4, 1, 1)))


def _runtime_divisor(m: ir.Model) -> None:  # c + 0·mean(x): equal to c, but computed at run time
    for i, (_, _, div) in enumerate(_cap_nodes(m)):
        x = div.inputs[0]
        mean = _node(m, div, "ReduceMean", [x], keepdims=0)
        zero = _node(m, div, "Mul", [mean, _init(m, f"zero_{i}", np.array(0.0))])
        div.replace_input_with(1, _node(m, div, "Add", [zero, _init(m, f"cap_{i}", np.array(CAP))]))


def _offset_inside(m: ir.Model) -> None:  # tanh(α·q·kᵀ/c + 0.25)
    for i, (_, tanh, div) in enumerate(_cap_nodes(m)):
        tanh.replace_input_with(0, _node(m, tanh, "Add", [div.outputs[0], _init(m, f"offset_{i}", np.array(0.25))]))


@pytest.mark.parametrize("edit", [_per_head_divisor, _runtime_divisor, _offset_inside])
def test_other_tanh_left_unfused(edit, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A Tanh that is not ``c·tanh(scalar·q·kᵀ)`` stays: no GroupQueryAttention, the same function."""
    def edited() -> ir.Model:
        m = _float_graph()
        edit(m)
        return m

    with caplog.at_level(logging.INFO, logger="qcompiler.passes.fuse_attention"):
        fused = run(edited(), ALL_FUSIONS)
    assert _gqa_attrs(fused) == []
    assert caplog.text.count("left unfused: scores + mask: soft-cap: tanh of scalars times q·kᵀ") == LAYERS
    assert sum(n.op_type == "Tanh" for n in fused.graph) >= LAYERS
    _assert_same(runner(edited(), tmp_path / "ref"), runner(fused, tmp_path / "fused"))
