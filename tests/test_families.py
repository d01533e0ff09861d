"""Every described decoder family, on a tiny random model: export, roles, and the coverage contract.

Each family (``qcompiler.families``) is built from its tiny config (2 layers, hidden 64,
4 heads / 2 KV heads where the family has GQA, no download), exported once per machine
(``conftest.family_export``) and checked: the export's logits and greedy generation (ONNX
Runtime with its KV cache) equal transformers', canonicalize finds exactly the family's
roles in every layer, ``w4a16-rtn`` / ``w8a8-dynamic`` quantize every decoder linear (only
lm_head is kept float) with a bounded logit error (W8A8: top-1 agreement with the float
graph except at near-ties), and layer-wise running finds each layer's residual stream.
A graph with an unsupported pattern exits 5 and writes nothing.  ``tools/family_table.py``
writes the whole table (docs/families.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qcompiler.families import FAMILIES
from qcompiler.families.tiny import VOCAB
from tests.conftest import family_export

IDS = np.random.default_rng(7).integers(0, VOCAB, 24)


def _runner(folder: Path):
    from qcompiler.runtime import open_runner

    return open_runner(folder, threads=1)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_export_matches_transformers(model_type: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    base = family_export(model_type)
    hf = AutoModelForCausalLM.from_pretrained(base / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor(IDS)[None]).logits[0].numpy()
    got = _runner(base / "onnx").logits(IDS)
    np.testing.assert_allclose(got, ref, atol=4e-5 + 1e-4 * float(np.abs(ref).max()))


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_greedy_generation_equals_transformers(model_type: str) -> None:
    """``DecoderRunner.generate`` (ONNX Runtime, KV cache) gives transformers' greedy tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    base = family_export(model_type)
    hf = AutoModelForCausalLM.from_pretrained(base / "hf", dtype=torch.float32).eval()
    prompt = [int(t) for t in IDS[:8]]
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                          pad_token_id=0, eos_token_id=None)
    want = [int(t) for t in out[0, len(prompt):]]
    assert list(_runner(base / "onnx").generate(prompt, 6)) == want


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_canonicalize_finds_the_family_roles(model_type: str) -> None:
    from qcompiler.passes.canonicalize import canonical_summary

    from qcompiler.irutil import load_model
    from qcompiler.spec import LINEAR_KEY, Role

    fam = FAMILIES[model_type]
    summary = canonical_summary(load_model(family_export(model_type) / "onnx" / "model.onnx"))
    assert summary.num_layers == 2
    for layer in range(2):
        found = sorted(n.meta[LINEAR_KEY].role.value for k, n in summary.linears.items()
                       if k.startswith(f"layers.{layer}.") and ".experts." not in k)
        assert found == sorted(r.value for r in fam.layer_roles()), (model_type, layer)
        experts = [k for k in summary.linears if k.startswith(f"layers.{layer}.experts.")]
        n_experts = len({k.split(".")[3] for k in experts})
        assert len(experts) == n_experts * len(fam.expert_roles()) and (n_experts > 1) == fam.moe
    assert "lm_head" in summary.linears and summary.linears["lm_head"].meta[LINEAR_KEY].role == Role.LM_HEAD
    assert summary.unclassified == []


def _quantize(model_type: str, recipe: str, out: Path) -> dict:
    from qcompiler.quantize import quantize
    from qcompiler.recipes import QuantizeOptions

    return quantize(family_export(model_type) / "onnx", out, recipe=recipe, options=QuantizeOptions(group_size=32))


@pytest.mark.parametrize("recipe", ["w4a16-rtn", "w8a8-dynamic"])
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_decoder_linear_quantized(model_type: str, recipe: str, tmp_path: Path) -> None:
    summary = _quantize(model_type, recipe, tmp_path / "q")
    assert summary["coverage"]["unsupported"] == 0
    kept = [k["role"] for k in summary["kept_float"]]
    assert kept == (["layers.0.router", "layers.1.router", "lm_head"] if FAMILIES[model_type].moe else ["lm_head"]), kept
    assert json.loads((tmp_path / "q" / "quantization.json").read_text())["kept_float"] == summary["kept_float"]
    float_logits = _runner(family_export(model_type) / "onnx").logits(IDS)
    q_logits = _runner(tmp_path / "q").logits(IDS)
    centred = float_logits - float_logits.mean(-1, keepdims=True)
    rel = float(np.linalg.norm(q_logits - float_logits) / np.linalg.norm(centred))
    if recipe == "w4a16-rtn":  # int4 g32 on random weights (measured rel 0.009-0.19): the logit error only
        assert 1e-4 < rel < 0.3, rel
        return
    # W8A8 (exact u8×u8 integer GEMMs on every CPU) measured rel 0.001-0.022 and top-1 agreement
    # 0.917-1.0 on all 18 families.  The few disagreements (gemma2 2/24, phi 2/24, olmo2 and
    # gemma3_text 1/24) are near-ties of a random tiny model, not a pass bug: the float top-2 gap
    # there is 0.0004-0.0036, 0.2-2.2% of the row's logit spread, below the rows' max error
    # ~0.01 (gemma2/gemma3 soft-capped, phi: the flattest logits of all families).
    assert 1e-4 < rel < 0.05, rel
    f_top, q_top = float_logits.argmax(-1), q_logits.argmax(-1)
    assert float((f_top == q_top).mean()) >= 0.9, (f_top, q_top)
    rows = np.flatnonzero(f_top != q_top)
    gaps = float_logits[rows, f_top[rows]] - float_logits[rows, q_top[rows]]
    assert np.all(gaps < 0.05 * float_logits[rows].std(-1)), gaps  # disagree only at near-ties


def _hide_mlp(src: Path, dst: Path) -> Path:
    """Layer 0's MLP product goes through an op qcompiler does not know: gate/up/down match no rule."""
    import shutil

    import onnx
    from onnx import helper

    shutil.copytree(src, dst)
    m = onnx.load(str(dst / "model.onnx"), load_external_data=False)
    down = next(n for n in m.graph.node if n.op_type == "MatMul" and "layers.0/mlp/down_proj" in n.name)
    m.graph.node.insert(list(m.graph.node).index(down),
                        helper.make_node("Mystery", [down.input[0]], ["mystery_out"], domain="custom.ops", name="/mystery"))
    down.input[0] = "mystery_out"
    m.opset_import.append(helper.make_opsetid("custom.ops", 1))
    onnx.save(m, str(dst / "model.onnx"))
    return dst


@pytest.mark.parametrize("recipe", ["w4a16-rtn", "w8a8-dynamic"])
def test_unsupported_pattern_exits_5_and_allow_partial_lists_it(recipe: str, tmp_path: Path, capsys) -> None:
    from qcompiler.cli import main

    folder = _hide_mlp(family_export("llama") / "onnx", tmp_path / "m")
    out = tmp_path / "out"
    rc = main(["quantize", str(folder), str(out), "--recipe", recipe])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 5
    assert err == ("qc: error: llama: 3 decoder linear(s) not recognized (unsupported pattern): "
                   "/model/layers.0/mlp/gate_proj/MatMul, /model/layers.0/mlp/up_proj/MatMul, "
                   "/model/layers.0/mlp/down_proj/MatMul; pass --allow-partial to write them in float, "
                   "listed in quantization.json kept_float")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".partial-" in p.name]

    assert main(["quantize", str(folder), str(out), "--recipe", recipe, "--allow-partial"]) == 0
    kept = json.loads((out / "quantization.json").read_text())["kept_float"]
    unsupported = [k["node"] for k in kept if k["reason"] == "unsupported pattern"]
    # names of the final graph (fuse-pack-linears may have packed the float gate/up into one MatMul)
    assert "/model/layers.0/mlp/down_proj/MatMul" in unsupported and len(unsupported) in (2, 3)
    assert all("/model/layers.0/mlp/" in n for n in unsupported)
    assert [k["role"] for k in kept if k["reason"] != "unsupported pattern"] == ["lm_head"]


def test_tied_lm_head_is_a_transposed_view(tmp_path: Path) -> None:
    """A folded copy ``W = Eᵀ`` of a tied embedding is re-tied: one initializer, a Transpose view."""
    import onnx_ir as ir

    from qcompiler.export import retie_lm_head
    from qcompiler.irutil import linear_weight, load_model

    model = load_model(family_export("gpt2") / "onnx" / "model.onnx")
    head = next(n for n in model.graph if n.name == "/lm_head/MatMul")
    table, transposed = linear_weight(head)
    assert transposed  # the exporter wrote a view here; make it a copy, as for Gemma 3 270M
    copy = ir.Value(name="lm_head_copy", shape=ir.Shape(list(reversed(list(table.shape)))), type=table.type)
    copy.const_value = ir.tensor(table.const_value.numpy().T.copy(), name="lm_head_copy")
    model.graph.register_initializer(copy)
    head.replace_input_with(1, copy)
    n_init = len(model.graph.initializers)
    assert retie_lm_head(model)
    assert linear_weight(head) == (table, True) and len(model.graph.initializers) == n_init - 1


@pytest.mark.parametrize("model_type", ["gpt2", "gemma"])
def test_tied_weights_stay_tied_through_recipes(model_type: str, tmp_path: Path) -> None:
    from qcompiler.irutil import load_model

    summary = _quantize(model_type, "w8a8-dynamic", tmp_path / "q")
    assert summary["kept_float"][0]["reason"].startswith("lm_head tied to the embedding")
    model = load_model(tmp_path / "q" / "model.onnx")
    big = [v for v in model.graph.initializers.values() if v.const_value is not None and v.const_value.size >= 512 * 64]
    assert len(big) == 1  # the embedding only: no transposed copy for the lm_head


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_layerwise_finds_the_residual_chain(model_type: str) -> None:
    """AWQ/GPTQ run layer by layer: h_{i+1} is found after post-norms (gemma2/3, olmo2),
    parallel blocks (falcon, phi, cohere, gpt_neox) and OPT's ``[B·T, H]`` view of the MLP,
    and layer 1 reads layer 0's output."""
    from qcompiler.irutil import load_model
    from qcompiler.layerwise import find_decoder_layers

    model = load_model(family_export(model_type) / "onnx" / "model.onnx")
    if FAMILIES[model_type].moe:  # refused clearly (exit 5): DecoderLayer holds one linear per role
        from qcompiler.errors import UnsupportedModelError

        with pytest.raises(UnsupportedModelError, match=r"decoder layer 0 is a mixture of 4 experts"):
            find_decoder_layers(model)
        return
    layers = find_decoder_layers(model)
    assert [layer.index for layer in layers] == [0, 1]
    assert layers[1].input is layers[0].output
    assert layers[0].input.producer().op_type in ("Gather", "Mul", "Add")  # the embedding (scaled, + positions)


@pytest.mark.parametrize("passes", ["smooth-scale{search=false,alpha=0.5,pow2=false}", "awq{fold_only=true}"])
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_scale_folding_keeps_float_logits(model_type: str, passes: str, tmp_path: Path) -> None:
    """Smoothing / AWQ scales fold into each family's norms (RMSNorm γ, LayerNorm γ and β, Gemma
    ``(1 + w)``, a parallel block's shared norm), previous linears or explicit Muls: the float
    model computes the same logits."""
    from qcompiler.calibrate import CalibConfig, Calibrator
    from qcompiler.irutil import load_model
    from qcompiler.pipeline import PassContext, parse_pipeline, run_passes
    from qcompiler.recipes import QuantizeOptions
    from tests.helpers import run_logits

    if "awq" in passes and FAMILIES[model_type].moe:
        pytest.skip("awq refuses a mixture of experts (test_layerwise_finds_the_residual_chain)")
    folder = family_export(model_type) / "onnx"
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(["the model", "graph norm", "scale weight", "token"] * 300))
    opts = QuantizeOptions(calib=str(text), calib_samples=2, seq_len=32)
    ctx = PassContext(calibrate=Calibrator(folder, CalibConfig.from_options(opts, cache_dir=str(tmp_path / "cache"))))
    model, _ = run_passes(load_model(folder / "model.onnx"), parse_pipeline(f"canonicalize,{passes}", ctx))
    report = ctx.report.get("smooth-scale", ctx.report.get("awq", {}))["groups"]
    folded = {g["folded_into"] for g in report.values()}
    # every family's pre-norms take the scale, but OLMo 2 (post-norms only: q/k/v read the residual
    # stream) and GPT-2 (its Conv1D views the norm output as [B·T, K] through a Reshape whose shape is
    # computed from Shape(x) at run time, not yet proved channel-preserving: an explicit Mul, exact)
    assert folded & {"norm", "rmsnorm", "layernorm", "(1 + w)"} or model_type in ("olmo2", "gpt2"), folded
    ref = run_logits(folder, IDS, optimize=False)
    got = run_logits(model, IDS, tmp_path / "out", optimize=False)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
