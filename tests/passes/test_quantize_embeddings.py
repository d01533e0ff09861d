"""quantize-embeddings / lower-embeddings: one int4 tensor for the tied embedding and lm_head."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from qcompiler.models.synthetic import SyntheticConfig, build_model_dir
from qcompiler.passes.canonicalize import Canonicalize
from qcompiler.passes.lower_embeddings import LowerEmbeddings, read_row_blocked
from qcompiler.passes.lower_matmulnbits import LowerMatMulNBits
from qcompiler.passes.quantize_embeddings import QuantizeEmbeddings
from qcompiler.passes.quantize_weights import QuantizeWeights

from qcompiler.irutil import load_model, op_types
from qcompiler.pipeline import PassContext, make_config, run_passes
from qcompiler.quant.numerics import quantize_rtn
from qcompiler.recipes import QuantizeOptions, get_recipe
from qcompiler.spec import Granularity, QuantSpec
from tests.helpers import WINDOW, rel_err, run_logits
from tests.passes.calib_helpers import values_of


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # hidden 72 = 2.25 groups of 32: K padding in MatMulNBits, a Slice after GatherBlockQuantized
    cfg = SyntheticConfig(tie_embeddings=True, hidden=72, heads=4, kv_heads=2, intermediate=96)
    return build_model_dir(tmp_path_factory.mktemp("tied") / "m", cfg)[0]


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("untied") / "m", SyntheticConfig())[0]


def _quantize(folder: Path, **opts: object) -> tuple[ir.Model, PassContext]:
    ctx = PassContext()
    model, _ = run_passes(load_model(folder / "model.onnx"),
                          [Canonicalize(), QuantizeEmbeddings(make_config(QuantizeEmbeddings, dict(opts)), ctx)])
    return model, ctx


def test_tied_embedding_becomes_one_row_blocked_tensor(tied_dir: Path) -> None:
    e = load_model(tied_dir / "model.onnx").graph.initializers["model.embed_tokens.weight"].const_value.numpy()
    model, ctx = _quantize(tied_dir, group_size=32)
    assert "model.embed_tokens.weight" not in model.graph.initializers
    dqs = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 1
    users = sorted(u.op_type for u in dqs[0].outputs[0].consumers())
    assert users == ["Gather", "Transpose"]  # the lookup and the tied lm_head read the same tensor
    assert dqs[0].attributes["axis"].value == 1 and dqs[0].attributes["block_size"].value == 32
    assert dqs[0].inputs[0].const_value.dtype == ir.DataType.UINT4
    # numpy reference: the rows are W = Eᵀ quantized per column in groups of 32 along the hidden size
    ref = quantize_rtn(e.T, QuantSpec(bits=4, group_size=32)).dequantize().T
    rb = read_row_blocked(dqs[0])
    np.testing.assert_array_equal(rb.q, quantize_rtn(e.T, QuantSpec(bits=4, group_size=32)).q)
    gather = next(u for u in dqs[0].outputs[0].consumers() if u.op_type == "Gather")
    rows = values_of(model, [gather.outputs[0].name], WINDOW[None])[0][0]
    np.testing.assert_allclose(rows[0], ref[WINDOW], rtol=1e-6, atol=1e-7)
    assert "tied" in ctx.report["embeddings"]["model.embed_tokens.weight"]
    assert "shares" in ctx.report["embeddings"]["lm_head"]


@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (4, 32, True), (4, 0, False), (8, 64, False),
                                            (4, 32, "full")])
def test_lowered_form_shares_one_tensor_and_matches(tied_dir: Path, tmp_path: Path, bits: int, group: int,
                                                    sym: bool | str) -> None:
    model, _ = _quantize(tied_dir, bits=bits, group_size=group, sym=bool(sym), full_range=sym == "full")
    portable = run_logits(model, WINDOW, tmp_path / "dq", optimize=False)
    gathers = op_types(model)["Gather"]
    model, _ = run_passes(model, [LowerEmbeddings()])
    ops = op_types(model)
    assert ops.get("com.microsoft.GatherBlockQuantized") == 1 and ops.get("com.microsoft.MatMulNBits") == 1
    assert "DequantizeLinear" not in ops and ops.get("Gather", 0) == gathers - 1
    gbq = next(n for n in model.graph if n.op_type == "GatherBlockQuantized")
    mnb = next(n for n in model.graph if n.op_type == "MatMulNBits")
    packed = mnb.inputs[1]
    assert gbq.inputs[0].producer().op_type == "Reshape" and gbq.inputs[0].producer().inputs[0] is packed
    assert [v.name for v in model.graph.initializers.values() if v.const_value.dtype == ir.DataType.UINT8
            and len(v.shape) == 3] == [packed.name]  # one packed tensor in the model
    # hidden 72 is no multiple of the MatMulNBits block (32, 64, 128): padded rows are sliced back
    assert [u.op_type for u in gbq.outputs[0].consumers()] == ["Slice"]
    lowered = run_logits(model, WINDOW, tmp_path / "nbits")
    assert rel_err(portable, lowered) < 1e-3


def test_untied_embedding_and_lm_head(untied_dir: Path, tmp_path: Path) -> None:
    model, ctx = _quantize(untied_dir, group_size=32, method="hqq")
    assert set(ctx.report["embeddings"]) == {"model.embed_tokens.weight", "lm_head"}
    portable = run_logits(model, WINDOW, tmp_path / "dq", optimize=False)
    model, _ = run_passes(model, [LowerEmbeddings(), LowerMatMulNBits()])
    ops = op_types(model)
    assert ops.get("com.microsoft.GatherBlockQuantized") == 1 and ops.get("com.microsoft.MatMulNBits") == 1
    assert rel_err(portable, run_logits(model, WINDOW, tmp_path / "nbits")) < 1e-3


def test_with_decoder_quantization_smaller_and_close(tied_dir: Path, tmp_path: Path) -> None:
    qw = QuantizeWeights(make_config(QuantizeWeights, {"group_size": 32}))
    model, _ = run_passes(load_model(tied_dir / "model.onnx"),
                          [Canonicalize(), qw, QuantizeEmbeddings(make_config(QuantizeEmbeddings, {"group_size": 32}))])
    portable = run_logits(model, WINDOW, tmp_path / "dq", optimize=False)
    float_bytes = sum(v.const_value.nbytes for v in load_model(tied_dir / "model.onnx").graph.initializers.values())
    model, _ = run_passes(model, [LowerEmbeddings(), LowerMatMulNBits()])
    q_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values())
    assert q_bytes < 0.25 * float_bytes
    assert rel_err(portable, run_logits(model, WINDOW, tmp_path / "nbits")) < 1e-3


def test_recipes_add_the_embedding_step() -> None:
    on, off = QuantizeOptions(quantize_embeddings=True, group_size=32), QuantizeOptions()
    for name in ("w4a16-rtn", "w4a16-hqq", "w4a16-awq", "w4a16-gptq"):
        assert "quantize-embeddings{bits=4,group_size=32" in get_recipe(name).build(on)
        assert "quantize-embeddings" not in get_recipe(name).build(off)
    assert "quantize-embeddings{bits=8" in get_recipe("w8a16-rtn").build(on)


def test_per_channel_rows_use_axis0(tied_dir: Path) -> None:
    model, _ = _quantize(tied_dir, group_size=0)
    dq = next(n for n in model.graph if n.op_type == "DequantizeLinear")
    assert dq.attributes["axis"].value == 0 and "block_size" not in dq.attributes
    rb = read_row_blocked(dq)
    assert rb is not None and rb.group == 72 and rb.scale.shape == (1, 256)
    spec = QuantSpec(bits=4, granularity=Granularity.CHANNEL)
    e = load_model(tied_dir / "model.onnx").graph.initializers["model.embed_tokens.weight"].const_value.numpy()
    np.testing.assert_array_equal(rb.q, quantize_rtn(e.T, spec).q)


@pytest.mark.parametrize("method", ["rtn", "hqq"])
@pytest.mark.parametrize("sym,group", [(False, 32), (True, 16), (False, 0)])
def test_column_chunks_equal_whole_table(method: str, sym: bool, group: int) -> None:
    """Quantizing the table a slice of vocabulary rows at a time gives exactly the one-shot result."""
    from qcompiler.passes.quantize_embeddings import quantize_by_columns

    from qcompiler.quant.methods import get_weight_method
    from qcompiler.spec import Granularity, QuantSpec

    table = np.random.default_rng(0).normal(size=(103, 64)).astype(np.float32)  # [V, H]
    spec = QuantSpec(bits=4, symmetric=sym, granularity=Granularity.GROUP if group else Granularity.CHANNEL,
                     group_size=group or 128)
    fn = get_weight_method(method)
    whole = fn(np.ascontiguousarray(table.T), spec)
    parts = quantize_by_columns(fn, table, spec, chunk=10)
    np.testing.assert_array_equal(parts.q, whole.q)
    np.testing.assert_array_equal(parts.scale, whole.scale)
    if sym:
        assert parts.zero_point is None and whole.zero_point is None
    else:
        np.testing.assert_array_equal(parts.zero_point, whole.zero_point)


def test_gptq_head_lowers_the_logit_error_below_rtn(tied_dir: Path, synthetic_text: Path, tmp_path: Path) -> None:
    """method=gptq, share=false: the lm_head's codes weighed by its input's XᵀX (calibration text) in a tensor of
    their own, the lookup keeping RTN's; on held-out windows the logits (ORT) are closer to the float model's
    than with the RTN table, in the same format.  (Shared, the lookup reads the GPTQ codes too: on this 2-layer
    model the embedding's larger error costs more than the head gains.)"""
    from qcompiler.data import make_windows, read_text, tokenize
    from tests.passes.calib_helpers import calib_context

    ctx = calib_context(tied_dir, synthetic_text)
    opts = {"group_size": 32, "method": "gptq", "share": False}
    gptq, _ = run_passes(load_model(tied_dir / "model.onnx"),
                         [Canonicalize(), QuantizeEmbeddings(make_config(QuantizeEmbeddings, opts), ctx)])
    rtn, _ = _quantize(tied_dir, group_size=32)
    rtn_rows = read_row_blocked(next(n for n in rtn.graph if n.op_type == "DequantizeLinear"))
    dqs = {u.op_type: n for n in gptq.graph if n.op_type == "DequantizeLinear" for u in n.outputs[0].consumers()}
    assert set(dqs) == {"Gather", "Transpose"} and dqs["Gather"] is not dqs["Transpose"]
    lookup, head = read_row_blocked(dqs["Gather"]), read_row_blocked(dqs["Transpose"])
    np.testing.assert_array_equal(lookup.q, rtn_rows.q)  # the lookup: RTN codes
    np.testing.assert_array_equal(head.scale, rtn_rows.scale)  # static groups: RTN's grid, other codes
    assert head.q.max() <= 15 and (head.q != rtn_rows.q).mean() > 0.05
    errors = ctx.report["embeddings"]["lm_head_output_error"]
    assert errors["gptq"] < 0.8 * errors["rtn"]
    assert "own codes" in ctx.report["embeddings"]["lm_head"]
    tokens = tokenize(tied_dir, read_text(synthetic_text))
    windows = make_windows(tokens[len(tokens) // 2 :], 48, 48 * 4).ids  # held-out half of the text
    ref = np.concatenate([run_logits(tied_dir, w) for w in windows])
    err = {name: float(np.mean((np.concatenate([run_logits(m, w, tmp_path / name, optimize=False) for w in windows])
                                - ref) ** 2)) for name, m in (("gptq", gptq), ("rtn", rtn))}
    assert err["gptq"] < err["rtn"], err
    # lowered: two MatMulNBits-packed tensors (lookup, head), the same logits as the portable form
    portable = run_logits(gptq, WINDOW, tmp_path / "dq", optimize=False)
    lowered, _ = run_passes(gptq, [LowerEmbeddings()])
    ops = op_types(lowered)
    assert ops.get("com.microsoft.GatherBlockQuantized") == 1 and ops.get("com.microsoft.MatMulNBits") == 1
    assert rel_err(portable, run_logits(lowered, WINDOW, tmp_path / "nbits")) < 1e-3


def test_gptq_head_needs_calibration(tied_dir: Path) -> None:
    with pytest.raises(Exception, match="needs calibration data"):
        _quantize(tied_dir, method="gptq")
