"""Ctrl-C and SIGTERM stop an ONNX Runtime run in flight (qcompiler.interrupt).

The slow run is real: a ``Loop`` with a trip count of 10^12 carrying its input through an
``Identity``, which ONNX Runtime would run for hours; without the watcher a signal waits for it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from qcompiler import interrupt
from qcompiler.runtime import Session, session_options

ROOT = Path(__file__).resolve().parents[1]


def _loop_model(trips: int) -> onnx.ModelProto:
    """``y = x`` after ``trips`` iterations of a Loop whose body is an Identity."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["c_in"], ["c_out"]), helper.make_node("Identity", ["x_in"], ["x_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_in", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_out", TensorProto.FLOAT, [3])])
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["n"], value=helper.make_tensor("n", TensorProto.INT64, [], [trips])),
         helper.make_node("Constant", [], ["c"], value=helper.make_tensor("c", TensorProto.BOOL, [], [True])),
         helper.make_node("Loop", ["n", "c", "x"], ["y"], body=body)],
        "loop", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _session(trips: int) -> Session:
    return Session(_loop_model(trips).SerializeToString(), session_options(1), providers=["CPUExecutionProvider"])


def _signal_later(sig: int, delay: float) -> threading.Thread:
    t = threading.Thread(target=lambda: (time.sleep(delay), os.kill(os.getpid(), sig)), daemon=True)
    t.start()
    return t


def test_run_returns_the_graphs_result() -> None:
    x = np.array([1.5, -2.0, 3.25], np.float32)
    (y,) = _session(10).run(["y"], {"x": x})
    np.testing.assert_array_equal(y, x)
    assert not interrupt._runs  # nothing left registered


def test_ctrl_c_stops_a_run_in_flight() -> None:
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    done = threading.Event()  # backstop: without the watcher the run would never end; fail instead
    threading.Thread(target=lambda: done.wait(30) or interrupt.terminate_all(), daemon=True).start()
    try:
        session = _session(10**12)
        _signal_later(signal.SIGINT, 0.3)
        t0 = time.perf_counter()
        with pytest.raises(KeyboardInterrupt) as info:
            session.run(["y"], {"x": np.zeros(3, np.float32)})
        assert time.perf_counter() - t0 < 5.0  # about 0.3 s: the signal, then one Loop iteration
        assert "terminate flag" in str(info.value.__context__)  # ONNX Runtime's run was the one stopped
        assert not interrupt._runs
    finally:
        done.set()
        signal.signal(signal.SIGINT, previous)


def test_a_handler_that_does_not_stop_leaves_the_run_alone() -> None:
    """A SIGTERM handler not marked ``stops_runs`` (it only records) must not cut the run short."""
    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
    try:
        session = _session(300_000)  # long enough for the signal to land inside the run
        t0 = time.perf_counter()
        session.run(["y"], {"x": np.zeros(3, np.float32)})
        once = time.perf_counter() - t0
        _signal_later(signal.SIGTERM, once / 4)
        x = np.array([4.0, 5.0, 6.0], np.float32)
        (y,) = session.run(["y"], {"x": x})
        np.testing.assert_array_equal(y, x)
        for _ in range(100):  # the handler runs at the next bytecode boundary after the signal
            if seen:
                break
            time.sleep(0.01)
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


# A qc child whose every in-memory ONNX Runtime session first carries its first graph input
# through the 10^12-trip Loop: the first calibration run never ends by itself.  It writes
# `started` when that run begins.
_DRIVER = textwrap.dedent("""
    import sys
    from pathlib import Path
    import onnx
    from onnx import TensorProto, helper
    import qcompiler.runtime as runtime

    marker, real_init, real_run = Path(sys.argv[1]), runtime.Session.__init__, runtime.Session.run

    def slow(blob):
        m = onnx.load_from_string(blob)
        g = m.graph
        x = g.input[0]
        t = x.type.tensor_type.elem_type
        body = helper.make_graph(
            [helper.make_node("Identity", ["c_in"], ["c_out"]), helper.make_node("Identity", ["x_in"], ["x_out"])],
            "slow_body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                          helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
                          helper.make_tensor_value_info("x_in", t, None)],
            [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []), helper.make_tensor_value_info("x_out", t, None)])
        for n in g.node:
            n.input[:] = [x.name + "_slow" if i == x.name else i for i in n.input]
        g.node.insert(0, helper.make_node("Loop", ["slow_n", "slow_c", x.name], [x.name + "_slow"], body=body))
        g.initializer.extend([helper.make_tensor("slow_n", TensorProto.INT64, [], [10**12]),
                              helper.make_tensor("slow_c", TensorProto.BOOL, [], [True])])
        return m.SerializeToString()

    def init(self, what, *a, **k):
        real_init(self, slow(what) if isinstance(what, bytes) else what, *a, **k)

    def run(self, *a, **k):
        marker.touch()
        return real_run(self, *a, **k)

    runtime.Session.__init__, runtime.Session.run = init, run
    from qcompiler.cli import main
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.parametrize(("sig", "code", "recipe"), [("SIGTERM", 143, "w4a16-awq"),
                                                       ("SIGINT", 130, "w8a8-static-smooth")])
def test_qc_quantize_stops_during_calibration(sig: str, code: int, recipe: str, synthetic_dir, synthetic_text,
                                              tmp_path: Path) -> None:
    out, started = tmp_path / "out", tmp_path / "started"
    env = {**os.environ, "QC_CALIB_CACHE": str(tmp_path / "calib-cache")}
    proc = subprocess.Popen(
        [sys.executable, "-c", _DRIVER, str(started), "quantize", str(synthetic_dir[0]), str(out), "--recipe", recipe,
         "--calib", str(synthetic_text), "--calib-samples", "4", "--seq-len", "32"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 240
        while not started.exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the calibration run never started"
            time.sleep(0.05)
        time.sleep(0.5)  # well inside ONNX Runtime's run
        assert proc.poll() is None
        t0 = time.monotonic()
        proc.send_signal(getattr(signal, sig))
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err
    assert took < 5.0, f"{took:.1f}s from {sig} to exit"
    assert err.strip().splitlines()[-1] == "qc: interrupted; nothing was written to the output", err
    assert "Traceback" not in err and "ONNXRuntimeError" not in err, err
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
