"""quantize-weights (RTN) writes exact block/channel DequantizeLinear forms with bounded error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from qcompiler.passes.canonicalize import Canonicalize
from qcompiler.passes.quantize_weights import QuantizeWeights

from qcompiler.errors import QCError, UnsupportedModelError
from qcompiler.irutil import load_model
from qcompiler.pipeline import PassContext, make_config, run_passes
from qcompiler.quant.emit import read_dq_weight
from qcompiler.quant.numerics import quantize_rtn
from qcompiler.spec import Role, linear_info
from tests.helpers import WINDOW, rel_err, run_logits, sqnr_db


def _quantized(folder: Path, **opts: object):
    model = load_model(folder / "model.onnx")
    cfg = make_config(QuantizeWeights, dict(opts))
    model, _ = run_passes(model, [Canonicalize(), QuantizeWeights(cfg, PassContext())])
    return model


@pytest.mark.parametrize("group", [16, 32, 0])
@pytest.mark.parametrize("sym", [False, True])
def test_every_decoder_linear_quantized_exactly(synthetic_dir, group: int, sym: bool) -> None:
    folder, _ = synthetic_dir
    float_model = load_model(folder / "model.onnx")
    Canonicalize()(float_model)
    weights = {
        linear_info(n).key: n.inputs[1].const_value.numpy().copy()
        for n in float_model.graph
        if linear_info(n) is not None and linear_info(n).role != Role.LM_HEAD
    }
    model = _quantized(folder, bits=4, group_size=group, sym=sym)
    seen = 0
    for node in model.graph:
        info = linear_info(node)
        if info is None:
            continue
        dq = read_dq_weight(node.inputs[1])
        if info.role == Role.LM_HEAD:
            assert dq is None  # lm_head stays float by default
            continue
        assert dq is not None, info.key
        seen += 1
        w = weights[info.key]
        ref = quantize_rtn(w, QuantizeWeights.Config(bits=4, group_size=group, sym=sym).spec())
        np.testing.assert_array_equal(dq.q, ref.q)
        np.testing.assert_allclose(dq.scale, ref.scale, rtol=1e-6)
        assert dq.group_size == (group or w.shape[0])
    assert seen == len(weights) == 14
    assert model.opset_imports[""] == 21


@pytest.mark.parametrize("bits,group,full", [(8, 32, False), (4, 16, False), (4, 0, False), (4, 32, True)])
def test_graph_equals_fake_quant_reference(synthetic_dir, tmp_path: Path, bits: int, group: int, full: bool) -> None:
    """The quantized graph computes exactly the float graph with W replaced by numpy's Ŵ (``full``: the
    full-range symmetric grid, signed scales)."""
    folder, _ = synthetic_dir
    fake = load_model(folder / "model.onnx")
    Canonicalize()(fake)
    opts = {"sym": True, "full_range": True} if full else {}
    spec = QuantizeWeights.Config(bits=bits, group_size=group, **opts).spec()
    for node in fake.graph:
        info = linear_info(node)
        if info is not None and info.role != Role.LM_HEAD:
            w = node.inputs[1].const_value
            node.inputs[1].const_value = ir.tensor(quantize_rtn(w.numpy(), spec).dequantize(), name=w.name)
    ref = run_logits(fake, WINDOW, tmp_path / "fake", optimize=False)
    q = run_logits(_quantized(folder, bits=bits, group_size=group, **opts), WINDOW, tmp_path / "q", optimize=False)
    assert rel_err(ref, q) < 1e-5


@pytest.mark.parametrize("bits,min_db", [(8, 15.0), (4, 2.0)])
def test_logits_sqnr(synthetic_dir, tmp_path: Path, bits: int, min_db: float) -> None:
    """Coarse sanity bound; the synthetic model amplifies error (massive activation, outliers)."""
    folder, _ = synthetic_dir
    ref = run_logits(folder, WINDOW)
    q = run_logits(_quantized(folder, bits=bits, group_size=32), WINDOW, tmp_path / "q")
    assert sqnr_db(ref, q) > min_db


def test_more_bits_less_error(synthetic_dir, tmp_path: Path) -> None:
    folder, _ = synthetic_dir
    ref = run_logits(folder, WINDOW)
    errs = [sqnr_db(ref, run_logits(_quantized(folder, bits=b, group_size=32), WINDOW, tmp_path / f"b{b}"))
            for b in (4, 8)]
    g = [sqnr_db(ref, run_logits(_quantized(folder, bits=4, group_size=gs), WINDOW, tmp_path / f"g{gs}"))
         for gs in (16, 0)]
    assert errs[1] > errs[0] + 10
    assert g[0] > g[1]  # smaller groups, smaller error


def test_skip_and_lm_head_options(synthetic_dir) -> None:
    folder, _ = synthetic_dir
    model = _quantized(folder, lm_head=True, skip="layers.0.down_proj")
    by_key = {linear_info(n).key: n for n in model.graph if linear_info(n) is not None}
    assert read_dq_weight(by_key["lm_head"].inputs[1]) is not None
    assert read_dq_weight(by_key["layers.0.down_proj"].inputs[1]) is None


def test_bad_options() -> None:
    with pytest.raises(QCError, match="group_size"):
        make_config(QuantizeWeights, {"group_size": "48"})
    with pytest.raises(QCError, match="no option 'groupsize'"):
        make_config(QuantizeWeights, {"groupsize": "32"})
    with pytest.raises(QCError, match="bits"):
        make_config(QuantizeWeights, {"bits": "5"})


def test_model_without_matmul(tmp_path: Path) -> None:
    import onnx_ir as ir
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]))
    with pytest.raises(UnsupportedModelError, match="no MatMul"):
        run_passes(model, [QuantizeWeights()])
