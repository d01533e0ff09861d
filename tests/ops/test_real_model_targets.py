"""SmolLM2-135M through the targets: qcompiler's ops on ORT CPU vs the QDQ form; the npu form."""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
import pytest
from qcompiler.passes.canonicalize import Canonicalize
from qcompiler.passes.lower_qc_ops import LowerQcOps

from qcompiler.artifact import copy_side_files
from qcompiler.eval import evaluate
from qcompiler.irutil import load_model, op_types, save_model
from qcompiler.ops import build_library
from qcompiler.partition import check_partition
from qcompiler.pipeline import PassContext, run_passes
from qcompiler.quantize import quantize
from qcompiler.recipes import QuantizeOptions
from tests.ops.helpers import apply_w8a8

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)

SEQ = 128
#: per-token W8A8 is discontinuous (a rounding flips with a last-bit change), so two
#: correct implementations differ token by token; over ~1k tokens the perplexities of
#: the QDQ form with and without ORT's graph optimizations alone differ by up to ~0.8%,
#: over ~4k tokens by ~0.2%: the 0.5% comparison needs ~4k tokens.
W8A8_TOKENS, NPU_TOKENS = 4096, 1024


def _save(model, src: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, out / "model.onnx")
    copy_side_files(src, out)
    return out


def _ppl(folder: Path, text: Path, tokens: int) -> float:
    return evaluate(folder, text, seq_len=SEQ, max_tokens=tokens, progress=False).perplexity


def test_w8a8_custom_ops_match_qdq_perplexity(smollm2_nokv: Path, eval_text: Path, tmp_path: Path) -> None:
    build_library(cuda=False)
    model = load_model(smollm2_nokv / "model.onnx")
    run_passes(model, [Canonicalize()])
    assert apply_w8a8(model, kind="per-token") == 210  # the canonical per-token form on every decoder linear
    qdq = _save(model, smollm2_nokv, tmp_path / "qdq")
    model = load_model(qdq / "model.onnx")
    ctx = PassContext()
    run_passes(model, [LowerQcOps(None, ctx)])
    assert ctx.report["lower-qc-ops"] == {"W8A8MatMul": 210}  # 30 layers x 7 linears
    assert "Round" not in op_types(model)
    qc = _save(model, smollm2_nokv, tmp_path / "qc")
    ppl_qdq, ppl_qc = _ppl(qdq, eval_text, W8A8_TOKENS), _ppl(qc, eval_text, W8A8_TOKENS)
    log.warning("SmolLM2 W8A8 per-token: QDQ form ppl %.4f, qcompiler.W8A8MatMul (CPU kernels) ppl %.4f (%+.3f%%)",
                ppl_qdq, ppl_qc, 100 * (ppl_qc / ppl_qdq - 1))
    assert abs(ppl_qc / ppl_qdq - 1) < 0.005
    assert check_partition(qc, "cpu").ok


def test_npu_form(smollm2_nokv: Path, eval_text: Path, tmp_path: Path) -> None:
    out = tmp_path / "npu"
    opts = QuantizeOptions(target="npu", static_shapes=SEQ, bits=4, group_size=32, sym=True)
    summary = quantize(smollm2_nokv, out, recipe="w4a16-rtn", options=opts)
    report = summary["report"]["lower-npu"]
    assert report["checker"] == "passed (full_check)"
    assert report["weights"] == {"int4 block kept": 210}
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert {n.domain for n in proto.graph.node} <= {""}
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [21]
    assert all(d.dim_value == (1, SEQ)[i] for vi in proto.graph.input for i, d in enumerate(vi.type.tensor_type.shape.dim))
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    assert check_partition(out, "npu").ok
    ppl_npu, ppl_float = _ppl(out, eval_text, NPU_TOKENS), _ppl(smollm2_nokv, eval_text, NPU_TOKENS)
    log.warning("SmolLM2 npu (int4 sym g32, static %d): ppl %.4f vs float %.4f", SEQ, ppl_npu, ppl_float)
    assert ppl_float < ppl_npu < 1.6 * ppl_float
