"""The layer-wise runner reproduces the whole model one decoder layer at a time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from qcompiler.errors import QCError, UnsupportedModelError
from qcompiler.irutil import load_model
from qcompiler.layerwise import LayerwiseRunner, find_decoder_layers
from qcompiler.runtime import DecoderRunner, session_options
from qcompiler.spec import Role
from tests.passes.calib_helpers import values_of


def _windows(n: int, length: int, vocab: int = 256) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab, (n, length))


@pytest.mark.parametrize("which,spill", [("synthetic_dir", False), ("synthetic_nokv_dir", True)])
def test_layer_by_layer_equals_whole_model(which: str, spill: bool, request: pytest.FixtureRequest,
                                           tmp_path: Path) -> None:
    folder, _ = request.getfixturevalue(which)
    model = load_model(folder / "model.onnx")
    ids = _windows(3, 40)
    bound = 0 if spill else 1 << 30  # 0: every captured value goes to a file in tmp_path
    runner = LayerwiseRunner(model, ids, progress=False, max_memory_bytes=bound, spill_dir=tmp_path)
    assert [layer.index for layer in runner.layers] == [0, 1]
    assert set(runner.layers[0].linears) == {Role.Q, Role.K, Role.V, Role.O, Role.GATE, Role.UP, Role.DOWN}
    runner.start()
    outs = [layer.output.name for layer in runner.layers]
    ref = values_of(model, outs, ids)
    for i in range(len(runner.layers)):
        runner.advance()
        for w in range(3):  # (the residual stream holds a massive activation of ~800)
            assert np.abs(runner.hidden[w] - ref[w][i]).max() <= 1e-5 * np.abs(ref[w][i]).max()
        assert len(list(tmp_path.rglob("*.npy"))) == (3 * (1 + len(runner._side_values)) if spill else 0)
    runner.close()
    assert not list(tmp_path.rglob("*.npy"))


def test_observe_matches_direct_statistics(synthetic_dir) -> None:
    folder, _ = synthetic_dir
    model = load_model(folder / "model.onnx")
    ids = _windows(2, 32)
    runner = LayerwiseRunner(model, ids, progress=False)
    runner.start()
    runner.advance()  # now at layer 1
    down = runner.layers[1].linears[Role.DOWN]
    x_name = down.inputs[0].name
    stats = runner.observe(1, {x_name: ("hessian", "mean_abs_channel")})
    xs = np.concatenate([v[0].reshape(-1, v[0].shape[-1]) for v in values_of(model, [x_name], ids)]).astype(np.float64)
    xtx = xs.T @ xs  # float32 accumulation (the observer) against float64
    assert np.abs(stats[x_name]["hessian"].xtx - xtx).max() <= 1e-5 * np.abs(xtx).max()
    assert stats[x_name]["hessian"].rows == 64
    np.testing.assert_allclose(stats[x_name]["mean_abs_channel"], np.abs(xs).mean(axis=0), rtol=1e-5)


def test_sees_weight_changes_and_checks_its_position(synthetic_dir) -> None:
    folder, _ = synthetic_dir
    model = load_model(folder / "model.onnx")
    runner = LayerwiseRunner(model, _windows(1, 16), progress=False)
    with pytest.raises(QCError, match="call start"):
        runner.advance()
    runner.start()
    o_proj = runner.layers[0].linears[Role.O]
    x = o_proj.outputs[0].name
    before = next(iter(runner.run(0, [x])))[1][0]
    w = o_proj.inputs[1]
    w.const_value = onnx_ir_tensor(w.const_value.numpy() * 2.0, w.name)
    after = next(iter(runner.run(0, [x])))[1][0]
    np.testing.assert_allclose(after, 2.0 * before, rtol=1e-5, atol=1e-5)
    with pytest.raises(QCError, match="held for layer 0, not layer 1"):
        next(iter(runner.run(1, [x])))


def onnx_ir_tensor(arr: np.ndarray, name: str):
    import onnx_ir as ir

    return ir.tensor(arr.astype(np.float32), name=name)


def test_model_without_matmul_is_refused(tmp_path: Path) -> None:
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "m.onnx"))
    with pytest.raises(UnsupportedModelError, match="no MatMul"):
        find_decoder_layers(load_model(tmp_path / "m.onnx"))


@pytest.mark.slow
def test_real_model_layer_by_layer(smollm2_kv: Path) -> None:
    """SmolLM2: mask and rotary tables captured once; 30 layers run alone reproduce the residual stream."""
    model = load_model(smollm2_kv / "model.onnx")
    ids = _windows(1, 24, vocab=40000)
    runner = LayerwiseRunner(model, ids, progress=False)
    assert len(runner.layers) == 30
    runner.start()
    for _ in runner.layers:
        runner.advance()
    # reference: the whole model with the last layer's output as an extra graph output (weights linked, not copied)
    import onnxruntime as ort

    proto = onnx.load(str(smollm2_kv / "model.onnx"), load_external_data=False)
    proto.graph.output.append(onnx.ValueInfoProto(name=runner.layers[-1].output.name))
    so = session_options(optimize=False)
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(smollm2_kv))
    full = DecoderRunner(ort.InferenceSession(proto.SerializeToString(), so), require_logits=False)
    ref = full.session.run([runner.layers[-1].output.name], full.feeds(ids[0]))[0]
    assert np.abs(runner.hidden[0] - ref).max() <= 1e-4 * np.abs(ref).max()
