"""fuse-gqa-rotary: GroupQueryAttention reads the packed q|k|v and applies the rotary itself (do_rotary=1)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from qcompiler.models.synthetic import SyntheticConfig

from tests.passes.fusion_util import ALL_FUSIONS, WINDOW, assert_same_decoder, count, run, runner, synthetic

CFG = SyntheticConfig(layers=2, hidden=576, heads=9, kv_heads=3, intermediate=256, vocab=256, kv_cache=True)
BASE = {
    "float": f"canonicalize,{ALL_FUSIONS}",
    "w4a16-rtn": f"canonicalize,quantize-weights{{bits=4,group_size=32}},{ALL_FUSIONS},lower-matmulnbits,fuse-bias",
}


@pytest.mark.parametrize("form", sorted(BASE))
def test_same_decoder_fewer_nodes(form: str, tmp_path: Path) -> None:
    before = run(synthetic(CFG), BASE[form])
    after = run(synthetic(CFG), f"{BASE[form]},fuse-gqa-rotary")
    assert count(before, "com.microsoft.RotaryEmbedding") == 2 * CFG.layers
    assert count(after, "com.microsoft.RotaryEmbedding") == 0
    gqas = [n for n in after.graph if n.op_type == "GroupQueryAttention"]
    assert len(gqas) == CFG.layers
    for g in gqas:
        assert g.attributes.get_int("do_rotary", 0) == 1 and g.inputs[1] is None and g.inputs[2] is None
        assert len(g.inputs) <= 9 or g.inputs[9] is None  # rotated by cache slot (module docstring)
        assert g.inputs[0].producer().op_type in ("MatMul", "MatMulNBits")  # the packed q|k|v linear itself
    assert count(after, "Split") == count(before, "Split") - CFG.layers  # the q|k|v Splits (gate|up stays)
    # real numerics (ORT): prefill logits and 24 greedy steps through the KV cache, rotary from the kernel
    # (positions past the prompt: the caches are indexed by position up to total_sequence_length)
    assert_same_decoder(runner(before, tmp_path / "a"), runner(after, tmp_path / "b"), WINDOW, steps=24)


def _padded_run(folder: Path, ids: np.ndarray, mask: np.ndarray, steps: int) -> list[np.ndarray]:
    """Prompt + ``steps`` greedy steps of a batch, position_ids as transformers feeds them (cumsum(mask) − 1,
    the padding 1); the logits of every run."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    outputs = [o.name for o in sess.get_outputs()]
    past_names = [i.name for i in sess.get_inputs() if i.name.startswith("past_key_values")]
    b = ids.shape[0]
    past = {n: np.zeros((b, CFG.kv_heads, 0, CFG.hidden // CFG.heads), np.float32) for n in past_names}
    logits, cur = [], ids
    for _ in range(steps + 1):
        pos = np.where(mask == 0, 1, np.cumsum(mask, axis=1) - 1)[:, -cur.shape[1]:]
        out = dict(zip(outputs, sess.run(None, {"input_ids": cur, "attention_mask": mask, "position_ids": pos,
                                                **past})))
        logits.append(out["logits"])
        past = {n: out[n.replace("past_key_values", "present")] for n in past_names}
        cur = np.argmax(out["logits"][:, -1], axis=-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((b, 1), np.int64)], axis=1)
    return logits


def test_padded_batches(tmp_path: Path) -> None:
    """Rotation by cache slot: a left-padded batch (and an unpadded one) decodes as the unfolded graph does —
    RoPE scores depend on position differences only; a right-padded batch decoding after its padding does not
    (its new tokens sit ``pads`` slots past their positions): the documented limit of the opt-in pass."""
    from qcompiler.irutil import save_model

    for name, pipe in (("a", BASE["float"]), ("b", f"{BASE['float']},fuse-gqa-rotary")):
        (tmp_path / name).mkdir()
        save_model(run(synthetic(CFG), pipe), tmp_path / name / "model.onnx")
    ids = np.random.default_rng(0).integers(0, CFG.vocab, (2, 12)).astype(np.int64)
    for side, expect_same in (("none", True), ("left", True), ("right", False)):
        mask = np.ones((2, 12), np.int64)
        if side == "left":
            mask[1, :5] = 0
        elif side == "right":
            mask[1, 7:] = 0
        ref, folded = _padded_run(tmp_path / "a", ids, mask, 4), _padded_run(tmp_path / "b", ids, mask, 4)
        real = mask[:, :, None].astype(bool)  # the prompt's padded rows' logits are not compared
        errs = [float(np.abs(np.where(real, ref[0] - folded[0], 0)).max() / np.abs(ref[0]).max())]
        errs += [float(np.abs(r - f).max() / np.abs(r).max()) for r, f in zip(ref[1:], folded[1:])]
        assert errs[0] < 1e-5, (side, errs)  # the prompt: every side
        assert (max(errs) < 1e-5) == expect_same, (side, errs)


def test_non_positional_tables_left_alone(tmp_path: Path) -> None:
    """A graph whose rotary tables read another input than position_ids keeps its RotaryEmbedding nodes."""
    import onnx_ir as ir

    model = run(synthetic(CFG), BASE["float"])
    rot = next(n for n in model.graph if n.op_type == "RotaryEmbedding")
    cos = rot.inputs[2]
    extra = ir.Value(name="cos_scale", shape=ir.Shape([1]), type=ir.TensorType(ir.DataType.FLOAT))
    model.graph.inputs.append(extra)
    mul = ir.node("Mul", [cos, extra], name="scale_cos")
    model.graph.insert_after(cos.producer(), mul)
    for node in [n for n in model.graph if n.op_type == "RotaryEmbedding"]:
        node.replace_input_with(2, mul.outputs[0])
    after = run(model, "fuse-gqa-rotary")
    assert count(after, "com.microsoft.RotaryEmbedding") == 2 * CFG.layers
    assert all(n.attributes.get_int("do_rotary", 0) == 0 for n in after.graph if n.op_type == "GroupQueryAttention")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_smollm2_w4_folded_same_tokens(dtype: str, smollm2_kv: Path, smollm2_kv_fp16: Path, tmp_path: Path) -> None:
    """SmolLM2 w4a16-rtn's cpu pipeline + fuse-gqa-rotary (fp32 and fp16 exports): all 30 attentions folded,
    the same logits and 16 greedy tokens through the cache as the pipeline without it."""
    from qcompiler.quantize import quantize
    from qcompiler.recipes import QuantizeOptions, get_recipe
    from qcompiler.targets import lowering_pipeline

    src = smollm2_kv if dtype == "fp32" else smollm2_kv_fp16
    opts = QuantizeOptions(group_size=128)
    text = f"{get_recipe('w4a16-rtn').build(opts)},{lowering_pipeline('cpu', opts)}"
    quantize(src, tmp_path / "unfolded", passes=text, options=opts.with_overrides(fuse=False))
    summary = quantize(src, tmp_path / "folded", passes=f"{text},fuse-gqa-rotary", options=opts.with_overrides(fuse=False))
    assert summary["report"]["fusion"]["fuse-gqa-rotary"] == 30
    folded = tmp_path / "folded"
    assert count(run(folded, "fuse-gqa-rotary"), "com.microsoft.RotaryEmbedding") == 0
    ids = (np.arange(40) * 997 + 13) % 20000 + 100
    tol = 1e-4 if dtype == "fp32" else 2e-3
    assert_same_decoder(runner(tmp_path / "unfolded", tmp_path, threads=2), runner(folded, tmp_path, threads=2),
                        ids, steps=16, tol=tol)


def test_cli_option_folds_after_the_cpu_lowering(tmp_path: Path) -> None:
    """``--rotary-in-attention`` (QuantizeOptions.rotary_in_attention): the cpu target's pipeline ends with
    fuse-gqa-rotary, every attention folded, the same greedy tokens; refused without the fusions or off cpu."""
    from qcompiler.models.synthetic import build_model_dir

    from qcompiler.errors import OptionError
    from qcompiler.option_use import check_options
    from qcompiler.quantize import quantize
    from qcompiler.recipes import QuantizeOptions
    from qcompiler.targets import lowering_pipeline

    assert lowering_pipeline("cpu", QuantizeOptions(rotary_in_attention=True)).endswith(",fuse-gqa-rotary")
    assert "fuse-gqa-rotary" not in lowering_pipeline("cpu", QuantizeOptions())
    folder = build_model_dir(tmp_path / "m", CFG)[0]
    plain = quantize(folder, tmp_path / "plain", recipe="w4a16-rtn", options=QuantizeOptions())
    folded = quantize(folder, tmp_path / "folded", recipe="w4a16-rtn", options=QuantizeOptions(rotary_in_attention=True))
    assert "fuse-gqa-rotary" not in plain["report"]["fusion"]
    assert folded["report"]["fusion"]["fuse-gqa-rotary"] == CFG.layers
    assert_same_decoder(runner(tmp_path / "plain", tmp_path / "x"), runner(tmp_path / "folded", tmp_path / "y"),
                        WINDOW, steps=16)
    with pytest.raises(OptionError, match="needs the fusions"):
        QuantizeOptions(rotary_in_attention=True, fuse=False)
    with pytest.raises(OptionError, match="--rotary-in-attention is not used"):
        check_options("w4a16-rtn", QuantizeOptions(target="npu", rotary_in_attention=True), {"rotary_in_attention"})
