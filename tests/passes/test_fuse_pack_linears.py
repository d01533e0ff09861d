"""fuse-pack-linears: q/k/v and gate/up linears → one linear + Split, for every weight form."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from qcompiler.models.synthetic import SyntheticConfig
from qcompiler.passes.canonicalize import canonical_summary

from qcompiler.quant.w8a8 import (
    emit_int8_weight,
    emit_per_token_activation,
    emit_static_activation,
    match_w8a8,
)
from qcompiler.spec import Role, linear_info
from tests.passes.fusion_util import ALL_FUSIONS, WINDOW, assert_same_decoder, count, run, runner, synthetic

CFG = SyntheticConfig(layers=2)
QUANT4 = "canonicalize,quantize-weights{bits=4,group_size=16}"


def test_float_packed_and_recognized(tmp_path: Path) -> None:
    fused = run(synthetic(CFG), ALL_FUSIONS)
    assert count(fused, "Split") == 2 * CFG.layers
    assert count(fused, "MatMul") == 4 * CFG.layers + 1  # qkv, o, gate_up, down per layer, lm_head
    assert_same_decoder(runner(synthetic(CFG), tmp_path / "ref"), runner(fused, tmp_path / "fused"), WINDOW, steps=32)
    # canonicalize finds the packed linears (and the rest) in the fully fused graph
    fused.graph.meta.pop("qc.canonical", None)
    summary = canonical_summary(fused)
    assert summary.num_layers == CFG.layers and not summary.unclassified
    roles = sorted(linear_info(n).role.value for n in summary.linears.values())
    assert roles == sorted(["qkv_proj", "o_proj", "gate_up_proj", "down_proj"] * CFG.layers + ["lm_head"])


@pytest.mark.parametrize("pipeline", [
    f"{QUANT4},fuse-pack-linears,lower-matmulnbits",  # packed in the portable form, then lowered
    f"{QUANT4},lower-matmulnbits,fuse-pack-linears",  # MatMulNBits packed
    "canonicalize,quantize-weights{bits=8,group_size=0,sym=true},lower-matmulnbits,fuse-pack-linears",
    "canonicalize,quantize-weights{bits=4,group_size=0},fuse-pack-linears",  # per-channel DequantizeLinear
])
def test_weight_only_forms(tmp_path: Path, pipeline: str) -> None:
    base = pipeline.replace(",fuse-pack-linears", "")
    ref = run(synthetic(CFG), base)
    packed = run(synthetic(CFG), pipeline)
    assert count(packed, "Split") == 2 * CFG.layers
    packed_linears = [n for n in packed.graph if linear_info(n) is not None
                      and linear_info(n).role in (Role.QKV, Role.GATE_UP)]
    assert len(packed_linears) == 2 * CFG.layers
    assert_same_decoder(runner(ref, tmp_path / "ref"), runner(packed, tmp_path / "packed"), WINDOW, steps=16)


def _w8a8(kind: str) -> ir.Model:
    """Canonical W8A8 on every decoder linear (symmetric int8 per channel weights)."""
    model = run(synthetic(CFG), "canonicalize")
    for node in list(model.graph):
        info = linear_info(node)
        if info is None or info.role == Role.LM_HEAD:
            continue
        w = node.inputs[1].const_value.numpy()
        s = np.abs(w).max(axis=0) / 127.0
        emit_int8_weight(model.graph, node, np.clip(np.rint(w / s), -127, 127).astype(np.int8), s, info.key)
        if kind == "per-token":
            emit_per_token_activation(model.graph, node, info.key)
        else:
            emit_static_activation(model.graph, node, 0.05, 0, "int8", info.key)
    model.opset_imports[""] = 21
    return model


@pytest.mark.parametrize("kind", ["per-token", "static"])
@pytest.mark.parametrize("lower", [False, True])
def test_w8a8_forms(tmp_path: Path, kind: str, lower: bool) -> None:
    tail = ",lower-w8a8-cpu" if lower else ""
    ref = run(_w8a8(kind), "canonicalize" + tail)
    packed = run(_w8a8(kind), "fuse-pack-linears" + tail)
    assert count(packed, "Split") == 2 * CFG.layers
    if not lower:  # the packed MatMuls are still canonical W8A8
        kinds = [match_w8a8(n).kind for n in packed.graph if n.op_type == "MatMul" and match_w8a8(n) is not None]
        assert kinds == [kind] * 4 * CFG.layers
    assert_same_decoder(runner(ref, tmp_path / "ref"), runner(packed, tmp_path / "packed"), WINDOW, steps=16)


def test_lowered_w8a8_packed(tmp_path: Path) -> None:
    """Integer GEMMs (MatMulIntegerToFloat) reading one quantized activation are packed too."""
    ref = run(_w8a8("static"), "lower-w8a8-cpu")
    packed = run(_w8a8("static"), "lower-w8a8-cpu,fuse-pack-linears")
    assert count(packed, "com.microsoft.MatMulIntegerToFloat") == 4 * CFG.layers
    assert_same_decoder(runner(ref, tmp_path / "ref"), runner(packed, tmp_path / "packed"), WINDOW, steps=16)


def test_mismatched_forms_not_packed() -> None:
    """q in int8, k/v in int4: only the compatible pair is packed."""
    model = run(synthetic(CFG), "canonicalize,quantize-weights{bits=4,group_size=16,skip=layers.0.q_proj}")
    packed = run(model, "fuse-pack-linears")
    q0 = next(n for n in packed.graph if n.op_type == "MatMul" and linear_info(n) is not None
              and linear_info(n).key == "layers.0.q_proj")
    assert q0.inputs[1].const_value is not None  # float q_proj stays on its own
    assert count(packed, "Split") == 2 * CFG.layers  # k/v of layer 0 packed as a pair
