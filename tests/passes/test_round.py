"""round: learned rounding per decoder layer — the interpreter is exact, the loss falls, the format is RTN's."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from qcompiler.passes.canonicalize import Canonicalize
from qcompiler.passes.quantize_weights import QuantizeWeights
from qcompiler.passes.round import Round

from qcompiler.data import make_windows, read_text, tokenize
from qcompiler.errors import QCError, UnsupportedModelError
from qcompiler.irutil import load_model
from qcompiler.layerwise import LayerwiseRunner
from qcompiler.onnx_torch import TorchGraph, to_torch
from qcompiler.pipeline import make_config, run_passes
from qcompiler.quant.emit import read_dq_weight
from qcompiler.quant.learned_round import LearnedRounding
from qcompiler.quant.numerics import quantize_rtn
from qcompiler.spec import Granularity, QuantSpec, Role, linear_info
from tests.conftest import family_export
from tests.passes.calib_helpers import calib_context, values_of


def _spec(group: int, sym: bool, scale_dtype: str = "fp32") -> QuantSpec:
    gran = Granularity.GROUP if group else Granularity.CHANNEL
    return QuantSpec(bits=4, symmetric=sym, granularity=gran, group_size=group or 128, method="round",
                     scale_dtype=scale_dtype)


@pytest.mark.parametrize("group,sym,scale_dtype", [(32, False, "fp32"), (32, True, "fp32"), (0, False, "fp32"),
                                                   (64, False, "fp32"), (32, False, "fp16"), (32, True, "bf16")])
def test_initial_point_is_exactly_rtn(group: int, sym: bool, scale_dtype: str) -> None:
    """At V = 0, α = β = 1 the learned grid is RTN's, scales rounded to the stored type included."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((72, 24)) * np.exp(rng.standard_normal((1, 24)))).astype(np.float32)  # K = 2.25 × 32
    w[:, 3] = np.abs(w[:, 3])  # a one-signed column: the range is widened to hold 0
    lr = LearnedRounding(w, _spec(group, sym, scale_dtype))
    qw, rtn = lr.quantized(), quantize_rtn(w, _spec(group, sym, scale_dtype))
    np.testing.assert_array_equal(qw.q, rtn.q)
    np.testing.assert_array_equal(qw.scale, rtn.scale)
    if sym:
        assert qw.zero_point is None
    else:
        np.testing.assert_array_equal(qw.zero_point, rtn.zero_point)
    np.testing.assert_array_equal(lr.fake().detach().numpy(), rtn.dequantize())


def test_offsets_and_clipping_move_the_grid_and_stay_in_the_format() -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 16)).astype(np.float32)
    lr = LearnedRounding(w, _spec(32, False), min_clip=0.5)
    target = torch.from_numpy(np.round(w * 2) / 2)  # a target only other roundings/ranges reach
    losses = []
    for t in range(60):
        loss = torch.mean((lr.fake() - target) ** 2)
        loss.backward()
        losses.append(loss.item())
        lr.step(0.02 * (1 - t / 60))
    assert losses[-1] < 0.8 * losses[0]
    v, alpha = lr.v.detach(), lr.alpha.detach()
    assert float(v.abs().max()) <= 0.5 and float(alpha.min()) >= 0.5 and float(alpha.max()) <= 1.0
    qw = lr.quantized()
    assert qw.q.dtype == np.uint8 and qw.q.max() <= 15 and qw.zero_point.dtype == np.uint8
    np.testing.assert_array_equal(qw.dequantize(), lr.fake().detach().numpy())


def _runner(folder, text, n=2, seq=48) -> tuple:
    model = load_model(folder / "model.onnx")
    Canonicalize()(model)
    ids = tokenize(folder, read_text(text))
    runner = LayerwiseRunner(model, make_windows(ids, seq, seq * n).ids, progress=False)
    runner.start()
    return model, runner


def _check_interpreter(model, runner) -> None:
    for layer in runner.layers:
        proto, inputs = runner.layer_graph(layer.index, [layer.output.name])
        graph = TorchGraph.from_model(proto, model)
        for w, (ref,) in runner.run(layer.index, [layer.output.name]):
            feeds = {k: to_torch(v) for k, v in runner.layer_feeds(layer.index, w, inputs).items()}
            got = graph(feeds)[0].numpy()
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
            # the mask / rotary nodes folded once per window: the same result from the residual stream alone
            h = layer.input.name
            static = graph.fold(feeds, {h})
            assert h not in static
            np.testing.assert_array_equal(graph({h: feeds[h]}, static=static)[0].numpy(), got)
        runner.advance()


def test_interpreter_equals_onnxruntime_on_every_layer(synthetic_dir, synthetic_text) -> None:
    folder, _ = synthetic_dir
    model, runner = _runner(folder, synthetic_text)
    _check_interpreter(model, runner)


@pytest.mark.parametrize("family", ["qwen3", "gemma"])
def test_interpreter_equals_onnxruntime_on_families(family: str, synthetic_text) -> None:
    folder = family_export(family) / "onnx"
    model = load_model(folder / "model.onnx")
    Canonicalize()(model)
    rng = np.random.default_rng(0)
    runner = LayerwiseRunner(model, rng.integers(0, 200, (2, 40)), progress=False)
    runner.start()
    _check_interpreter(model, runner)


def test_interpreter_refuses_an_unknown_op_by_name() -> None:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Hardmax", ["x"], ["y"]),
                                    onnx.helper.make_node("Foo", ["x"], ["z"], domain="com.example")],
                                   "g", [x], [y])
    with pytest.raises(UnsupportedModelError, match=r"Hardmax, com.example.Foo not supported"):
        TorchGraph(graph, {})


@pytest.fixture(scope="module")
def rounded(synthetic_dir, synthetic_text):
    folder, _ = synthetic_dir
    rtn, _ = run_passes(load_model(folder / "model.onnx"),
                        [Canonicalize(), QuantizeWeights(make_config(QuantizeWeights, {"group_size": 32}))])
    ctx = calib_context(folder, synthetic_text, samples=6, seq_len=64)
    rnd, _ = run_passes(load_model(folder / "model.onnx"),
                        [Canonicalize(), Round(make_config(Round, {"group_size": 32, "iters": 40, "lr": 0.01}), ctx)])
    tokens = tokenize(folder, read_text(synthetic_text))
    windows = make_windows(tokens[len(tokens) // 2 :], 64, 64 * 4).ids  # held-out half of the text
    return folder, rtn, rnd, ctx, windows


def test_layer_loss_falls_below_rtn(rounded) -> None:
    _, _, _, ctx, _ = rounded
    report = ctx.report["round"]
    assert set(report["layers"]) == {"layers.0", "layers.1"}
    for r in report["layers"].values():
        assert r["learned_kept"] and r["loss"] < 0.9 * r["loss_rtn"], r
        assert r["last_step_loss"] < r["first_step_loss"], r


def test_reconstruction_on_held_out_text_beats_rtn(rounded) -> None:
    """ONNX Runtime on the written models: every layer's output and the logits are closer to float than RTN's."""
    folder, rtn, rnd, _, windows = rounded
    ref_model = load_model(folder / "model.onnx")
    Canonicalize()(ref_model)
    layers = LayerwiseRunner(ref_model, windows[:1], progress=False).layers
    names = [layer.output.name for layer in layers] + ["logits"]
    ref, got_rtn, got_rnd = (values_of(m, names, windows) for m in (ref_model, rtn, rnd))
    for i, name in enumerate(names):
        e_rtn = np.mean([np.mean((r[i] - q[i]) ** 2) for r, q in zip(ref, got_rtn)])
        e_rnd = np.mean([np.mean((r[i] - q[i]) ** 2) for r, q in zip(ref, got_rnd)])
        assert e_rnd < e_rtn, (name, e_rnd, e_rtn)


def test_writes_rtns_format(rounded) -> None:
    _, rtn, rnd, _, _ = rounded

    def forms(model):
        out = {}
        for node in model.graph:
            info = linear_info(node)
            if info is None or info.role == Role.LM_HEAD:
                continue
            dq = read_dq_weight(node.inputs[1])
            assert dq is not None, info.key
            out[info.key] = (dq.bits, dq.symmetric, dq.group_size, dq.q.shape, dq.q.dtype, dq.scale.shape,
                             dq.zero_point.shape, dq.dq.attributes.get_int("block_size"))
        return out

    assert forms(rnd) == forms(rtn) and len(forms(rnd)) == 14
    assert rnd.opset_imports[""] == 21


def test_needs_calibration_data(synthetic_dir) -> None:
    folder, _ = synthetic_dir
    with pytest.raises(QCError, match="round needs calibration data"):
        run_passes(load_model(folder / "model.onnx"), [Canonicalize(), Round()])


def _logit_err(folder, out, ids) -> float:
    from tests.helpers import run_logits

    ref = run_logits(folder, ids)
    return float(np.mean((run_logits(out, ids) - ref) ** 2))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_recipe_on_tiny_families(family: str, synthetic_text, tmp_path, monkeypatch) -> None:
    """w4a16-round end to end (MatMulNBits on the cpu target): closer to float than w4a16-rtn on held-out ids."""
    from qcompiler.quantize import quantize
    from qcompiler.recipes import QuantizeOptions

    monkeypatch.setenv("QC_CALIB_CACHE", str(tmp_path / "calib"))
    folder = family_export(family) / "onnx"
    opts = QuantizeOptions(calib=str(synthetic_text), calib_samples=4, seq_len=48, group_size=32,
                           round_iters=30, round_lr=0.01)
    for recipe in ("w4a16-rtn", "w4a16-round"):
        quantize(folder, tmp_path / recipe, recipe=recipe, options=opts if recipe != "w4a16-rtn" else
                 QuantizeOptions(group_size=32))
    tokens = tokenize(folder, read_text(synthetic_text))
    ids = tokens[len(tokens) // 2 :][:64]  # held-out half of the text
    errs = {r: _logit_err(folder, tmp_path / r, ids) for r in ("w4a16-rtn", "w4a16-round")}
    assert errs["w4a16-round"] < errs["w4a16-rtn"], errs
    import json

    from qcompiler.irutil import op_types

    q = json.loads((tmp_path / "w4a16-round" / "quantization.json").read_text())
    assert q["report"]["round"]["iters"] == 30 and q["options"]["round_iters"] == 30
    assert op_types(load_model(tmp_path / "w4a16-round" / "model.onnx"))["com.microsoft.MatMulNBits"] >= 7


def test_rotate_round_recipe_and_its_options(synthetic_nokv_dir, synthetic_text, tmp_path, monkeypatch) -> None:
    from qcompiler.errors import OptionError
    from qcompiler.option_use import check_options
    from qcompiler.quantize import quantize
    from qcompiler.recipes import QuantizeOptions, get_recipe

    monkeypatch.setenv("QC_CALIB_CACHE", str(tmp_path / "calib"))
    folder, _ = synthetic_nokv_dir
    opts = QuantizeOptions(calib=str(synthetic_text), calib_samples=4, seq_len=64, group_size=32, round_iters=20,
                           round_samples=3)
    assert get_recipe("w4a16-rotate-round").build(opts).startswith("canonicalize,rotate,round{")
    quantize(folder, tmp_path / "rr", recipe="w4a16-rotate-round", options=opts)
    quantize(folder, tmp_path / "rtn", recipe="w4a16-rtn", options=QuantizeOptions(group_size=32))
    tokens = tokenize(folder, read_text(synthetic_text))
    ids = tokens[len(tokens) // 2 :][:64]  # held-out half of the text
    assert _logit_err(folder, tmp_path / "rr", ids) < _logit_err(folder, tmp_path / "rtn", ids)
    import json

    report = json.loads((tmp_path / "rr" / "quantization.json").read_text())["report"]
    assert "rotate" in report and report["round"]["calibration_windows"] == 3
    assert get_recipe("w4a16-rotate-gptq-round").build(opts).startswith("canonicalize,rotate,round{")
    assert ",init=gptq," in get_recipe("w4a16-gptq-round").build(opts)
    check_options("w4a16-gptq-round", opts, {"round_iters", "round_samples"})
    with pytest.raises(OptionError, match="--round-iters is not used by recipe 'w4a16-gptq'"):
        check_options("w4a16-gptq", opts, {"round_iters"})
    with pytest.raises(OptionError, match="--clip is not used by recipe 'w4a16-round'"):
        check_options("w4a16-round", opts, {"clip"})


def test_a_layer_left_float_still_moves_the_float_stream(synthetic_dir, synthetic_text) -> None:
    folder, _ = synthetic_dir
    skip = ":".join(f"layers.0.{r.value}" for r in (Role.Q, Role.K, Role.V, Role.O, Role.GATE, Role.UP, Role.DOWN))
    ctx = calib_context(folder, synthetic_text, samples=3, seq_len=32)
    model, _ = run_passes(load_model(folder / "model.onnx"),
                          [Canonicalize(), Round(make_config(Round, {"group_size": 32, "iters": 5, "skip": skip,
                                                                     "target": "float"}), ctx)])
    assert list(ctx.report["round"]["layers"]) == ["layers.1"]
    kinds = {linear_info(n).key: read_dq_weight(n.inputs[1]) is not None for n in model.graph
             if linear_info(n) is not None and linear_info(n).role != Role.LM_HEAD}
    assert not any(v for k, v in kinds.items() if k.startswith("layers.0.")) and all(
        v for k, v in kinds.items() if k.startswith("layers.1."))
    # layer 0 float: the quantized and the float stream agree at layer 1, so target=float and target=same coincide
    ctx2 = calib_context(folder, synthetic_text, samples=3, seq_len=32)
    run_passes(load_model(folder / "model.onnx"),
               [Canonicalize(), Round(make_config(Round, {"group_size": 32, "iters": 5, "skip": skip,
                                                          "target": "same"}), ctx2)])
    a, b = ctx.report["round"]["layers"]["layers.1"], ctx2.report["round"]["layers"]["layers.1"]
    assert a["loss_rtn"] == pytest.approx(b["loss_rtn"], rel=1e-4)  # (torch's vs ONNX Runtime's float rounding)
    assert a["first_step_loss"] == pytest.approx(b["first_step_loss"], rel=1e-4)


# ---------------------------------------------------------------- init=gptq: learned rounding around GPTQ's solution

@pytest.mark.parametrize("act_order,sym", [(True, False), (False, False), (True, True)])
def test_gptq_start_is_exactly_gptqs_solution(act_order: bool, sym: bool) -> None:
    """From ``W̃`` (the rows as GPTQ rounded them) the learned grid at V = 0 is GPTQ's (q, s, z) exactly, with
    GPTQ's lower output error than RTN's; reset() comes back to it."""
    from qcompiler.quant.gptq import gptq_quantize, gptq_with_start

    rng = np.random.default_rng(3)
    x = rng.standard_normal((512, 96)).astype(np.float32) @ (np.eye(96) + 0.3 * rng.standard_normal((96, 96))).astype(np.float32)
    x[:, 5] *= 3  # correlated inputs, one larger channel
    w = rng.standard_normal((96, 32)).astype(np.float32)
    h = (x.T @ x).astype(np.float64)
    spec = _spec(32, sym)
    qw, start = gptq_with_start(w, h, spec, act_order=act_order)
    if act_order:  # static groups either way: with act-order the same result as the gptq pass's
        np.testing.assert_array_equal(qw.q, gptq_quantize(w, h, spec, act_order=True).q)
    lr = LearnedRounding(w, spec, start=start)
    got = lr.quantized()
    np.testing.assert_array_equal(got.q, qw.q)
    np.testing.assert_array_equal(got.scale, qw.scale)
    if not sym:
        np.testing.assert_array_equal(got.zero_point, qw.zero_point)
    np.testing.assert_array_equal(lr.fake().detach().numpy(), qw.dequantize())
    loss_gptq = float(np.mean((x @ (w - qw.dequantize())) ** 2))
    loss_rtn = float(np.mean((x @ (w - quantize_rtn(w, spec).dequantize())) ** 2))
    assert loss_gptq < 0.6 * loss_rtn, (loss_gptq, loss_rtn)
    lr.fake().sum().backward()  # move away from the start (the offsets alone), then back
    lr.step(0.3, learn_range=False)
    assert not np.array_equal(lr.quantized().q, qw.q)
    assert float(lr.alpha.min()) == float(lr.beta.min()) == 1.0 and lr.alpha.grad is None
    lr.reset()
    np.testing.assert_array_equal(lr.quantized().q, qw.q)


def test_gptq_init_in_the_pass(synthetic_dir, synthetic_text) -> None:
    """round{init=gptq}: at iters = 0 it writes GPTQ's codes (Hessians from the same windows, in torch: all
    but a few codes equal the gptq pass's); each layer starts below RTN's loss and learning ends at or below
    its start; on held-out text (ONNX Runtime) the logits are at least as close to float as GPTQ's."""
    from qcompiler.passes.gptq import GPTQ

    folder, _ = synthetic_dir

    def run(p, opts):
        ctx = calib_context(folder, synthetic_text, samples=6, seq_len=64)
        model, _ = run_passes(load_model(folder / "model.onnx"), [Canonicalize(), p(make_config(p, opts), ctx)])
        return model, ctx

    gptq, _ = run(GPTQ, {"group_size": 32})
    start, ctx0 = run(Round, {"group_size": 32, "init": "gptq", "iters": 0, "tokens": 0})
    learned, ctx1 = run(Round, {"group_size": 32, "init": "gptq", "iters": 40, "lr": 0.01, "tokens": 0})

    def codes(model):
        return {linear_info(n).key: read_dq_weight(n.inputs[1]).q for n in model.graph
                if linear_info(n) is not None and linear_info(n).role != Role.LM_HEAD}

    a, b = codes(gptq), codes(start)
    assert a.keys() == b.keys() and len(a) == 14
    same = sum(int(np.sum(a[k] == b[k])) for k in a) / sum(a[k].size for k in a)
    assert same > 0.99, same
    for r in ctx0.report["round"]["layers"].values():
        assert r["loss"] == r["loss_init"] < r["loss_rtn"], r
    for r in ctx1.report["round"]["layers"].values():
        assert r["loss"] <= r["loss_init"], r
    assert ctx1.report["round"]["init"] == "gptq"
    tokens = tokenize(folder, read_text(synthetic_text))
    windows = make_windows(tokens[len(tokens) // 2 :], 64, 64 * 4).ids
    ref_model = load_model(folder / "model.onnx")
    ref, got_gptq, got_learned = (values_of(m, ["logits"], windows) for m in (ref_model, gptq, learned))
    err = {k: np.mean([np.mean((r[0] - q[0]) ** 2) for r, q in zip(ref, got)])
           for k, got in (("gptq", got_gptq), ("learned", got_learned))}
    assert err["learned"] <= err["gptq"], err


def test_interpreter_computes_only_what_the_wanted_values_need(synthetic_dir, synthetic_text) -> None:
    """outputs=[an inner value]: the same value as the full run, without evaluating the nodes after it."""
    folder, _ = synthetic_dir
    model, runner = _runner(folder, synthetic_text, n=1)
    layer = runner.layers[0]
    x = next(n.inputs[0].name for n in layer.linears.values() if linear_info(n).role == Role.O)
    proto, inputs = runner.layer_graph(0, [layer.output.name])
    graph = TorchGraph.from_model(proto, model)
    feeds = {k: to_torch(v) for k, v in runner.layer_feeds(0, 0, inputs).items()}
    full = graph(feeds, outputs=[x, layer.output.name])
    (part,) = graph(feeds, outputs=[x])
    np.testing.assert_array_equal(part.numpy(), full[0].numpy())
    assert len(graph._not_needed((x,))) >= 15  # o_proj, the residual adds, the norm and the MLP are skipped
