"""The CPU kernels of every qcompiler op, loaded into ONNX Runtime CPU, against the numpy reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qcompiler.ops import reference

ISAS = ("avx512vnni", "avx2", "scalar")


def op_model(op: str, k: int, n: int, w: np.ndarray, scale: np.ndarray, bias: np.ndarray | None,
             idx: np.ndarray | None, w_out: np.ndarray | None, dtype: type, rank: int = 2) -> bytes:
    t = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    inits = [numpy_helper.from_array(w, "B"), numpy_helper.from_array(scale, "s")]
    names = ["x", "B", "s"]
    if op == "W8A8OutlierMatMul":
        inits += [numpy_helper.from_array(idx, "idx"), numpy_helper.from_array(w_out, "w_out")]
        names += ["idx", "w_out"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "bias"))
        names.append("bias")
    lead = ["b", "t"][: rank - 1] if rank > 1 else []
    graph = helper.make_graph(
        [helper.make_node(op, names, ["y"], domain="qcompiler")], "g",
        [helper.make_tensor_value_info("x", t, [*lead, k])], [helper.make_tensor_value_info("y", t, [*lead, n])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("qcompiler", 1)])
    return model.SerializeToString()


def session(lib: Path, model: bytes, threads: int = 1) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.register_custom_ops_library(str(lib))
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def case(rng: np.random.Generator, lead: tuple[int, ...], k: int, n: int, r: int, bias: bool, dtype: type):
    x = (rng.standard_normal((*lead, k)) * rng.uniform(0.1, 8)).astype(dtype)
    if r:  # outlier channels: large in x
        idx = rng.choice(k, size=r, replace=False).astype(np.int64)
        x[..., idx] *= 40
    else:
        idx = None
    w = rng.integers(-127, 128, size=(n, k)).astype(np.int8)
    if idx is not None:
        w[:, idx] = 0
    scale = (rng.uniform(0.2, 2.0, n) / 127).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    w_out = rng.standard_normal((r, n)).astype(np.float32) if r else None
    return x, w, scale, b, idx, w_out


def run_case(lib: Path, x, w, scale, b, idx, w_out, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    k, n = x.shape[-1], w.shape[0]
    op = "W8A8OutlierMatMul" if idx is not None else "W8A8MatMul"
    sess = session(lib, op_model(op, k, n, w, scale, b, idx, w_out, x.dtype.type, rank=x.ndim), threads)
    y = sess.run(None, {"x": x})[0]
    ref = reference.w8a8_matmul(x, w, scale, b, idx, w_out)
    return y, ref


def assert_matches(y: np.ndarray, ref: np.ndarray) -> None:
    assert y.shape == ref.shape
    if y.dtype == np.float16:
        np.testing.assert_allclose(y.astype(np.float32), ref.astype(np.float16).astype(np.float32),
                                   rtol=1e-3, atol=1e-3 * float(np.abs(ref).max()))
    else:
        assert y.dtype == np.float32
        err = float(np.abs(y - ref).max()) / max(float(np.abs(ref).max()), 1e-30)
        assert err <= 1e-5, f"relative error {err:.2e}"


SHAPES = [  # (leading dims, K, N, outliers)
    ((1,), 1, 1, 0),
    ((1,), 5, 3, 0),
    ((7,), 67, 33, 0),
    ((3, 5), 129, 70, 0),
    ((16,), 64, 64, 0),
    ((33,), 200, 19, 0),
    ((2, 9), 577, 130, 0),
    ((5,), 67, 33, 3),
    ((4, 3), 130, 65, 7),
    ((1,), 64, 128, 1),
]


@pytest.mark.parametrize("lead,k,n,r", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_float32_matches_reference(ops_lib: Path, lead, k, n, r, bias) -> None:
    rng = np.random.default_rng(hash((lead, k, n, r, bias)) % 2**32)
    y, ref = run_case(ops_lib, *case(rng, lead, k, n, r, bias, np.float32))
    assert_matches(y, ref)


@pytest.mark.parametrize("lead,k,n,r", SHAPES[1::2])
def test_float16_matches_reference(ops_lib: Path, lead, k, n, r) -> None:
    rng = np.random.default_rng(k * 1000 + n)
    y, ref = run_case(ops_lib, *case(rng, lead, k, n, r, True, np.float16))
    assert y.dtype == np.float16
    assert_matches(y, ref)


@pytest.mark.parametrize("isa", ISAS)
def test_every_cpu_code_path(ops_lib: Path, monkeypatch: pytest.MonkeyPatch, isa: str) -> None:
    """QC_OPS_ISA caps the GEMM path at registration: each path gives the same exact result."""
    monkeypatch.setenv("QC_OPS_ISA", isa)
    rng = np.random.default_rng(7)
    for lead, k, n, r in [((37,), 259, 45, 0), ((6,), 70, 17, 2), ((1,), 1, 9, 0)]:
        y, ref = run_case(ops_lib, *case(rng, lead, k, n, r, False, np.float32))
        assert_matches(y, ref)


def test_threads_give_identical_results(ops_lib: Path) -> None:
    rng = np.random.default_rng(3)
    args = case(rng, (50,), 300, 150, 4, True, np.float32)
    y1, _ = run_case(ops_lib, *args, threads=1)
    y2, _ = run_case(ops_lib, *args, threads=2)
    np.testing.assert_array_equal(y1, y2)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=st.integers(1, 40), k=st.integers(1, 300), n=st.integers(1, 80), r=st.integers(0, 4),
       bias=st.booleans(), seed=st.integers(0, 2**31))
def test_random_shapes(ops_lib: Path, m: int, k: int, n: int, r: int, bias: bool, seed: int) -> None:
    r = min(r, k)
    rng = np.random.default_rng(seed)
    y, ref = run_case(ops_lib, *case(rng, (m,), k, n, r, bias, np.float32))
    assert_matches(y, ref)


def test_quantization_is_exact(ops_lib: Path) -> None:
    """With B = identity, Y = q·s·b_scale exposes the kernel's quantization: equal to numpy's bit for bit."""
    rng = np.random.default_rng(11)
    k = 97
    x = (rng.standard_normal((13, k)) * 5).astype(np.float32)
    x[0, :4] = [0.5, -0.5, 1.5, 2.5]  # ties round to even
    w = np.eye(k, dtype=np.int8)
    scale = np.ones(k, np.float32)
    y = session(ops_lib, op_model("W8A8MatMul", k, k, w, scale, None, None, None, np.float32)).run(None, {"x": x})[0]
    q, s = reference.quantize_rows(x)
    np.testing.assert_array_equal(y, q.astype(np.float32) * s[:, None])
    zero = np.zeros((2, k), np.float32)  # all-zero rows: scale = 1e-8/127, y = 0
    y0 = session(ops_lib, op_model("W8A8MatMul", k, k, w, scale, None, None, None, np.float32)).run(None, {"x": zero})
    assert not np.any(y0[0])


def test_empty_rows(ops_lib: Path) -> None:
    rng = np.random.default_rng(0)
    _, w, scale, b, _, _ = case(rng, (1,), 16, 8, 0, True, np.float32)
    sess = session(ops_lib, op_model("W8A8MatMul", 16, 8, w, scale, b, None, None, np.float32))
    assert sess.run(None, {"x": np.zeros((0, 16), np.float32)})[0].shape == (0, 8)


@pytest.mark.parametrize("what", ["k_mismatch", "bad_index"])
def test_bad_inputs_raise_clear_errors(ops_lib: Path, what: str) -> None:
    rng = np.random.default_rng(0)
    if what == "k_mismatch":
        x, w, scale, b, idx, wo = case(rng, (3,), 16, 8, 0, False, np.float32)
        model = op_model("W8A8MatMul", 16, 8, w[:, :12].copy(), scale, b, idx, wo, np.float32)
        with pytest.raises(Exception, match=r"A's last dimension is 16 but B is \[8, 12\]"):
            session(ops_lib, model).run(None, {"x": x})
    else:
        x, w, scale, b, _, wo = case(rng, (3,), 16, 8, 2, False, np.float32)
        idx = np.array([1, 99], np.int64)
        with pytest.raises(Exception, match="outlier index 99 is outside"):
            session(ops_lib, op_model("W8A8OutlierMatMul", 16, 8, w, scale, b, idx, wo, np.float32)).run(None, {"x": x})


def test_model_is_valid_onnx(ops_lib: Path) -> None:
    """A model using the ops passes onnx.checker (custom domain declared in opset_import)."""
    rng = np.random.default_rng(0)
    _, w, scale, b, idx, wo = case(rng, (3,), 16, 8, 2, True, np.float32)
    onnx.checker.check_model(onnx.load_from_string(op_model("W8A8OutlierMatMul", 16, 8, w, scale, b, idx, wo,
                                                            np.float32)))


def bf16_model(op: str, k: int, n: int, w: np.ndarray, scale: np.ndarray, bias: np.ndarray | None,
               idx: np.ndarray | None, w_out: np.ndarray | None, rank: int) -> bytes:
    """The op on bf16 ``A``/``Y`` between Casts (ONNX Runtime's Python API feeds no bf16 arrays)."""
    proto = onnx.load_from_string(op_model(op, k, n, w, scale, bias, idx, w_out, np.float32, rank))
    g = proto.graph
    g.node[0].input[0], g.node[0].output[0] = "x_bf16", "y_bf16"
    g.node.insert(0, helper.make_node("Cast", ["x"], ["x_bf16"], to=TensorProto.BFLOAT16))
    g.node.append(helper.make_node("Cast", ["y_bf16"], ["y"], to=TensorProto.FLOAT))
    return proto.SerializeToString()


@pytest.mark.parametrize("lead,k,n,r", SHAPES[1::2])
def test_bfloat16_matches_reference(ops_lib: Path, lead, k, n, r) -> None:
    """bf16 A and Y (the cuda target of a bf16 graph): the reference on A rounded to bf16, Y rounded to
    bf16 (8 significant bits: one bf16 ulp of tolerance)."""
    import ml_dtypes

    rng = np.random.default_rng(k * 1000 + n + 7)
    x, w, scale, b, idx, w_out = case(rng, lead, k, n, r, True, np.float32)
    x = x.astype(ml_dtypes.bfloat16).astype(np.float32)  # what the graph's Cast feeds the op
    op = "W8A8OutlierMatMul" if idx is not None else "W8A8MatMul"
    y = session(ops_lib, bf16_model(op, k, n, w, scale, b, idx, w_out, x.ndim)).run(None, {"x": x})[0]
    ref = reference.w8a8_matmul(x.astype(ml_dtypes.bfloat16), w, scale, b, idx, w_out)
    np.testing.assert_allclose(y, ref.astype(ml_dtypes.bfloat16).astype(np.float32), rtol=2 ** -7,
                               atol=2 ** -7 * float(np.abs(ref).max()))
