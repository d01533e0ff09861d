"""fuse-attention: the decoder attention block → GroupQueryAttention, same interface and numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from qcompiler.models.synthetic import SyntheticConfig

from tests.passes.fusion_util import (
    WINDOW,
    assert_same_decoder,
    count,
    node_by_name,
    rel_err,
    run,
    runner,
    set_const,
    synthetic,
)

FUSE = "fuse-rotary,fuse-attention"


@pytest.mark.parametrize("kv,kv_heads", [(True, 2), (True, 4), (True, 1), (False, 2)])
def test_blocks_fused_same_decoder(tmp_path: Path, kv: bool, kv_heads: int) -> None:
    cfg = SyntheticConfig(layers=2, kv_cache=kv, kv_heads=kv_heads)
    fused = run(synthetic(cfg), FUSE)
    assert count(fused, "com.microsoft.GroupQueryAttention") == cfg.layers
    for op in ("Softmax", "Transpose", "Neg"):
        assert count(fused, op) == 0
    assert_same_decoder(runner(synthetic(cfg), tmp_path / "ref"), runner(fused, tmp_path / "fused"), WINDOW,
                        steps=64 if kv else 0)


def test_interface_unchanged(tmp_path: Path) -> None:
    ref = synthetic(SyntheticConfig(layers=2))
    fused = run(synthetic(SyntheticConfig(layers=2)), FUSE)
    sig = lambda vs: [(v.name, str(v.dtype), str(v.shape)) for v in vs]  # noqa: E731
    assert sig(fused.graph.inputs) == sig(ref.graph.inputs)
    assert sig(fused.graph.outputs) == sig(ref.graph.outputs)


def test_padded_batch_valid_rows_exact(tmp_path: Path) -> None:
    """The graph's own mask is the attention bias: a left-padded batch gives the same valid rows."""
    cfg = SyntheticConfig(layers=2, massive_dim=None)
    ref = runner(synthetic(cfg), tmp_path / "ref")
    fused = runner(run(synthetic(cfg), FUSE), tmp_path / "fused")
    ids = np.stack([WINDOW[:10], WINDOW[10:20]])
    mask = np.ones((2, 10), np.int64)
    mask[1, :3] = 0  # left padding on the second row
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **ref.empty_past(2)}
    names = ["logits", *ref.present_names]
    a = ref.session.run(names, feeds)
    b = fused.session.run(names, feeds)
    assert rel_err(a[0][0], b[0][0]) < 1e-4
    assert rel_err(a[0][1, 3:], b[0][1, 3:]) < 1e-4
    assert not np.isnan(b[0]).any()
    # one decoding step for both rows on top of that cache
    step = {"input_ids": np.array([[5], [7]]), "attention_mask": np.concatenate([mask, np.ones((2, 1), np.int64)], 1),
            "position_ids": pos[:, -1:] + 1, **dict(zip(ref.past_names, a[1:]))}
    assert rel_err(ref.session.run(["logits"], step)[0], fused.session.run(["logits"], step)[0]) < 1e-4


def _tile_heads(proto: onnx.ModelProto) -> None:
    """Layer 0 repeats kv heads by tiling (Unsqueeze at axis 1), not by repeat-kv's interleave."""
    for kind in ("k", "v"):
        un = node_by_name(proto, f"layers.0/self_attn/repeat_{kind}/Unsqueeze")
        ex = node_by_name(proto, f"layers.0/self_attn/repeat_{kind}/Expand")
        set_const(proto, un.input[1], np.array([1], np.int64))
        set_const(proto, ex.input[1], np.array([1, 2, 1, 1, 1], np.int64))


def test_tiled_heads_left_unfused(tmp_path: Path) -> None:
    cfg = SyntheticConfig(layers=2)
    fused = run(synthetic(cfg, _tile_heads), FUSE)
    assert count(fused, "com.microsoft.GroupQueryAttention") == 1
    assert count(fused, "Softmax") == 1
    ref = runner(synthetic(cfg, _tile_heads), tmp_path / "ref")
    assert_same_decoder(ref, runner(fused, tmp_path / "fused"), WINDOW, steps=8)


def test_optimum_generate_identical(tmp_path: Path) -> None:
    """Optimum's ORTModelForCausalLM runs the fused graph: same tokens, batched and left-padded too."""
    ort_models = pytest.importorskip("optimum.onnxruntime")
    torch = pytest.importorskip("torch")
    import json
    from dataclasses import asdict

    from qcompiler.irutil import save_model

    cfg = SyntheticConfig(layers=2)
    ids = torch.tensor([[5, 9, 33, 100, 7], [0, 0, 12, 13, 14]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    tokens = []
    for name, model in (("ref", synthetic(cfg)), ("fused", run(synthetic(cfg), FUSE))):
        folder = tmp_path / name
        folder.mkdir()
        save_model(model, folder / "model.onnx")
        (folder / "config.json").write_text(json.dumps({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.hidden,
            "intermediate_size": cfg.intermediate, "num_hidden_layers": cfg.layers,
            "num_attention_heads": cfg.heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
            "vocab_size": cfg.vocab, "use_cache": True, "qcompiler_synthetic": asdict(cfg)}))
        m = ort_models.ORTModelForCausalLM.from_pretrained(folder, use_cache=True, use_io_binding=False)
        tokens.append(m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                 pad_token_id=0).tolist())
    assert tokens[0] == tokens[1]
