"""lower-matmulnbits: the MatMulNBits graph computes what the DequantizeLinear graph computes."""

from __future__ import annotations

from pathlib import Path

import pytest
from qcompiler.passes.canonicalize import Canonicalize
from qcompiler.passes.lower_matmulnbits import LowerMatMulNBits
from qcompiler.passes.quantize_weights import QuantizeWeights

from qcompiler.irutil import load_model, op_types
from qcompiler.pipeline import make_config, run_passes
from tests.helpers import WINDOW, rel_err, run_logits


@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (4, 16, True), (4, 0, False), (8, 64, False), (8, 0, True),
                                            (4, 32, "full")])
def test_same_logits_as_dq_form(synthetic_dir, tmp_path: Path, bits: int, group: int, sym: bool | str) -> None:
    """``sym="full"``: the full-range grid's signed scales (MatMulNBits and DequantizeLinear take them as they are)."""
    folder, _ = synthetic_dir
    qcfg = make_config(QuantizeWeights, {"bits": bits, "group_size": group, "sym": bool(sym),
                                         "full_range": sym == "full"})
    model, _ = run_passes(load_model(folder / "model.onnx"), [Canonicalize(), QuantizeWeights(qcfg)])
    dq_logits = run_logits(model, WINDOW, tmp_path / "dq", optimize=False)
    model, _ = run_passes(model, [LowerMatMulNBits()])
    ops = op_types(model)
    assert ops.get("com.microsoft.MatMulNBits") == 14
    assert "DequantizeLinear" not in ops
    nbits_logits = run_logits(model, WINDOW, tmp_path / "nbits")
    assert rel_err(dq_logits, nbits_logits) < 1e-3


def test_leaves_other_matmuls_alone(synthetic_dir) -> None:
    folder, _ = synthetic_dir
    model = load_model(folder / "model.onnx")
    before = op_types(model)
    result = LowerMatMulNBits()(model)
    assert result.modified is False
    assert op_types(model) == before
