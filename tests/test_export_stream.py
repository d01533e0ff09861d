"""qc export --stream: the graph written from config.json equals transformers and optimum's export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qcompiler.errors import InputError, UnsupportedModelError
from qcompiler.export import export
from qcompiler.export_stream import SafeTensor, TensorWriter, read_safetensors_index
from qcompiler.runtime import open_runner
from tests.conftest import family_export

IDS = np.array([1, 5, 9, 33, 100, 7, 2, 400, 17, 3, 55, 200, 12, 64, 301, 8], dtype=np.int64)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _bf16_checkpoint(folder: Path, model_type: str, **overrides: object) -> Path:
    """A seeded random tiny ``model_type`` saved in bf16 (the dtype of real checkpoints)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qcompiler.families import tiny

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, **{**tiny.TINY_CONFIGS[model_type], **overrides})
    model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    with torch.no_grad():  # norms away from 1 and biases away from 0, so a missed one shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True)
    tiny._save_byte_tokenizer(folder)
    return folder


def _reference(folder: Path) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.from_numpy(IDS[None])).logits[0].numpy()


@pytest.mark.parametrize(("model_type", "overrides"), [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
    ("mistral", {}),
    ("qwen2", {}),  # q/k/v biases
])
def test_stream_export_matches_transformers(tmp_path: Path, model_type: str, overrides: dict) -> None:
    src = _bf16_checkpoint(tmp_path / "hf", model_type, **overrides)
    ref = _reference(src)
    f32 = open_runner(export(str(src), tmp_path / "fp32", stream=True)).logits(IDS)
    assert np.abs(f32 - ref).max() < 1e-4 * max(1.0, float(np.abs(ref).max()))
    f16 = open_runner(export(str(src), tmp_path / "fp16", stream=True, dtype="fp16")).logits(IDS)
    assert _cos(f16[-1], ref[-1]) >= 0.999 and _cos(f16, ref) >= 0.999


def test_stream_export_equals_optimum_export_and_decodes_alike(tmp_path: Path) -> None:
    """Same checkpoint, both exporters: logits agree to fp32 rounding, KV-cache decoding gives the same tokens."""
    base = family_export("llama")
    streamed = export(str(base / "hf"), tmp_path / "s", stream=True)
    a, b = open_runner(base / "onnx"), open_runner(streamed)
    assert np.abs(a.logits(IDS) - b.logits(IDS)).max() < 1e-5
    prompt = [int(i) for i in IDS[:6]]
    assert list(a.generate(prompt, max_new_tokens=12)) == list(b.generate(prompt, max_new_tokens=12))


@pytest.mark.parametrize("src_dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("dst", ["fp32", "fp16", "bf16"])
def test_writer_transposes_and_converts_in_blocks(tmp_path: Path, src_dtype: str, dst: str) -> None:
    """A [300, 200] tensor read in blocks of 81–327 rows lands transposed and converted, bit-exact."""
    from onnx import TensorProto

    from qcompiler.export_stream import TARGET_DTYPES

    rng = np.random.default_rng(0)
    w = rng.standard_normal((300, 200)).astype(np.float32)
    if src_dtype == "BF16":
        bits = (w.view(np.uint32) >> 16).astype(np.uint16)
        w = (bits.astype(np.uint32) << 16).view(np.float32)
        raw = bits.tobytes()
    else:
        w = w.astype(np.float16 if src_dtype == "F16" else np.float32)
        raw = w.tobytes()
    (tmp_path / "x.bin").write_bytes(b"\0" * 40 + raw)
    t = SafeTensor("w", tmp_path / "x.bin", src_dtype, (300, 200), 40, len(raw))
    T, _ = TARGET_DTYPES[dst]
    writer = TensorWriter(tmp_path / "out.bin", T, chunk=1 << 16)
    ref_t = writer.write(t, "wt", transpose=True)
    ref = writer.write(t, "w")
    writer.close()
    data = (tmp_path / "out.bin").read_bytes()

    def read(r: TensorProto) -> np.ndarray:
        meta = {e.key: e.value for e in r.external_data}
        buf = data[int(meta["offset"]):int(meta["offset"]) + int(meta["length"])]
        if T == TensorProto.BFLOAT16:
            return (np.frombuffer(buf, np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(r.dims)
        return np.frombuffer(buf, np.float32 if T == TensorProto.FLOAT else np.float16).reshape(r.dims)

    w32 = w.astype(np.float32)
    tol = {"fp32": 0.0, "fp16": 1e-3, "bf16": 8e-3}[dst]  # relative rounding of the target type
    assert list(ref_t.dims) == [200, 300] and list(ref.dims) == [300, 200]
    assert np.allclose(read(ref_t), w32.T, rtol=tol, atol=1e-6) and np.allclose(read(ref), w32, rtol=tol, atol=1e-6)
    if dst == "fp32" or dst.upper().replace("FP", "F") == src_dtype or (dst, src_dtype) == ("bf16", "BF16"):
        assert np.array_equal(read(ref_t), w32.T)  # same type, or widening: exact


def test_stream_refuses_other_families_and_non_folders(tmp_path: Path) -> None:
    src = _bf16_checkpoint(tmp_path / "gemma", "gemma", head_dim=16)
    with pytest.raises(UnsupportedModelError, match="normal export"):
        export(str(src), tmp_path / "out", stream=True)
    assert not (tmp_path / "out").exists()
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(InputError):
        export(str(gguf), tmp_path / "out2", stream=True)


def test_truncated_shard_is_bad_input(tmp_path: Path) -> None:
    src = _bf16_checkpoint(tmp_path / "hf", "llama")
    shard = src / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(InputError, match=r"truncated|past the end"):
        read_safetensors_index(src)


def test_streamed_graph_quantizes_and_fuses_like_optimums(tmp_path: Path) -> None:
    """w4a16-rtn of the streamed graph: every CPU fusion fires and the logits equal those of optimum's export."""
    from qcompiler.quantize import quantize
    from qcompiler.recipes import QuantizeOptions

    base = family_export("llama")
    streamed = export(str(base / "hf"), tmp_path / "s", stream=True)
    opts = QuantizeOptions(group_size=32)
    ref = quantize(base / "onnx", tmp_path / "q_opt", recipe="w4a16-rtn", options=opts)
    got = quantize(streamed, tmp_path / "q_str", recipe="w4a16-rtn", options=opts)
    fusion = got["report"]["fusion"]
    for name in ("fuse-rmsnorm", "fuse-skip-rmsnorm", "fuse-rotary", "fuse-attention", "fuse-pack-linears", "fuse-silu"):
        assert fusion[name] >= ref["report"]["fusion"][name] > 0, (name, fusion, ref["report"]["fusion"])
    a, b = open_runner(tmp_path / "q_opt").logits(IDS), open_runner(tmp_path / "q_str").logits(IDS)
    assert np.abs(a - b).max() < 1e-4 * max(1.0, float(np.abs(a).max()))


def test_streamed_fp16_graph_fuses_attention_and_keeps_its_logits(tmp_path: Path) -> None:
    """fp16 stream: scores, mask and Softmax in fp16 (the mask at fp16's lowest value), so w4a16-rtn
    fuses every attention block into GroupQueryAttention, and the int4 graph stays near the float one."""
    from qcompiler.irutil import load_model, op_types
    from qcompiler.quantize import quantize
    from qcompiler.recipes import QuantizeOptions

    base = family_export("llama")
    streamed = export(str(base / "hf"), tmp_path / "s16", stream=True, dtype="fp16")
    got = quantize(streamed, tmp_path / "q16", recipe="w4a16-rtn", options=QuantizeOptions(group_size=32))
    layers = int(json.loads((base / "hf" / "config.json").read_text())["num_hidden_layers"])
    assert got["report"]["fusion"]["fuse-attention"] == layers
    assert op_types(load_model(tmp_path / "q16" / "model.onnx"))["com.microsoft.GroupQueryAttention"] == layers
    f16, q16 = open_runner(streamed).logits(IDS), open_runner(tmp_path / "q16").logits(IDS)
    assert np.isfinite(q16).all() and _cos(q16, f16) >= 0.99


def test_index_names_the_shards(tmp_path: Path) -> None:
    """With an index only its shards are read: a stray consolidated.safetensors beside them is ignored."""
    import shutil

    from tools.make_random_checkpoint import build

    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=512, rope_theta=10000.0, max_position_embeddings=256)
    build(tmp_path / "hf", cfg, shard_bytes=100_000)
    shards = sorted((tmp_path / "hf").glob("model-*.safetensors"))
    assert len(shards) > 1
    shutil.copyfile(shards[0], tmp_path / "hf" / "consolidated.safetensors")
    names = set(read_safetensors_index(tmp_path / "hf"))
    assert "lm_head.weight" in names and len(names) == 2 + 2 * 9 + 1
    out = export(str(tmp_path / "hf"), tmp_path / "out", stream=True)
    ref = _reference(tmp_path / "hf")
    assert np.abs(open_runner(out).logits(IDS) - ref).max() < 1e-4 * max(1.0, float(np.abs(ref).max()))
    shards[-1].unlink()
    with pytest.raises(InputError, match="missing"):
        read_safetensors_index(tmp_path / "hf")
