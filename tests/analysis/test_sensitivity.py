"""Layer reruns and end-to-end checks compute exactly what the model and quantize-weights compute."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from qcompiler.passes.canonicalize import Canonicalize
from qcompiler.passes.quantize_weights import QuantizeWeights

from qcompiler.analysis.candidates import fake_quant_weight, parse_candidate
from qcompiler.analysis.sensitivity import (
    EndToEnd,
    block_gains,
    kl_per_token,
    token_rel_error,
)
from qcompiler.analysis.sessions import PartRunner
from qcompiler.analysis.structure import find_sites
from qcompiler.irutil import load_model
from qcompiler.pipeline import PassContext, make_config, run_passes
from qcompiler.runtime import DecoderRunner, make_session
from qcompiler.spec import Role
from tests.helpers import WINDOW, run_logits

IDS = np.stack([WINDOW, (WINDOW * 7 + 3) % 256])


@pytest.fixture(scope="module")
def model_and_sites(synthetic_dir):
    folder, _ = synthetic_dir
    model = load_model(folder / "model.onnx")
    return model, find_sites(model)


def test_sites_follow_the_residual_stream(model_and_sites) -> None:
    _, sites = model_and_sites
    assert len(sites.layers) == 2 and len(sites.linears) == 14
    l0, l1 = sites.layers
    assert l0.r_out == l1.r_in and None not in (l0.r_in, l0.r_mid, l1.r_mid, l1.r_out)
    assert [label for label, _, _ in sites.residuals()] == ["layers.0.input", "layers.0.mid", "layers.1.input",
                                                             "layers.1.mid", "final"]
    assert all(s.k * s.n == s.params for s in sites.linears.values())


def test_one_layer_rerun_reproduces_the_model(model_and_sites) -> None:
    model, sites = model_and_sites
    layer = sites.layers[1]
    down = layer.by_role(Role.DOWN)
    full = PartRunner(model, [layer.r_in, layer.r_out, down.input])
    r_in, r_out, x_down = full.run(IDS)
    weights = [s.weight for s in layer.linears.values()]
    block = PartRunner(model, [layer.r_out], cuts=[layer.r_in], overridable=weights)
    assert layer.r_in in block.inputs and not any(n.startswith("past_key_values.0") for n in block.inputs)
    (again,) = block.run(IDS, {layer.r_in: r_in})
    np.testing.assert_allclose(again, r_out, rtol=1e-5, atol=1e-4)
    w = down.weight_array()
    (same,) = block.run(IDS, {layer.r_in: r_in}, {down.weight: w})
    np.testing.assert_array_equal(same, again)
    w_hat = fake_quant_weight(w, parse_candidate("w4g32").weight)
    (test,) = block.run(IDS, {layer.r_in: r_in}, {down.weight: w_hat})
    # down_proj adds straight into the residual: its change is exactly x_down·(Ŵ − W)
    np.testing.assert_allclose(test - again, x_down @ (w_hat - w), rtol=1e-3, atol=1e-3)
    assert 0 < token_rel_error(again, test) < 0.1
    full.close()
    block.close()


def test_end_to_end_kl_equals_the_quantize_weights_model(model_and_sites, synthetic_dir, tmp_path: Path) -> None:
    """Swapping Ŵ into the float session == running the model quantize-weights writes."""
    model, sites = model_and_sites
    folder, _ = synthetic_dir
    key = "layers.0.v_proj"
    cand = parse_candidate("w4g32")
    e2e = EndToEnd(model, sites, IDS[:1])
    np.testing.assert_allclose(e2e.ref[0], run_logits(folder, WINDOW, optimize=False), rtol=1e-4, atol=1e-4)
    kl = e2e.kl_of_assignment({key: cand})
    others = ":".join(k for k in sites.linears if k != key)
    q = load_model(folder / "model.onnx")
    cfg = make_config(QuantizeWeights, {"bits": "4", "group_size": "32", "skip": others})
    q, _ = run_passes(q, [Canonicalize(), QuantizeWeights(cfg, PassContext())])
    logits = run_logits(q, WINDOW, tmp_path / "q", optimize=False)
    assert kl == pytest.approx(kl_per_token(e2e.ref[0], logits), rel=1e-3)
    assert kl > 0
    e2e.close()


def test_part_runner_feeds_kv_models(synthetic_dir) -> None:
    folder, _ = synthetic_dir
    runner = PartRunner(load_model(folder / "model.onnx"), ["logits"])
    ref = DecoderRunner(make_session(folder, optimize=False)).logits(WINDOW)
    np.testing.assert_allclose(runner.run(WINDOW)[0][0], ref, rtol=1e-4, atol=1e-4)
    runner.close()


def test_gains_interpolate_layer_output_and_skip_path(model_and_sites) -> None:
    """final = block^(1−β)·skip^β; the last layer's output is the final residual, so there block = skip."""
    model, sites = model_and_sites
    ref = parse_candidate("w4g128")
    names = list(dict.fromkeys([*(ls.r_in for ls in sites.layers), sites.layers[-1].r_out]))
    full = PartRunner(model, names)
    residuals = dict(zip(names, full.run(IDS)))
    full.close()
    by_beta = {beta: block_gains(model, sites, IDS, residuals, ref, progress=False, propagation=beta)
               for beta in (0.0, 0.5, 1.0)}
    assert set(by_beta[0.5]) == set(sites.linears)
    for key, g in by_beta[0.5].items():
        assert g["final"] == pytest.approx(g["block"] ** 0.5 * g["skip"] ** 0.5, rel=1e-9)
        assert g["gain"] == pytest.approx(g["final"] / g["local"], rel=1e-12)
        assert by_beta[0.0][key]["final"] == pytest.approx(g["block"], rel=1e-9)
        assert by_beta[1.0][key]["final"] == pytest.approx(g["skip"], rel=1e-9)
        if sites.linears[key].layer == 1:
            assert g["skip"] == pytest.approx(g["block"], rel=1e-9)
        else:  # layer 0's residual is smaller than the final one: the skip view discounts it
            assert g["skip"] < g["block"]
