"""canonicalize finds every decoder linear with its (layer, role) from structure alone."""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir
import pytest
from qcompiler.models.synthetic import SyntheticConfig, build_llama
from qcompiler.passes.canonicalize import Canonicalize, canonical_summary

from qcompiler.irutil import load_model
from qcompiler.spec import DECODER_ROLES, Role, linear_info


def _canon(model: ir.Model):
    Canonicalize()(model)
    return canonical_summary(model)


@pytest.mark.parametrize("kv", [True, False])
@pytest.mark.parametrize("layers,kv_heads", [(2, 2), (3, 4), (4, 1)])
def test_synthetic_roles_match_ground_truth(kv: bool, layers: int, kv_heads: int) -> None:
    proto, truth = build_llama(SyntheticConfig(layers=layers, kv_heads=kv_heads, kv_cache=kv))
    model = ir.serde.deserialize_model(proto)
    summary = _canon(model)
    assert summary.num_layers == layers
    assert not summary.unclassified
    assert {k: n.name for k, n in summary.linears.items()} == truth.linear_names
    # q/k/v, gate/up and lm_head are fed by an RMSNorm, o and down are not
    for key in summary.linears:
        role = key.rsplit(".", 1)[-1]
        assert (key in summary.norms) == (role in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head"))


def test_renamed_nodes_do_not_matter() -> None:
    """Names carry no information: scramble every node and value name, roles stay the same."""
    proto, _ = build_llama(SyntheticConfig(layers=2))
    model = ir.serde.deserialize_model(proto)
    order = [n for n in model.graph]
    for i, node in enumerate(order):
        node.name = f"n{len(order) - i}"
    summary = _canon(model)
    by_pos = {k: order.index(n) for k, n in summary.linears.items()}
    model2 = ir.serde.deserialize_model(proto)
    ref = _canon(model2)
    order2 = [n for n in model2.graph]
    assert by_pos == {k: order2.index(n) for k, n in ref.linears.items()}


def test_tied_lm_head_found() -> None:
    proto, _ = build_llama(SyntheticConfig(tie_embeddings=True))
    summary = _canon(ir.serde.deserialize_model(proto))
    assert "lm_head" in summary.linears
    assert linear_info(summary.linears["lm_head"]).role == Role.LM_HEAD


def test_canonicalize_changes_nothing_but_annotations() -> None:
    """The first run only annotates (modified: the annotations are serialized metadata); nodes and numerics stay."""
    proto, _ = build_llama(SyntheticConfig())
    model = ir.serde.deserialize_model(proto)
    result = Canonicalize()(model)
    assert result.modified is True
    out = ir.serde.serialize_model(model)
    assert [(n.op_type, list(n.input), list(n.output)) for n in out.graph.node] == \
        [(n.op_type, list(n.input), list(n.output)) for n in proto.graph.node]
    assert any(p.key == "qc.role" for n in out.graph.node for p in n.metadata_props)


def test_canonicalize_modified_only_when_it_changes_something() -> None:
    """Already canonical: modified False (and no second analysis); a changed graph is analysed again;
    a fresh graph holding the same annotations (saved and reloaded) is not modified either."""
    proto, _ = build_llama(SyntheticConfig())
    model = ir.serde.deserialize_model(proto)
    assert Canonicalize()(model).modified is True
    first = canonical_summary(model)
    assert Canonicalize()(model).modified is False
    assert canonical_summary(model) is first  # the early return: nothing recomputed

    reloaded = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    assert Canonicalize()(reloaded).modified is False  # annotations already there and equal
    assert set(canonical_summary(reloaded).linears) == set(first.linears)

    graph = model.graph  # a node added: analysed again; the annotations are unchanged, so still False
    extra = ir.node("Identity", [graph.outputs[0]])
    graph.append(extra)
    assert Canonicalize()(model).modified is False
    assert canonical_summary(model) is not first


def test_canonicalize_reports_a_gemm_rewrite() -> None:
    """A Gemm with a constant weight rewritten as MatMul + Add is a change (modified), and computes the same
    numbers (ORT before/after); the second run finds nothing to do."""
    import numpy as np
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8)).astype(np.float32)  # [N, K]: transB
    b = rng.standard_normal(16).astype(np.float32)
    x = ir.Value(name="x", shape=ir.Shape([3, 8]), type=ir.TensorType(ir.DataType.FLOAT))
    wv = ir.Value(name="w", const_value=ir.tensor(w))
    bv = ir.Value(name="b", const_value=ir.tensor(b))
    gemm = ir.node("Gemm", [x, wv, bv], attributes={"transB": 1, "alpha": 0.5, "beta": 2.0})
    gemm.outputs[0].name, gemm.outputs[0].type = "y", ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([x], [gemm.outputs[0]], nodes=[gemm], initializers=[wv, bv], opset_imports={"": 18})
    model = ir.Model(graph, ir_version=8)
    xs = rng.standard_normal((3, 8)).astype(np.float32)
    ref = 0.5 * xs @ w.T + 2.0 * b
    assert Canonicalize()(model).modified is True
    assert [n.op_type for n in model.graph] == ["MatMul", "Add"]
    got = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString()).run(None, {"x": xs})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert Canonicalize()(model).modified is False


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["smollm2_kv", "smollm2_nokv"])
def test_smollm2_exact_linears(fixture: str, request: pytest.FixtureRequest) -> None:
    """SmolLM2-135M: exactly 30 × 7 decoder linears plus lm_head, with the right roles."""
    folder: Path = request.getfixturevalue(fixture)
    summary = _canon(load_model(folder / "model.onnx"))
    assert summary.num_layers == 30
    assert not summary.unclassified
    expected = {f"layers.{i}.{r.value}" for i in range(30) for r in DECODER_ROLES} | {"lm_head"}
    assert set(summary.linears) == expected
    # exporter names are not used by the pass, but they let us check the roles independently
    for key, node in summary.linears.items():
        if key == "lm_head":
            assert node.outputs[0].name == "logits"
            continue
        layer, role = key.split(".")[1:]
        assert f"/layers.{layer}/" in node.name and f"/{role}/" in node.name, (key, node.name)
