"""fuse-silu: x·sigmoid(x) → QuickGelu(alpha=1), and only that form."""

from __future__ import annotations

from pathlib import Path

import onnx
from qcompiler.models.synthetic import SyntheticConfig

from tests.passes.fusion_util import WINDOW, assert_same_decoder, count, node_by_name, run, runner, synthetic


def test_silu_fused_same_decoder(tmp_path: Path) -> None:
    cfg = SyntheticConfig(layers=2)
    fused = run(synthetic(cfg), "fuse-silu")
    assert count(fused, "com.microsoft.QuickGelu") == cfg.layers
    assert count(fused, "Sigmoid") == 0
    assert_same_decoder(runner(synthetic(cfg), tmp_path / "ref"), runner(fused, tmp_path / "fused"), WINDOW, steps=16)


def test_sigmoid_of_another_value_left_alone(tmp_path: Path) -> None:
    """gate·σ(up) is not SiLU: layer 0's activation stays two ops."""

    def edit(proto: onnx.ModelProto) -> None:
        sig = node_by_name(proto, "layers.0/mlp/act_fn/Sigmoid")
        up = node_by_name(proto, "layers.0/mlp/up_proj/MatMul")
        nodes = list(proto.graph.node)
        nodes.remove(up)
        nodes.insert(nodes.index(sig), up)  # up is computed before the Sigmoid now reads it
        sig.input[0] = up.output[0]
        del proto.graph.node[:]
        proto.graph.node.extend(nodes)

    cfg = SyntheticConfig(layers=2)
    fused = run(synthetic(cfg, edit), "fuse-silu")
    assert count(fused, "com.microsoft.QuickGelu") == 1
    assert count(fused, "Sigmoid") == 1
    assert_same_decoder(runner(synthetic(cfg, edit), tmp_path / "ref"), runner(fused, tmp_path / "fused"), WINDOW)
