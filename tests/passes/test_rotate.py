"""rotate: norm weights folded and the residual stream rotated, exactly in float; refused where invalid."""

from __future__ import annotations

import numpy as np
import pytest
from qcompiler.models.synthetic import SyntheticConfig, build_model_dir
from qcompiler.passes.rotate import random_orthogonal

from qcompiler.errors import QCError, UnsupportedModelError
from qcompiler.irutil import ROTATION_MARK, load_model
from qcompiler.pipeline import PassContext, parse_pipeline, run_passes
from qcompiler.spec import Role, linear_info
from tests.helpers import WINDOW, run_logits


def _rotate(folder, pipeline="canonicalize,rotate"):
    ctx = PassContext()
    model, _ = run_passes(load_model(folder / "model.onnx"), parse_pipeline(pipeline, ctx))
    return model, ctx


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(a).max())


@pytest.mark.parametrize("n", [64, 576, 1536, 12])
def test_rotation_is_orthogonal_and_spreads(n: int) -> None:
    q = random_orthogonal(n, seed=1)
    np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-12)
    # one outlier channel becomes a spread over all channels
    x = np.zeros(n)
    x[3] = 100.0
    y = x @ q
    assert np.abs(y).max() < 100.0 * 3.0 / np.sqrt(n & -n) + 1e-9
    assert not np.allclose(random_orthogonal(n, seed=2), q)


def test_float_exact_and_weights_rotated(synthetic_dir, tmp_path) -> None:
    folder, _ = synthetic_dir
    ref = run_logits(folder, WINDOW)
    model, ctx = _rotate(folder)
    out = run_logits(model, WINDOW, tmp_path)
    assert _rel(ref, out) < 1e-4, _rel(ref, out)
    rep = ctx.report["rotate"]
    assert rep["writers"] == 4 and rep["norms_folded"] == 5 and rep["readers"] == 2 * 5 + 1
    # every norm weight is now 1
    for node in model.graph:
        if node.op_type == "Mul" and any(i is not None and i.const_value is not None and i.name.startswith("rotate_")
                                         for i in node.inputs):
            g = next(i for i in node.inputs if i.const_value is not None).const_value.numpy()
            np.testing.assert_array_equal(g, np.ones_like(g))
    # the massive residual channel (dim 5 of the synthetic model) is spread out: the q/k/v input of
    # layer 1 is flatter after rotation (max / median of per-channel max |x|)


def test_tied_embeddings_untied_and_online_down(tmp_path) -> None:
    folder, _ = build_model_dir(tmp_path / "tied", SyntheticConfig(tie_embeddings=True, seed=4))
    ref = run_logits(folder, WINDOW)
    model, ctx = _rotate(folder, "canonicalize,rotate{online_down=true,v_o=true,seed=3,untie=true}")
    out = run_logits(model, WINDOW, tmp_path / "out")
    assert _rel(ref, out) < 1e-4, _rel(ref, out)
    assert ctx.report["rotate"]["untied"] == ["lm_head"] and ctx.report["rotate"]["online_down"] == 2
    assert ctx.report["rotate"]["v_o"] == {"layers": 2, "skipped": []}
    marked = [n for n in model.graph if ROTATION_MARK in n.metadata_props]
    assert len(marked) == 2 and all(linear_info(n) is None for n in marked)
    lm = next(n for n in model.graph if (i := linear_info(n)) is not None and i.role == Role.LM_HEAD)
    assert lm.inputs[1].const_value is not None  # its own weight, no Transpose of the embedding


def test_tied_embeddings_kept_by_default(tmp_path) -> None:
    """A tied lm_head stays tied: Q after the embedding Gather, Qᵀ before the final norm (2 small MatMuls)."""
    folder, _ = build_model_dir(tmp_path / "tied", SyntheticConfig(tie_embeddings=True, seed=4))
    ref = run_logits(folder, WINDOW)
    before = load_model(folder / "model.onnx")
    table = next(n for n in before.graph if n.op_type == "Gather").inputs[0].const_value.numpy().copy()
    model, ctx = _rotate(folder, "canonicalize,rotate{seed=3}")
    assert _rel(ref, run_logits(model, WINDOW, tmp_path / "out")) < 1e-4
    rep = ctx.report["rotate"]
    assert rep["tied_kept"] and rep["untied"] == [] and rep["norms_folded"] == 4
    gather = next(n for n in model.graph if n.op_type == "Gather" and n.inputs[1].is_graph_input())
    np.testing.assert_array_equal(gather.inputs[0].const_value.numpy(), table)  # the table is untouched
    assert sum(ROTATION_MARK in n.metadata_props for n in model.graph) == 2
    lm = next(n for n in model.graph if (i := linear_info(n)) is not None and i.role == Role.LM_HEAD)
    assert lm.inputs[1].producer() is not None and lm.inputs[1].producer().op_type == "Transpose"


def test_refuses_layernorm(tmp_path) -> None:
    """A LayerNorm (mean subtraction) is not rotation-invariant: refused with the linear named."""
    import onnx
    import onnx.numpy_helper
    from qcompiler.models.synthetic import build_llama, write_model_dir

    cfg = SyntheticConfig(seed=5, massive_dim=None, super_weight=None)
    proto, _ = build_llama(cfg)
    # replace the first RMSNorm's mean-of-squares input by a centred x: x - mean(x)
    g = proto.graph
    at, pow_node = next((i, n) for i, n in enumerate(g.node) if n.op_type == "Pow")
    x = pow_node.input[0]
    axes = onnx.helper.make_node("Constant", [], ["ln_axes"], value=onnx.numpy_helper.from_array(np.array([-1])))
    mean = onnx.helper.make_node("ReduceMean", [x, "ln_axes"], ["x_mean"], keepdims=1)
    sub = onnx.helper.make_node("Sub", [x, "x_mean"], ["x_centred"])
    for k, node in enumerate((axes, mean, sub)):
        g.node.insert(at + k, node)
    pow_node.input[0] = "x_centred"
    folder = write_model_dir(proto, tmp_path / "ln", cfg)
    with pytest.raises(UnsupportedModelError, match="rotate"):
        _rotate(folder)


#: tiny families (qcompiler.families.tiny) where rotation is valid, and those it refuses (with the reason's words)
_EXACT = ("llama", "qwen3", "granite", "phi3", "gemma")
_REFUSED = {"gpt2": "RMSNorm", "stablelm": "RMSNorm", "gemma2": "post-norm", "qwen3_moe": "mixture-of-experts"}


@pytest.mark.parametrize("model_type", _EXACT)
def test_families_exact(model_type: str, tmp_path) -> None:
    from qcompiler.families.tiny import VOCAB
    from tests.conftest import family_export

    folder = family_export(model_type) / "onnx"
    ids = np.random.default_rng(7).integers(0, VOCAB, 24)
    ref = run_logits(folder, ids)
    model, ctx = _rotate(folder, "canonicalize,rotate{online_down=true,v_o=true}")
    assert _rel(ref, run_logits(model, ids, tmp_path)) < 1e-4
    v_o = ctx.report["rotate"]["v_o"]
    assert v_o["layers"] == (0 if model_type == "phi3" else 2)  # phi3's fused qkv_proj: no separate v_proj
    assert v_o["layers"] + len(v_o["skipped"]) == 2


@pytest.mark.parametrize("model_type", sorted(_REFUSED))
def test_families_refused(model_type: str) -> None:
    from tests.conftest import family_export

    with pytest.raises(UnsupportedModelError, match=_REFUSED[model_type]):
        _rotate(family_export(model_type) / "onnx")


def test_rotated_graph_is_canonicalized_again(tmp_path) -> None:
    """A saved rotated float graph (online transforms marked) is recognized again: same roles, down_proj
    reading the online transform's output."""
    from qcompiler.canonical import canonical_summary
    from qcompiler.irutil import save_model

    folder, _ = build_model_dir(tmp_path / "m", SyntheticConfig(seed=6))
    model, _ = _rotate(folder, "canonicalize,rotate{online_down=true}")
    save_model(model, tmp_path / "rot.onnx")
    again, _ = run_passes(load_model(tmp_path / "rot.onnx"), parse_pipeline("canonicalize", PassContext()))
    summary = canonical_summary(again)
    assert {k for k in summary.linears} == {f"layers.{i}.{r}" for i in range(2) for r in
                                           ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj")} | {"lm_head"}
    down = summary.linears["layers.0.down_proj"]
    assert ROTATION_MARK in down.inputs[0].producer().metadata_props


def test_inside_blocks_only_holds_for_layernorm(tmp_path) -> None:
    """``residual=false``: the online down_proj and per-head v→o transforms alone, exact in float, on a
    model whose LayerNorm refuses the residual rotation; norm weights and the embedding are untouched."""
    import onnx
    import onnx.numpy_helper
    from qcompiler.models.synthetic import build_llama, write_model_dir

    cfg = SyntheticConfig(seed=5)
    proto, _ = build_llama(cfg)
    g = proto.graph
    at, pow_node = next((i, n) for i, n in enumerate(g.node) if n.op_type == "Pow")
    x = pow_node.input[0]
    axes = onnx.helper.make_node("Constant", [], ["ln_axes"], value=onnx.numpy_helper.from_array(np.array([-1])))
    mean = onnx.helper.make_node("ReduceMean", [x, "ln_axes"], ["x_mean"], keepdims=1)
    sub = onnx.helper.make_node("Sub", [x, "x_mean"], ["x_centred"])
    for k, node in enumerate((axes, mean, sub)):
        g.node.insert(at + k, node)
    pow_node.input[0] = "x_centred"
    folder = write_model_dir(proto, tmp_path / "ln", cfg)
    ref = run_logits(folder, WINDOW)
    before = {v.name: v.const_value.numpy().copy() for v in load_model(folder / "model.onnx").graph.initializers.values()
              if v.const_value is not None and v.const_value.numpy().ndim == 1}
    model, ctx = _rotate(folder, "canonicalize,rotate{residual=false,online_down=true,v_o=true,online_in=gate_up,seed=2}")
    assert _rel(ref, run_logits(model, WINDOW, tmp_path / "out")) < 1e-4
    rep = ctx.report["rotate"]
    assert rep["residual"] is False and rep["online_down"] == 2 and rep["v_o"]["layers"] == 2
    assert rep["online_in"] == {"groups": ["gate_up"], "inputs": 2}
    after = {v.name: v.const_value.numpy() for v in model.graph.initializers.values() if v.const_value is not None}
    for name, gamma in before.items():  # norm weights (1-D constants) unchanged
        np.testing.assert_array_equal(after[name], gamma)
    marked = [n for n in model.graph if ROTATION_MARK in n.metadata_props]
    assert len(marked) == 4  # two online down_proj transforms, two on the MLP's normalized input
    # gate and up read one rotated input, which spreads the synthetic model's massive channel
    gate = next(n for n in model.graph if (i := linear_info(n)) is not None and i.key == "layers.1.gate_proj")
    up = next(n for n in model.graph if (i := linear_info(n)) is not None and i.key == "layers.1.up_proj")
    assert gate.inputs[0] is up.inputs[0] and ROTATION_MARK in gate.inputs[0].producer().metadata_props
    with pytest.raises(QCError, match="residual=false"):
        _rotate(folder, "canonicalize,rotate{residual=false}")
    with pytest.raises(QCError, match="online_in"):
        _rotate(folder, "canonicalize,rotate{residual=false,online_in=o_proj}")


@pytest.mark.parametrize("model_type", [*_EXACT, *sorted(_REFUSED)])
def test_inside_blocks_exact_for_every_family(model_type: str, tmp_path) -> None:
    """``residual=false`` (w8a8-static-smooth's transforms) holds where the residual rotation is refused too:
    LayerNorm, post-norms, mixture-of-experts."""
    from qcompiler.families.tiny import VOCAB
    from tests.conftest import family_export

    folder = family_export(model_type) / "onnx"
    ids = np.random.default_rng(7).integers(0, VOCAB, 24)
    ref = run_logits(folder, ids)
    model, ctx = _rotate(folder, "canonicalize,rotate{residual=false,online_in=gate_up:qkv,online_down=true,v_o=true}")
    assert _rel(ref, run_logits(model, ids, tmp_path)) < 1e-4
    rep = ctx.report["rotate"]
    assert rep["online_in"]["inputs"] >= 2 and rep["online_down"] >= 2
