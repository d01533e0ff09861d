"""Property tests (hypothesis): the algebra the quantizer relies on, for random inputs.

* round to nearest: ``|W − Ŵ| ≤ s/2`` inside the (clipped) range, zero exact, codes in range;
* MatMulNBits packing: pack → unpack is the dequantized weight, bit for bit; ORT agrees;
* fold-zero-point: ``s_x s_w (X_q − z_x)·W_q = s_x s_w X_q·W_q − s_x s_w z_x colsum(W_q)``, in numpy
  and through the pass on a random static W8A8 graph in ONNX Runtime;
* smooth-scale: ``Y = (X·diag(s)⁻¹)(diag(s)·W)`` folded by the pass's own functions
  (``find_upstream``, ``smoothing_scales``, ``apply_input_scale``) into an RMSNorm γ, a
  LayerNorm's γ and β, Gemma's ``(1 + w)``, a previous linear (up → down through the SiLU
  product, with bias) and v → o under GQA head tying, checked in ONNX Runtime, and
  through the whole pass on seeded synthetic models (float logits unchanged).
"""

from __future__ import annotations

import os

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper, numpy_helper

from qcompiler.quant.numerics import expand_groups, quantize_rtn
from qcompiler.quant.packing import (
    _pack_nibbles,
    _unpack_nibbles,
    matmulnbits_block_size,
    pack_matmulnbits,
    unpack_matmulnbits,
)
from qcompiler.spec import Granularity, LinearInfo, QuantSpec, Role, set_linear_info

#: The same examples on every run (reproducible CI); QC_HYPOTHESIS_EXPLORE=1 draws new ones.
DERANDOMIZE = not os.environ.get("QC_HYPOTHESIS_EXPLORE")
FAST = settings(max_examples=150, deadline=None, derandomize=DERANDOMIZE, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=12, deadline=None, derandomize=DERANDOMIZE, suppress_health_check=[HealthCheck.too_slow])


def _spec(bits: int, sym: bool, group: int) -> QuantSpec:
    if group == 0:
        return QuantSpec(bits=bits, symmetric=sym, granularity=Granularity.CHANNEL)
    return QuantSpec(bits=bits, symmetric=sym, granularity=Granularity.GROUP, group_size=group)


@st.composite
def weight_matrices(draw: st.DrawFn, max_k: int = 300, max_n: int = 6) -> np.ndarray:
    """Weights from several distributions, including one-signed, constant and outlier-heavy groups."""
    k, n = draw(st.integers(1, max_k)), draw(st.integers(1, max_n))
    kind = draw(st.sampled_from(["normal", "positive", "negative", "constant", "outliers", "sparse", "tiny"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    mag = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    w = rng.standard_normal((k, n)) * mag
    if kind == "positive":
        w = np.abs(w) + mag
    elif kind == "negative":
        w = -np.abs(w) - 0.5 * mag
    elif kind == "constant":
        w = np.full((k, n), draw(st.floats(-100, 100, allow_subnormal=False)))
    elif kind == "outliers":
        w[rng.integers(0, k, size=max(1, k // 50)), rng.integers(0, n)] *= 300.0
    elif kind == "sparse":
        w[rng.random((k, n)) < 0.7] = 0.0
    elif kind == "tiny":
        w = w * 1e-6
    return w.astype(np.float32)


def _check_rtn(w: np.ndarray, bits: int, sym: bool, group: int, clip: float = 1.0) -> None:
    spec = _spec(bits, sym, group)
    qw = quantize_rtn(w, spec, clip_ratio=clip)
    k = w.shape[0]
    g = qw.group_size
    deq = qw.dequantize().astype(np.float64)
    s = expand_groups(qw.scale.astype(np.float64), g, k)
    wd = w.astype(np.float64)
    # codes on the integer grid of the dtype
    if sym:
        assert qw.zero_point is None and qw.q.dtype == np.int8
        assert qw.q.min() >= -(2 ** (bits - 1)) and qw.q.max() <= 2 ** (bits - 1) - 1
    else:
        assert qw.q.dtype == np.uint8 and int(qw.q.max()) <= 2**bits - 1
        assert int(qw.zero_point.max()) <= 2**bits - 1
    assert np.isfinite(qw.scale).all() and (qw.scale > 0).all()
    # the range each element's group covers (clipped, widened to hold 0 for asym)
    lo = expand_groups(np.minimum.reduceat(wd, np.arange(0, k, g), axis=0), g, k) * clip
    hi = expand_groups(np.maximum.reduceat(wd, np.arange(0, k, g), axis=0), g, k) * clip
    if sym:
        amax = np.maximum(np.abs(lo), np.abs(hi))
        lo, hi = -amax, amax
    else:
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    tol = s * (0.5 + 2e-5) + 1e-7 * np.abs(wd)
    err = np.abs(wd - deq)
    inside = (wd >= lo) & (wd <= hi)
    assert (err[inside] <= tol[inside]).all(), f"max err/step {np.max(err[inside] / s[inside]):.4f} inside the range"
    outside = ~inside  # clipped: within half a step of the nearest end of the range
    dist = np.maximum(lo - wd, wd - hi)
    assert (err[outside] <= dist[outside] + tol[outside]).all()
    # zero is on every grid: zeros come back exactly
    assert (deq[wd == 0.0] == 0.0).all()


@FAST
@given(w=weight_matrices(), bits=st.sampled_from([2, 3, 4, 8]), sym=st.booleans(),
       group=st.sampled_from([0, 2, 4, 16, 32, 64, 128]))
def test_rtn_error_within_half_step(w: np.ndarray, bits: int, sym: bool, group: int) -> None:
    _check_rtn(w, bits, sym, group)


@FAST
@given(w=hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, max_side=40),
                    elements=st.floats(-1e4, 1e4, width=32, allow_subnormal=False)),
       bits=st.sampled_from([2, 4, 8]), sym=st.booleans(), group=st.sampled_from([0, 2, 8, 32]),
       clip=st.floats(0.5, 1.0))
def test_rtn_error_bound_on_raw_floats_and_clipping(w: np.ndarray, bits: int, sym: bool, group: int,
                                                    clip: float) -> None:
    _check_rtn(w, bits, sym, group, clip)


def test_rtn_one_signed_group_regression() -> None:
    """A group with values in [5, 6] once came back as [0, 1] (zero point clamped): error 5."""
    w = np.linspace(5.0, 6.0, 32, dtype=np.float32).reshape(32, 1)
    for sym in (False, True):
        qw = quantize_rtn(w, _spec(4, sym, 32))
        assert np.abs(qw.dequantize() - w).max() <= qw.scale.max() / 2 + 1e-6


# ----------------------------------------------------------------------------- packing


@FAST
@given(w=weight_matrices(max_n=8), bits=st.sampled_from([4, 8]), sym=st.booleans(),
       group=st.sampled_from([0, 16, 32, 64, 128]))
def test_matmulnbits_pack_roundtrip(w: np.ndarray, bits: int, sym: bool, group: int) -> None:
    k, n = w.shape
    qw = quantize_rtn(w, _spec(bits, sym, group))
    block = matmulnbits_block_size(qw.group_size, k)
    packed, scales, zps = pack_matmulnbits(qw.q, qw.scale, qw.zero_point, bits, block, qw.group_size)
    nb = -(-k // block)
    assert packed.dtype == np.uint8 and packed.shape == (n, nb, block * bits // 8)
    assert scales.shape == (n * nb,) and (zps is None) == sym
    np.testing.assert_array_equal(unpack_matmulnbits(packed, scales, zps, k, n, bits, block), qw.dequantize())


@FAST
@given(u=hnp.arrays(np.uint8, st.tuples(st.integers(1, 5), st.integers(1, 40).map(lambda x: 2 * x)),
                    elements=st.integers(0, 15)))
def test_nibbles_roundtrip(u: np.ndarray) -> None:
    p = _pack_nibbles(u)
    assert p.shape[-1] * 2 == u.shape[-1]
    np.testing.assert_array_equal(_unpack_nibbles(p), u)


@SLOW
@given(w=weight_matrices(max_k=160, max_n=12), sym=st.booleans(), group=st.sampled_from([0, 16, 32, 64]),
       seed=st.integers(0, 1000))
def test_matmulnbits_in_onnxruntime_matches_dequantized(w: np.ndarray, sym: bool, group: int, seed: int) -> None:
    k, n = w.shape
    qw = quantize_rtn(w, _spec(4, sym, group))
    block = matmulnbits_block_size(qw.group_size, k)
    packed, scales, zps = pack_matmulnbits(qw.q, qw.scale, qw.zero_point, 4, block, qw.group_size)
    inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales.astype(np.float32), "S")]
    inputs = ["x", "B", "S"]
    if zps is not None:
        inits.append(numpy_helper.from_array(zps, "Z"))
        inputs.append("Z")
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=block)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(seed).standard_normal((3, k)).astype(np.float32)
    ref = x.astype(np.float64) @ qw.dequantize().astype(np.float64)
    got = sess.run(None, {"x": x})[0]
    assert np.abs(got - ref).max() <= 1e-4 * max(np.abs(ref).max(), 1e-3)


# ----------------------------------------------------------------------------- fold-zero-point


@st.composite
def static_w8a8(draw: st.DrawFn) -> dict:
    t, k, n = draw(st.integers(1, 8)), draw(st.integers(1, 96)), draw(st.integers(1, 16))
    dtype = draw(st.sampled_from(["uint8", "int8"]))
    lo, hi = (0, 255) if dtype == "uint8" else (-128, 127)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return {
        "x_q": rng.integers(lo, hi + 1, (t, k)),
        "z_x": draw(st.integers(lo, hi)),
        "w_q": rng.integers(-127, 128, (k, n)).astype(np.int8),
        "s_x": draw(st.floats(1e-4, 10.0)),
        "s_w": (rng.random(n) * 0.1 + 1e-4).astype(np.float32),
        "dtype": dtype,
        "rng": rng,
    }


@FAST
@given(case=static_w8a8(), with_bias=st.booleans())
def test_fold_zero_point_algebra(case: dict, with_bias: bool) -> None:
    from qcompiler.passes.fold_zero_point import folded_bias

    x_q, z_x, w_q, s_x, s_w = case["x_q"], case["z_x"], case["w_q"], case["s_x"], case["s_w"]
    b = case["rng"].standard_normal(w_q.shape[1]).astype(np.float32) if with_bias else None
    # unfolded: subtract the zero point from every element, then the GEMM (exact in int64)
    acc = (x_q.astype(np.int64) - z_x) @ w_q.astype(np.int64)
    ref = s_x * s_w.astype(np.float64) * acc + (0.0 if b is None else b.astype(np.float64))
    # folded: integer GEMM on the raw codes + a constant bias (the pass's helper)
    raw = x_q.astype(np.int64) @ w_q.astype(np.int64)
    assert np.abs(raw).max(initial=0) < 2**31  # exact in int32 as the kernel computes it
    got = s_x * s_w.astype(np.float64) * raw + folded_bias(w_q, s_w, s_x, z_x, b).astype(np.float64)
    assert np.abs(got - ref).max() <= 1e-5 * max(np.abs(ref).max(), 1.0)


@SLOW
@given(case=static_w8a8(), form=st.sampled_from(["msft", "onnx"]))
def test_fold_zero_point_pass_matches_qdq_in_onnxruntime(case: dict, form: str, tmp_path_factory) -> None:
    from qcompiler.pipeline import parse_pipeline, run_passes
    from qcompiler.quant.w8a8 import emit_int8_weight, emit_static_activation

    k, n = case["w_q"].shape
    x_in = ir.Value(name="x", shape=ir.Shape([None, k]), type=ir.TensorType(ir.DataType.FLOAT))
    w_val = ir.Value(name="w", shape=ir.Shape([k, n]), type=ir.TensorType(ir.DataType.FLOAT))
    w_val.const_value = ir.tensor(np.zeros((k, n), np.float32), name="w")
    mm = ir.node("MatMul", [x_in, w_val], name="mm")
    mm.outputs[0].name = "y"
    mm.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([x_in], [mm.outputs[0]], nodes=[mm], initializers=[w_val], opset_imports={"": 21})
    model = ir.Model(graph, ir_version=10)
    emit_int8_weight(graph, mm, case["w_q"], case["s_w"], "lin")
    emit_static_activation(graph, mm, case["s_x"], case["z_x"], case["dtype"], "lin")
    # float input whose quantized codes are the drawn x_q
    x = ((case["x_q"] - case["z_x"]) * case["s_x"]).astype(np.float32)

    def run(m: ir.Model) -> np.ndarray:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(ir.serde.serialize_model(m).SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
        return sess.run(None, {"x": x})[0]

    before = run(model)
    model, _ = run_passes(model, parse_pipeline(f"fold-zero-point{{form={form}}}"), check=True)
    assert not any(node.op_type == "DequantizeLinear" and node.inputs[0].name == "x" for node in model.graph)
    after = run(model)
    assert np.abs(after - before).max() <= 1e-5 * max(np.abs(before).max(), 1.0)


# ----------------------------------------------------------------------------- smooth-scale


_F32 = ir.TensorType(ir.DataType.FLOAT)


def _const_value(name: str, arr: np.ndarray) -> ir.Value:
    v = ir.Value(name=name, shape=ir.Shape(arr.shape), type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)))
    v.const_value = ir.tensor(np.ascontiguousarray(arr), name=name)
    return v


class _Net:
    """A small ir graph built node by node, run in ONNX Runtime (no optimizations)."""

    def __init__(self, k: int) -> None:
        self.x = ir.Value(name="x", shape=ir.Shape([None, k]), type=_F32)
        self.nodes: list[ir.Node] = []
        self.inits: list[ir.Value] = []

    def const(self, name: str, arr: np.ndarray, dtype: type = np.float32) -> ir.Value:
        self.inits.append(_const_value(name, np.asarray(arr, dtype)))
        return self.inits[-1]

    def op(self, op: str, inputs: list, **attrs) -> ir.Value:
        node = ir.node(op, inputs, attrs or None, name=f"n{len(self.nodes)}")
        node.outputs[0].name = f"v{len(self.nodes)}"
        node.outputs[0].type = _F32
        self.nodes.append(node)
        return node.outputs[0]

    def linear(self, x: ir.Value, w: np.ndarray, role: Role | None = None) -> ir.Value:
        y = self.op("MatMul", [x, self.const(f"w{len(self.inits)}", w)])
        if role is not None:
            set_linear_info(y.producer(), LinearInfo(0, role))
        return y

    def model(self, y: ir.Value) -> ir.Model:
        graph = ir.Graph([self.x], [y], nodes=self.nodes, initializers=self.inits, opset_imports={"": 21})
        return ir.Model(graph, ir_version=10)


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _norm(net: _Net, form: str, gamma: np.ndarray, beta: np.ndarray) -> ir.Value:
    """``form``: ``rmsnorm`` (γ ⊙ x/rms(x)), ``layernorm`` (LayerNormalization γ, β), ``1+w`` (Gemma)."""
    if form == "layernorm":
        return net.op("LayerNormalization", [net.x, net.const("gamma", gamma), net.const("beta", beta)],
                      axis=-1, epsilon=1e-5)
    ms = net.op("ReduceMean", [net.op("Mul", [net.x, net.x]), net.const("axes", [-1], np.int64)], keepdims=1)
    inv = net.op("Reciprocal", [net.op("Sqrt", [net.op("Add", [ms, net.const("eps", np.array(1e-5))])])])
    normed = net.op("Mul", [net.x, inv])
    g = net.op("Add", [net.const("one", np.array(1.0)), net.const("w", gamma - 1)]) if form == "1+w" \
        else net.const("gamma", gamma)
    return net.op("Mul", [normed, g])


@st.composite
def smooth_case(draw: st.DrawFn) -> dict:
    t, k, n = draw(st.integers(1, 16)), draw(st.integers(2, 64)), draw(st.integers(1, 32))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    gamma = (1 + 0.2 * rng.standard_normal(k)).astype(np.float32)
    gamma[rng.integers(0, k, size=max(1, k // 16))] *= draw(st.sampled_from([1.0, 20.0]))  # outlier channels
    return {"x": rng.standard_normal((t, k)).astype(np.float32), "gamma": gamma,
            "beta": (0.1 * rng.standard_normal(k)).astype(np.float32),
            "w": (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32),
            "alpha": draw(st.floats(0.0, 1.0)), "pow2": draw(st.booleans()), "rng": rng}


def _close(ref: np.ndarray, got: np.ndarray, rtol: float = 1e-5) -> None:
    assert np.abs(ref - got).max() <= rtol * max(np.abs(ref).max(), 1e-6)


def _smooth_group(model: ir.Model, group, a: np.ndarray, alpha: float, pow2: bool):
    """smooth-scale's own steps: find the upstream, SmoothQuant s (tied), fold 1/s upstream and s into W."""
    from qcompiler.passes._channels import (
        LinearGroup,
        apply_input_scale,
        channel_absmax,
        find_upstream,
        set_weight,
        tie,
    )

    from qcompiler.quant.smoothing import smoothing_scales

    up = find_upstream(group)
    w_max = tie(np.max([channel_absmax(w) for w in group.weights()], axis=0), up)
    s = smoothing_scales(tie(a, up), w_max, alpha, pow2)
    apply_input_scale(model.graph, group, up, 1.0 / s, "t")
    for node in group.linears:
        set_weight(model.graph, node, LinearGroup.weight(node).astype(np.float64) * s[:, None])
    return up


@FAST
@given(case=smooth_case(), form=st.sampled_from(["rmsnorm", "layernorm", "1+w"]))
def test_smooth_scale_into_norm(case: dict, form: str) -> None:
    """``norm(x)·W = (norm(x)·diag(s)⁻¹)·(diag(s)·W)`` with ``diag(s)⁻¹`` folded into the norm
    (RMSNorm ``γ/s``; LayerNorm ``γ/s, β/s``; Gemma ``w ← (1 + w)/s − 1``) by the pass's own code."""
    from qcompiler.passes._channels import LinearGroup

    x, w = case["x"], case["w"]
    net = _Net(x.shape[1])
    xn = _norm(net, form, case["gamma"], case["beta"])
    model = net.model(net.linear(xn, w, Role.Q))
    ref = _run(model, x)
    mm = model.graph.node(len(net.nodes) - 1)
    a = np.abs(_norm_out(model, xn, x)).max(axis=0)
    up = _smooth_group(model, LinearGroup(xn, [mm], 0, (Role.Q,)), a, case["alpha"], case["pow2"])
    assert up.kind == "norm" and up.norm.form == {"rmsnorm": "mul", "layernorm": "layernorm", "1+w": "(1 + w)"}[form]
    assert not any(n.name == "t_channel_scale_Mul" for n in model.graph)
    _close(ref, _run(model, x), 1e-5 if case["pow2"] or form == "rmsnorm" else 1e-4)


def _norm_out(model: ir.Model, value: ir.Value, x: np.ndarray) -> np.ndarray:
    """``value`` of ``model`` on ``x`` (the model's output temporarily redirected)."""
    out = list(model.graph.outputs)
    model.graph.outputs[:] = [value]
    try:
        return _run(model, x)
    finally:
        model.graph.outputs[:] = out


@FAST
@given(case=smooth_case(), inter=st.integers(2, 48), bias=st.booleans())
def test_smooth_scale_into_previous_linear(case: dict, inter: int, bias: bool) -> None:
    """up → down through the SiLU product: ``silu(x·Wg) ⊙ (x·Wu + b)·diag(s)⁻¹ · diag(s)·Wd`` is unchanged,
    ``diag(s)⁻¹`` folded into up_proj's columns and bias by the pass's own code."""
    from qcompiler.passes._channels import LinearGroup

    rng, x = case["rng"], case["x"]
    k = x.shape[1]
    wg, wu = (rng.standard_normal((2, k, inter)) / np.sqrt(k)).astype(np.float32)
    wd = (rng.standard_normal((inter, k)) / np.sqrt(inter)).astype(np.float32)
    net = _Net(k)
    gate = net.linear(net.x, wg, Role.GATE)
    up = net.linear(net.x, wu, Role.UP)
    if bias:
        up = net.op("Add", [up, net.const("b_up", rng.standard_normal(inter))])
    prod = net.op("Mul", [net.op("Mul", [gate, net.op("Sigmoid", [gate])]), up])
    model = net.model(net.linear(prod, wd, Role.DOWN))
    ref = _run(model, x)
    down = model.graph.node(len(net.nodes) - 1)
    a = np.abs(_norm_out(model, prod, x)).max(axis=0)
    found = _smooth_group(model, LinearGroup(prod, [down], 0, (Role.DOWN,)), a, case["alpha"], case["pow2"])
    assert found.kind == "linear" and (found.prev_bias is not None) == bias
    _close(ref, _run(model, x), 1e-4)


@settings(max_examples=6, deadline=None, derandomize=DERANDOMIZE,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), kv_heads=st.sampled_from([1, 2, 4]), n_rep=st.sampled_from([1, 2, 3]),
       head_dim=st.sampled_from([4, 8]), alpha=st.floats(0.0, 1.0))
def test_smooth_scale_v_to_o_tied_across_gqa_heads(seed: int, kv_heads: int, n_rep: int, head_dim: int,
                                                   alpha: float, tmp_path_factory) -> None:
    """``attn_h = P_h·V_{h // n_rep}``: V's column (g, d) scaled by 1/s[g, d] scales o's input
    channel (h, d) by 1/s[h // n_rep, d] for every query head h; the pass's channel map and
    tie sets say so, and folding the tied s into v_proj / o_proj keeps a synthetic GQA model's logits."""
    from qcompiler.models.synthetic import SyntheticConfig, build_model_dir
    from qcompiler.passes._channels import find_upstream, linear_groups
    from qcompiler.passes.canonicalize import canonical_summary

    from qcompiler.irutil import load_model
    from tests.helpers import WINDOW, run_logits

    heads = kv_heads * n_rep
    cfg = SyntheticConfig(layers=1, hidden=heads * head_dim, heads=heads, kv_heads=kv_heads, intermediate=32,
                          seed=seed % 1000, kv_cache=False, outlier_dims=(), massive_dim=None, super_weight=None)
    work = tmp_path_factory.mktemp("gqa")
    folder, _ = build_model_dir(work / "m", cfg)
    model = load_model(folder / "model.onnx")
    canonical_summary(model)
    (group,) = [g for g in linear_groups(model) if g.roles == (Role.O,)]
    up = find_upstream(group)
    c = np.arange(heads * head_dim)
    assert up.kind == "linear" and np.array_equal(up.colmap, (c // head_dim // n_rep) * head_dim + c % head_dim)
    a = np.random.default_rng(seed).uniform(0.01, 10.0, heads * head_dim)  # any statistics: the fold is exact
    _smooth_group(model, group, a, alpha, pow2=False)
    ref = run_logits(folder, WINDOW, optimize=False)
    _close(ref, run_logits(model, WINDOW, work / "smoothed", optimize=False), 1e-4)


@settings(max_examples=4, deadline=None, derandomize=DERANDOMIZE,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(seed=st.integers(0, 1000), alpha=st.sampled_from([0.0, 0.3, 0.5, 0.85, 1.0]))
def test_smooth_scale_pass_keeps_float_logits(seed: int, alpha: float, synthetic_text, tmp_path_factory) -> None:
    from qcompiler.models.synthetic import SyntheticConfig, build_model_dir

    from qcompiler.calibrate import CalibConfig, Calibrator
    from qcompiler.irutil import load_model
    from qcompiler.pipeline import PassContext, parse_pipeline, run_passes
    from qcompiler.recipes import QuantizeOptions
    from tests.helpers import WINDOW, run_logits

    work = tmp_path_factory.mktemp("smooth")
    folder, _ = build_model_dir(work / "m", SyntheticConfig(seed=seed, kv_cache=False))
    opts = QuantizeOptions(calib=str(synthetic_text), calib_samples=4, seq_len=32)
    ctx = PassContext(calibrate=Calibrator(folder, CalibConfig.from_options(opts, cache_dir=str(work / "cache"))))
    model, _ = run_passes(load_model(folder / "model.onnx"),
                          parse_pipeline(f"canonicalize,smooth-scale{{alpha={alpha},search=false}}", ctx))
    ref = run_logits(folder, WINDOW, optimize=False)
    got = run_logits(model, WINDOW, work / "smoothed", optimize=False)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


