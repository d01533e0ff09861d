"""fuse-rotary: x·C + rotate_half(x)·S → com.microsoft.RotaryEmbedding, exact for any position_ids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from qcompiler.models.synthetic import SyntheticConfig

from tests.passes.fusion_util import (
    WINDOW,
    add_const,
    assert_same_decoder,
    count,
    node_by_name,
    rel_err,
    run,
    runner,
    synthetic,
)


@pytest.mark.parametrize("kv", [True, False])
def test_all_rotaries_fused_same_decoder(tmp_path: Path, kv: bool) -> None:
    cfg = SyntheticConfig(layers=2, kv_cache=kv)
    fused = run(synthetic(cfg), "fuse-rotary")
    assert count(fused, "com.microsoft.RotaryEmbedding") == 2 * cfg.layers
    assert count(fused, "Neg") == 0
    assert_same_decoder(runner(synthetic(cfg), tmp_path / "ref"), runner(fused, tmp_path / "fused"), WINDOW,
                        steps=16 if kv else 0)


def test_arbitrary_positions_exact(tmp_path: Path) -> None:
    """Tables are the graph's own, indexed per (batch, token): any position_ids give the same result."""
    cfg = SyntheticConfig(layers=2)
    ref = runner(synthetic(cfg), tmp_path / "ref")
    fused = runner(run(synthetic(cfg), "fuse-rotary"), tmp_path / "fused")
    ids = np.stack([WINDOW[:12], WINDOW[12:24]])
    feeds = ref.feeds(ids, ref.empty_past(2), 0)
    feeds["position_ids"] = np.array([np.arange(5, 17), np.arange(3000, 3012)[::-1]], dtype=np.int64)
    a = ref.session.run(["logits"], feeds)[0]
    b = fused.session.run(["logits"], feeds)[0]
    assert rel_err(a, b) < 1e-4


def _swap_halves(proto: onnx.ModelProto) -> None:
    """Layer 0's q rotation becomes [x₁, −x₂]: not rotate_half."""
    cat = node_by_name(proto, "layers.0/self_attn/rotary_q/Concat")
    cat.input[0], cat.input[1] = cat.input[1], cat.input[0]


def _unequal_halves(proto: onnx.ModelProto) -> None:
    """The tables become cos(Concat(f, 1.5·f)): two different halves, not a RoPE table."""
    emb = node_by_name(proto, "/model/rotary_emb/Concat")
    scaled = emb.input[0] + "_x1.5"
    proto.graph.node.insert(list(proto.graph.node).index(emb), onnx.helper.make_node(
        "Mul", [emb.input[0], add_const(proto, "one_and_half", np.array(1.5, np.float32))], [scaled]))
    emb.input[1] = scaled


@pytest.mark.parametrize("edit,fused_count", [(_swap_halves, 3), (_unequal_halves, 0)])
def test_near_misses_left_unfused(tmp_path: Path, edit, fused_count: int) -> None:
    cfg = SyntheticConfig(layers=2)
    fused = run(synthetic(cfg, edit), "fuse-rotary")
    assert count(fused, "com.microsoft.RotaryEmbedding") == fused_count
    assert_same_decoder(runner(synthetic(cfg, edit), tmp_path / "ref"), runner(fused, tmp_path / "fused"), WINDOW)
