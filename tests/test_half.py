"""Half precision end to end: ``qc export --dtype fp16|bf16`` and what runs on the half graphs.

The tiny llama of the family table (``conftest.family_export``) is re-saved as a bf16
checkpoint and exported in fp16 (converted tensor by tensor while loading) and bf16; the fp16
graph's logits are checked against the cached fp32 export, the bf16 graph by the ONNX checker
and strict shape inference (ONNX Runtime CPU has no bf16 MatMul, so it cannot run it).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from qcompiler.families.tiny import VOCAB
from tests.conftest import family_export

IDS = np.random.default_rng(3).integers(0, VOCAB, 20)
F16, BF16, F32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama saved as a bf16 safetensors checkpoint (as models are downloaded)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    base = family_export("llama")
    out = tmp_path_factory.mktemp("bf16ckpt") / "hf"
    model = AutoModelForCausalLM.from_pretrained(base / "hf", dtype=torch.float32).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    for f in (base / "hf").iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def fp16_export(bf16_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qcompiler.export import export

    return export(str(bf16_checkpoint), tmp_path_factory.mktemp("fp16") / "onnx", dtype="fp16")


def _io_types(folder: Path) -> tuple[dict[str, int], dict[str, int], set[int]]:
    m = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    ins = {v.name: v.type.tensor_type.elem_type for v in m.graph.input}
    outs = {v.name: v.type.tensor_type.elem_type for v in m.graph.output}
    weights = {t.data_type for t in m.graph.initializer if len(t.dims) == 2 and min(t.dims) >= 64}  # linears
    return ins, outs, weights


def test_fp16_export_types_and_logits(fp16_export: Path) -> None:
    """Weights, KV cache and logits are fp16; logits match the fp32 export within fp16 rounding."""
    from qcompiler.runtime import open_runner

    ins, outs, weights = _io_types(fp16_export)
    assert outs["logits"] == F16 and weights == {F16}
    assert all(t == F16 for n, t in ins.items() if n.startswith("past_key_values"))
    assert json.loads((fp16_export / "qcompiler_export.json").read_text())["dtype"] == "fp16"
    ref = open_runner(family_export("llama") / "onnx", threads=1).logits(IDS)
    runner = open_runner(fp16_export, threads=1)
    got = runner.logits(IDS)
    assert got.dtype == np.float32 and np.isfinite(got).all()
    # the fp32 export has fp32 weights; the fp16 one the bf16 checkpoint's (8-bit mantissa) in fp16
    err = float(np.abs(got - ref).max()) / float(np.abs(ref).max())
    assert err < 0.05, err
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
    tokens = list(runner.generate([int(t) for t in IDS[:6]], max_new_tokens=4))  # fp16 KV cache
    assert len(tokens) == 4


def test_bf16_export_resolves(bf16_checkpoint: Path, tmp_path: Path) -> None:
    """A bf16 export is bf16 throughout and type-checks (checker full check, strict inference)."""
    from qcompiler.export import export

    out = export(str(bf16_checkpoint), tmp_path / "bf16", dtype="bf16")
    _, outs, weights = _io_types(out)
    assert outs["logits"] == BF16 and weights == {BF16}
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    m = onnx.load(str(out / "model.onnx"))
    onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True, data_prop=True)


def test_export_rejects_unknown_dtype(tmp_path: Path) -> None:
    from qcompiler.errors import OptionError
    from qcompiler.export import export

    with pytest.raises(OptionError, match="fp16"):
        export("does-not-matter", tmp_path / "x", dtype="float16")


@pytest.mark.slow
def test_smollm2_fp16(smollm2_kv, smollm2_kv_fp16, eval_text, tmp_path) -> None:
    """SmolLM2 in fp16: perplexity within 0.3% of fp32, every norm/rotary/attention fused after
    w4a16-rtn (fp16 scales, 2/3 of the fp32 model's size), fp16 KV-cache generation."""
    from qcompiler.data import read_text, tokenize
    from qcompiler.eval import evaluate
    from qcompiler.irutil import load_model, op_types
    from qcompiler.quantize import quantize
    from qcompiler.recipes import QuantizeOptions
    from qcompiler.runtime import open_runner

    r16 = evaluate(smollm2_kv_fp16, eval_text, max_tokens=1024)
    r32 = evaluate(smollm2_kv, eval_text, max_tokens=1024)
    assert abs(r16.perplexity / r32.perplexity - 1) < 0.003
    out = tmp_path / "w4"
    quantize(smollm2_kv_fp16, out, recipe="w4a16-rtn", options=QuantizeOptions(group_size=128))
    ops = op_types(load_model(out / "model.onnx"))
    assert ops["com.microsoft.GroupQueryAttention"] == 30 and ops["com.microsoft.SkipSimplifiedLayerNormalization"] == 60
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    # every float weight (and scale) fp16; the export's float32 constants (rotary frequencies, norm epsilons: a
    # few dozen values, initializers since the export writes its Constants so) are not weights
    weights = [t for t in m.graph.initializer if t.data_type in (F16, BF16, F32) and np.prod(t.dims) > 1024]
    assert weights and {t.data_type for t in weights} == {F16}
    size = sum(f.stat().st_size for f in out.iterdir())
    assert size < 0.75 * 175e6
    runner = open_runner(out, threads=2)
    ids = tokenize(out, read_text(eval_text))[:16]
    assert len(list(runner.generate([int(t) for t in ids], max_new_tokens=8))) == 8


@pytest.mark.slow
def test_smollm2_fp16_keep_fp32_finds_no_island(smollm2_kv_fp16) -> None:
    """keep-fp32 on SmolLM2's fp16 export and the GPL-3 (4 windows of 256 tokens): the residual stream
    peaks near 24,000 (layers 11-28, a massive activation), under half of fp16's range: no island."""
    from qcompiler.passes.keep_fp32 import KeepFp32

    from qcompiler.irutil import load_model
    from qcompiler.pipeline import get_pass
    from tests.conftest import CALIB_TEXT
    from tests.passes.calib_helpers import calib_context

    model = load_model(smollm2_kv_fp16 / "model.onnx")
    get_pass("canonicalize")()(model)
    p = KeepFp32(context=calib_context(smollm2_kv_fp16, CALIB_TEXT, samples=4, seq_len=256))
    assert not p(model).modified
    report = p.context.report["keep-fp32"]
    assert report["islands"] == [] and report["values_checked"] > 500
    assert 1e4 < report["max_abs"] < report["limit"]
