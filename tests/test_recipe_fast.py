"""w4a16-fast: AWQ+GPTQ int4 decoder (w4a16-fast-rtn: RTN), int4 lm_head by GPTQ on the calibration text, level-4
MatMulNBits on cpu."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from qcompiler.models.synthetic import SyntheticConfig, build_model_dir

from qcompiler.quantize import quantize
from qcompiler.recipes import QuantizeOptions, get_recipe
from tests.helpers import WINDOW, run_logits


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = SyntheticConfig(tie_embeddings=True, hidden=128, heads=4, kv_heads=2, intermediate=192)
    return build_model_dir(tmp_path_factory.mktemp("fast") / "m", cfg)[0]


@pytest.mark.parametrize("name,decoder", [("w4a16-fast", "awq{bits=4,group_size=64,sym=False,gptq=true}"),
                                          ("w4a16-fast-rtn", "quantize-weights{bits=4,group_size=64")])
def test_pipeline_text(name: str, decoder: str) -> None:
    r = get_recipe(name)
    assert r.needs_calibration and r.bits == 4
    cpu = r.build(QuantizeOptions(group_size=64))
    assert cpu.startswith(f"canonicalize,{decoder}") and "fit_k" not in cpu
    assert "quantize-embeddings{bits=4,group_size=32,sym=False,method=gptq,share=False}" in cpu
    assert cpu.endswith("lower-matmulnbits{accuracy_level=4},lower-embeddings{accuracy_level=4}")
    assert "lower-" not in r.build(QuantizeOptions(target="npu"))  # npu: the portable form


def test_both_bodies_one_graph_awq_gptq_closer(tied_dir: Path, synthetic_text: Path, tmp_path: Path) -> None:
    """The two decoders give the same graph (kernels, block sizes, levels: the same decode work); AWQ+GPTQ's
    logits are nearer the float model's than RTN's (ORT)."""
    opts = QuantizeOptions(group_size=32, calib=str(synthetic_text), calib_samples=4, seq_len=64)
    graphs = {}
    for name in ("w4a16-fast", "w4a16-fast-rtn"):
        quantize(tied_dir, tmp_path / name, recipe=name, options=opts)
        proto = onnx.load(str(tmp_path / name / "model.onnx"), load_external_data=False)
        graphs[name] = [(n.op_type, sorted((a.name, a.i) for a in n.attribute if a.type == onnx.AttributeProto.INT))
                        for n in proto.graph.node]
    assert graphs["w4a16-fast"] == graphs["w4a16-fast-rtn"]
    ref = run_logits(tied_dir, WINDOW)
    err = {n: float(np.mean((run_logits(tmp_path / n, WINDOW) - ref) ** 2)) for n in graphs}
    assert err["w4a16-fast"] < err["w4a16-fast-rtn"], err


def test_quantizes_and_runs_at_level4(tied_dir: Path, synthetic_text: Path, tmp_path: Path) -> None:
    opts = QuantizeOptions(group_size=32, calib=str(synthetic_text), calib_samples=4, seq_len=64)
    out = tmp_path / "fast"
    quantize(tied_dir, out, recipe="w4a16-fast", options=opts)
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    levels = {next(a.i for a in n.attribute if a.name == "accuracy_level") for n in nbits}
    assert levels == {4}
    assert sum(n.op_type == "GatherBlockQuantized" for n in proto.graph.node) == 1
    head = next(n for n in nbits if n.output[0] == "logits")
    assert next(a.i for a in head.attribute if a.name == "block_size") == 32
    report = json.loads((out / "quantization.json").read_text())
    text = json.dumps(report)
    assert "own codes, untied from" in text and "lm_head_output_error" in text
    # real numerics (ORT): the recipe's graph against its own pipeline lowered at level 0 (float activations):
    # the same weights (identical codes), so the two differ by level 4's int8 activations only, far less than
    # the int4 weights' own error against the float model
    exact = tmp_path / "level0"
    passes = get_recipe("w4a16-fast").build(QuantizeOptions(group_size=32, target="npu"))
    quantize(tied_dir, exact, passes=passes, options=opts.with_overrides(accuracy_level=0))
    ref, lv0, lv4 = run_logits(tied_dir, WINDOW), run_logits(exact, WINDOW), run_logits(out, WINDOW)
    weights_err, act_err = float(np.mean((lv0 - ref) ** 2)), float(np.mean((lv4 - lv0) ** 2))
    assert act_err < 0.25 * weights_err, (act_err, weights_err)
    lv0_report = json.loads((exact / "quantization.json").read_text())
    assert json.dumps(lv0_report["report"]["embeddings"]) == json.dumps(report["report"]["embeddings"])


@pytest.mark.parametrize("k,group,expected", [(576, 128, 64), (1536, 128, 128), (576, 32, 32), (72, 128, 128),
                                              (96, 64, 32), (4096, 128, 128)])
def test_fit_k_groups(k: int, group: int, expected: int) -> None:
    """fit_k: the largest power-of-two group >= 32, at most the asked one, dividing K (else the asked one)."""
    from qcompiler.passes.quantize_weights import _fit_k

    from qcompiler.spec import QuantSpec

    assert _fit_k(QuantSpec(bits=4, group_size=group), k).group_size == expected


def test_fit_k_quantizes_without_padding(synthetic_dir, tmp_path: Path) -> None:
    """A K = 96 model at --group-size 64: fit_k gives its 96-row linears g32 (no padded block), the same codes
    as asking for g32 (real numerics: ORT logits equal), and leaves K = 64·n linears at g64."""
    from qcompiler.irutil import load_model
    from qcompiler.quant.emit import read_dq_weight

    folder = build_model_dir(tmp_path / "m", SyntheticConfig(hidden=96, heads=4, kv_heads=2, intermediate=128))[0]
    fit = quantize(folder, tmp_path / "fit", passes="canonicalize,quantize-weights{bits=4,group_size=64,fit_k=True}",
                   options=QuantizeOptions(target="npu"))
    g32 = quantize(folder, tmp_path / "g32", passes="canonicalize,quantize-weights{bits=4,group_size=32}",
                   options=QuantizeOptions(target="npu"))
    groups = {k: v.split()[-1] for k, v in fit["report"]["weights"].items()}
    assert {groups[k] for k in groups if "down_proj" not in k} == {"g32"}  # K = 96
    assert {groups[k] for k in groups if "down_proj" in k} == {"g64"}  # K = 128
    assert g32["report"]["weights"]["layers.0.q_proj"] == fit["report"]["weights"]["layers.0.q_proj"]

    def weights(folder: Path) -> dict[str, object]:
        m = load_model(folder / "model.onnx")
        return {n.name: read_dq_weight(n.inputs[1]) for n in m.graph
                if n.op_type == "MatMul" and read_dq_weight(n.inputs[1]) is not None}

    a, b = weights(tmp_path / "fit"), weights(tmp_path / "g32")
    q = next(k for k in a if "q_proj" in k)
    np.testing.assert_array_equal(a[q].q, b[q].q)  # the same codes as asking for g32
    assert all(d.q.shape[0] % d.group_size == 0 for d in a.values())  # no padded block anywhere
    # real numerics (ORT): layer 0's q_proj output of the fit_k model is the g32 model's, to the bit
    from tests.passes.calib_helpers import values_of

    fit_m, g32_m = load_model(tmp_path / "fit" / "model.onnx"), load_model(tmp_path / "g32" / "model.onnx")
    name = next(n.outputs[0].name for n in fit_m.graph if n.name == q)
    out_fit = values_of(fit_m, [name], WINDOW[None])[0][0]
    out_g32 = values_of(g32_m, [name], WINDOW[None])[0][0]
    np.testing.assert_array_equal(out_fit, out_g32)
