"""``qc export --keep-gguf-quant``: every supported GGUF type carried exactly into MatMulNBits / GatherBlockQuantized."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from qcompiler.errors import QCError
from qcompiler.export import export
from qcompiler.gguf_transcode import REQUANT_FORM, read_gguf, row_permutation
from qcompiler.irutil import load_model
from qcompiler.quant import gguf_blocks as gb
from qcompiler.quant.packing import unpack_matmulnbits
from tests.gguf_util import quantize_tensor, write_tiny_llama
from tests.helpers import WINDOW, rel_err, run_logits

T = GGMLQuantizationType
TYPES = list(gb.FORMS)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_decode_equals_gguf_py(qtype: GGMLQuantizationType) -> None:
    rng = np.random.default_rng(int(qtype))
    w = rng.standard_normal((8, 512)).astype(np.float32)
    raw = quantize_tensor(w, qtype, rng)
    ref = quants.dequantize(raw, qtype)
    blocks = gb.decode(raw, qtype, (8, 512))
    assert np.array_equal(blocks.dequantize(), ref)  # bit for bit in fp32
    assert blocks.u.dtype == np.uint8 and (blocks.offset is not None) == gb.FORMS[qtype].has_offset


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_planes_are_the_matmulnbits_layout_and_sum_exactly(qtype: GGMLQuantizationType) -> None:
    rng = np.random.default_rng(1)
    raw = quantize_tensor(rng.standard_normal((6, 256)).astype(np.float32), qtype, rng)
    blocks = gb.decode(raw, qtype, (6, 256))
    planes = gb.pack_planes(blocks)
    assert len(planes) == (2 if blocks.form.bits == 8 else 1)
    w = sum(unpack_matmulnbits(p.packed, p.scales, p.zero_points, 256, 6, 4, blocks.form.block).T for p in planes)
    if blocks.offset is not None:
        w = w + np.repeat(blocks.offset, blocks.form.block, axis=1)
    assert np.array_equal(w, blocks.dequantize())


def test_row_permutation_undoes_llama_cpp() -> None:
    meta = {"arch": "llama", "n_head": 4, "n_kv": 2}
    rows = np.arange(128)
    permuted = rows.reshape(2, 2, 32).swapaxes(1, 2).reshape(128)  # llama.cpp's permute for 2 kv heads
    assert np.array_equal(permuted[row_permutation("blk.0.attn_k.weight", meta, 128)], rows)
    assert row_permutation("blk.0.attn_v.weight", meta, 128) is None


def _onnx_weight(init: dict, base: str, n: int, k: int, form: gb.BlockForm) -> np.ndarray:
    """The weight ``W[N, K]`` the exported initializers hold (the sum of its 4-bit planes, + offsets), in numpy."""
    w = np.zeros((n, k), np.float32)
    for suffix in ([".hi", ".lo"] if form.bits == 8 else [""]):
        zp = init.get(f"{base}{suffix}.zero_points")
        w = w + unpack_matmulnbits(init[f"{base}{suffix}.qweight"], init[f"{base}{suffix}.scales"], zp, k, n, 4,
                                   form.block).T
    if f"{base}.offsets" in init:
        w = w + np.repeat(init[f"{base}.offsets"].T, form.block, axis=1)
    return w


def _export_pair(tmp: Path, qtype: GGMLQuantizationType, **kw) -> tuple[Path, Path, Path]:
    g = write_tiny_llama(tmp / f"tiny-{qtype.name}.gguf", qtype, **kw)
    flt = export(str(g), tmp / "float")
    native = export(str(g), tmp / "native", keep_gguf_quant=True)
    return g, flt, native


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_export_keeps_gguf_blocks_exactly(tmp_path: Path, qtype: GGMLQuantizationType) -> None:
    g, flt, native = _export_pair(tmp_path, qtype)
    report = json.loads((native / "quantization.json").read_text())
    assert report["exact"] and not report["not_in_graph"] and not report["float_linears_in_graph"]
    assert report["types"][qtype.name]["tensors"] == 15  # 2 layers × 7 linears + the embedding
    model = load_model(native / "model.onnx")
    ops = [n.op_type for n in model.graph]
    planes = 2 if gb.FORMS[qtype].bits == 8 else 1
    assert ops.count("MatMulNBits") == 15 * planes and ops.count("GatherBlockQuantized") == planes
    # the tied lm_head reads the embedding's very initializers: one copy of the table
    first = "token_embd.hi.qweight" if planes == 2 else "token_embd.qweight"
    emb = [n for n in model.graph if any(v is not None and v.name == first for v in n.inputs)]
    assert {n.op_type for n in emb} == {"MatMulNBits", "Reshape"}
    init = {k: v.const_value.numpy() for k, v in model.graph.initializers.items()}
    assert not any(v.dtype == np.float32 and v.ndim == 2 and v.size >= 256 * 256 for k, v in init.items()
                   if not k.endswith((".offsets", ".offset_rows")))  # no float weight left
    meta, weights = read_gguf(g)
    form = gb.FORMS[qtype]
    for w in weights:
        ref = quants.dequantize(w.raw, w.qtype).reshape(w.shape)
        perm = row_permutation(w.name, meta, w.shape[0])
        ref = ref if perm is None else ref[perm]
        got = _onnx_weight(init, w.name.removesuffix(".weight"), *w.shape, form)
        assert np.array_equal(got, ref), w.name  # the ONNX weights are gguf-py's, bit for bit
    ids = WINDOW[None, :]
    a, b = run_logits(flt, ids), run_logits(native, ids)
    assert rel_err(a, b) < 1e-4  # same weights; only the accumulation order differs


def test_untied_lm_head_and_mixed_types(tmp_path: Path) -> None:
    _g, flt, native = _export_pair(tmp_path, T.Q4_1, embed_type=T.Q8_0, tied=False)
    report = json.loads((native / "quantization.json").read_text())
    assert report["types"]["Q8_0"]["tensors"] == 1 and report["types"]["Q4_1"]["tensors"] == 15
    assert report["tensors"]["output.weight"]["users"]
    ids = WINDOW[None, :]
    assert rel_err(run_logits(flt, ids), run_logits(native, ids)) < 1e-4


def test_unsupported_type_is_an_error_or_requantized(tmp_path: Path) -> None:
    assert GGML_QUANT_SIZES[T.TQ2_0][0] == 256
    g = write_tiny_llama(tmp_path / "tq.gguf", T.TQ2_0, embed_type=T.Q8_0)
    with pytest.raises(QCError, match=r"TQ2_0.*--allow-requant"):
        export(str(g), tmp_path / "x", keep_gguf_quant=True)
    assert not (tmp_path / "x").exists()
    out = export(str(g), tmp_path / "rq", keep_gguf_quant=True, allow_requant=True)
    report = json.loads((out / "quantization.json").read_text())
    assert not report["exact"] and not report["types"]["TQ2_0"]["exact"]
    assert "requantized" in report["tensors"]["blk.0.attn_q.weight"]
    assert report["types"]["Q8_0"]["exact"]
    model = load_model(out / "model.onnx")
    init = {k: v.const_value.numpy() for k, v in model.graph.initializers.items()}
    _meta, weights = read_gguf(g)
    w = next(w for w in weights if w.name == "blk.0.ffn_up.weight")
    ref = quants.dequantize(w.raw, w.qtype).reshape(w.shape)
    got = _onnx_weight(init, "blk.0.ffn_up", *w.shape, REQUANT_FORM)
    step = np.repeat(init["blk.0.ffn_up.scales"].reshape(w.shape[0], -1), 32, axis=1)
    assert np.all(np.abs(got - ref) <= step / 2 * (1 + 1e-5))  # RTN: within half a step
    assert np.isfinite(run_logits(out, WINDOW[None, :])).all()


def test_keep_gguf_quant_needs_a_gguf(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")  # a Hugging Face folder, not a GGUF file
    with pytest.raises(QCError, match=r"need a \.gguf"):
        export(str(src), tmp_path / "out", keep_gguf_quant=True)


def test_native_model_takes_the_cpu_fusions(tmp_path: Path) -> None:
    """``qc quantize --passes canonicalize`` on a transcoded folder: fusions apply, numbers stay, the GGUF record stays."""
    from qcompiler.quantize import quantize

    g = write_tiny_llama(tmp_path / "tiny.gguf", T.Q4_K, embed_type=T.Q8_0)
    native = export(str(g), tmp_path / "native", keep_gguf_quant=True)
    summary = quantize(native, tmp_path / "fused", passes="canonicalize")
    assert summary["source_quantization"]["types"]["Q4_K"]["tensors"] == 14
    ops = [n.op_type for n in load_model(tmp_path / "fused" / "model.onnx").graph]
    # 4 residual Adds + the Add of the embedding's two Q8_0 planes, which skip-RMSNorm takes as a residual too
    assert ops.count("GroupQueryAttention") == 2 and ops.count("SkipSimplifiedLayerNormalization") == 5
    assert ops.count("MatMulNBits") == 2 * 4 + 2  # per layer qkv, o, gate_up, down (packed); the Q8_0 lm_head's 2 planes
    ids = WINDOW[None, :]
    assert rel_err(run_logits(native, ids), run_logits(tmp_path / "fused", ids)) < 1e-4


def test_accuracy_level_4_keeps_8bit_grids_in_one_tensor(tmp_path: Path) -> None:
    g = write_tiny_llama(tmp_path / "tiny.gguf", T.Q6_K, embed_type=T.Q8_0)
    native = export(str(g), tmp_path / "native", keep_gguf_quant=True, accuracy_level=4)
    report = json.loads((native / "quantization.json").read_text())
    assert report["accuracy_level"] == 4 and report["types"]["Q6_K"]["onnx_bits_per_weight"] == 10.0
    model = load_model(native / "model.onnx")
    nbits = [n for n in model.graph if n.op_type == "MatMulNBits"]
    assert len(nbits) == 15 and all(n.attributes.get_int("bits") == 8 and n.attributes.get_int("accuracy_level") == 4
                                    for n in nbits)
    init = {k: v.const_value.numpy() for k, v in model.graph.initializers.items()}
    meta, weights = read_gguf(g)
    for w in weights:
        form = gb.FORMS[w.qtype]
        ref = quants.dequantize(w.raw, w.qtype).reshape(w.shape)
        perm = row_permutation(w.name, meta, w.shape[0])
        ref = ref if perm is None else ref[perm]
        base = w.name.removesuffix(".weight")
        got = unpack_matmulnbits(init[f"{base}.qweight"], init[f"{base}.scales"], None, w.shape[1], w.shape[0], 8,
                                 form.block).T
        assert np.array_equal(got, ref), w.name
    ids = WINDOW[None, :]
    a, b = run_logits(export(str(g), tmp_path / "float"), ids), run_logits(native, ids)
    # int8 activations: close, not exact (random K-quant weights make this tiny model very sensitive)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95
