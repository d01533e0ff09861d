"""Pass manager: textual pipelines, typed options, --dump-ir, auto-canonicalize, well-formedness."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from qcompiler.errors import QCError
from qcompiler.irutil import load_model
from qcompiler.pipeline import available_passes, format_config, parse_pipeline, run_passes, split_pipeline


def test_split_pipeline() -> None:
    assert split_pipeline("canonicalize, quantize-weights{bits=4,group_size=128},lower-matmulnbits") == [
        ("canonicalize", {}),
        ("quantize-weights", {"bits": "4", "group_size": "128"}),
        ("lower-matmulnbits", {}),
    ]
    assert split_pipeline("a{x=1:2}") == [("a", {"x": "1:2"})]
    for bad in ("a{b=1", "a}b", "a{b}"):
        with pytest.raises(QCError):
            split_pipeline(bad)


def test_parse_typed_options() -> None:
    passes = parse_pipeline("quantize-weights{bits=8,group_size=0,sym=true,clip=mse}")
    cfg = passes[0].config
    assert (cfg.bits, cfg.group_size, cfg.sym, cfg.clip) == (8, 0, True, "mse")
    assert format_config(cfg) == "{bits=8,group_size=0,sym=True,clip=mse}"
    with pytest.raises(QCError, match="unknown pass 'nope'"):
        parse_pipeline("nope")
    with pytest.raises(QCError, match="cannot read 'maybe' as bool"):
        parse_pipeline("quantize-weights{sym=maybe}")


def test_registry_has_foundation_passes() -> None:
    from qcompiler.pipeline import BROKEN_PASS_MODULES

    assert {"canonicalize", "quantize-weights", "lower-matmulnbits"} <= set(available_passes())
    assert BROKEN_PASS_MODULES == {}, "every module in passes/ must import"


def test_dump_ir_one_model_per_pass(synthetic_dir, tmp_path: Path) -> None:
    folder, _ = synthetic_dir
    passes = parse_pipeline("quantize-weights{group_size=16},lower-matmulnbits")
    _, records = run_passes(load_model(folder / "model.onnx"), passes, dump_ir=tmp_path / "ir")
    # canonicalize was inserted automatically before quantize-weights
    assert [r.name for r in records] == ["canonicalize", "quantize-weights", "lower-matmulnbits"]
    dumped = sorted(p.name for p in (tmp_path / "ir").iterdir())
    assert dumped == ["01-canonicalize", "02-quantize-weights", "03-lower-matmulnbits"]
    ops = [{n.op_type for n in onnx.load(str(tmp_path / "ir" / d / "model.onnx")).graph.node} for d in dumped]
    assert "DequantizeLinear" not in ops[0] and "DequantizeLinear" in ops[1] and "MatMulNBits" in ops[2]
    canon = onnx.load(str(tmp_path / "ir" / dumped[0] / "model.onnx"), load_external_data=False)
    roles = {p.value for n in canon.graph.node for p in n.metadata_props if p.key == "qc.role"}
    assert roles == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}


def test_fusion_requires_canonical_model(synthetic_dir) -> None:
    """A fusion called on its own refuses an uncanonicalized model, naming itself; the pass manager runs
    canonicalize first (canonicalize must read the unfused decoder)."""
    import onnx_ir as ir
    from qcompiler.passes.fuse_attention import FuseAttention

    folder, _ = synthetic_dir
    with pytest.raises(ir.passes.PreconditionError, match="pass 'fuse-attention' needs a canonicalized model"):
        FuseAttention()(load_model(folder / "model.onnx"))
    model, records = run_passes(load_model(folder / "model.onnx"), parse_pipeline("fuse-rotary,fuse-attention"))
    assert [r.name for r in records] == ["canonicalize", "fuse-rotary", "fuse-attention"]
    assert sum(n.op_type == "GroupQueryAttention" for n in model.graph) == 2


def test_broken_postcondition_is_an_internal_error_naming_the_pass(synthetic_dir, monkeypatch) -> None:
    """quantize-weights ensures coverage: a linear left neither quantized nor marked float is caught."""
    import qcompiler.passes.quantize_weights as qw

    folder, _ = synthetic_dir
    real = qw.emit_dequantized_weight

    def forgetful(graph, node, q, base_name):  # a bug: the first down_proj is never written
        return None if base_name == "layers.0.down_proj.weight" else real(graph, node, q, base_name)

    monkeypatch.setattr(qw, "emit_dequantized_weight", forgetful)
    with pytest.raises(QCError, match=r"internal error: pass 'quantize-weights' broke its guarantee: "
                                      r"1 linear\(s\) neither quantized nor kept float.*layers\.0\.down_proj"):
        run_passes(load_model(folder / "model.onnx"), parse_pipeline("quantize-weights{group_size=16}"))


def test_lowering_ensures_no_weight_qdq_left(synthetic_dir, tmp_path: Path) -> None:
    """lower-matmulnbits guarantees no weight-only DequantizeLinear → MatMul it did not account for; the
    lowered graph computes what the QDQ graph did (ORT)."""
    import numpy as np
    import onnx_ir as ir
    from qcompiler.passes.lower_matmulnbits import LowerMatMulNBits

    from qcompiler.irutil import save_model
    from qcompiler.runtime import DecoderRunner, make_session

    folder, _ = synthetic_dir
    qdq, _ = run_passes(load_model(folder / "model.onnx"), parse_pipeline("quantize-weights{group_size=16}"))
    with pytest.raises(ir.passes.PostconditionError, match="still read a quantized weight"):
        LowerMatMulNBits().ensures(qdq)  # the QDQ graph, not lowered: the guarantee does not hold
    ids = (np.arange(24) * 37 + 11) % 256
    ref_dir = tmp_path / "qdq-ref"
    ref_dir.mkdir()
    save_model(qdq, ref_dir / "model.onnx")
    ref = DecoderRunner(make_session(ref_dir)).logits(ids)
    lowered, records = run_passes(qdq, parse_pipeline("lower-matmulnbits"))
    assert records[-1].modified and not any(n.op_type == "MatMul" and n.inputs[1].producer() is not None
                                            and n.inputs[1].producer().op_type == "DequantizeLinear"
                                            for n in lowered.graph)
    low_dir = tmp_path / "lowered"
    low_dir.mkdir()
    save_model(lowered, low_dir / "model.onnx")
    got = DecoderRunner(make_session(low_dir)).logits(ids)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))
