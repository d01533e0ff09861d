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
