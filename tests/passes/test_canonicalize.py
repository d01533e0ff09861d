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


def test_canonicalize_changes_nothing() -> None:
    proto, _ = build_llama(SyntheticConfig())
    model = ir.serde.deserialize_model(proto)
    result = Canonicalize()(model)
    assert result.modified is False
    assert ir.serde.serialize_model(model).graph.node[5] == proto.graph.node[5]


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
