"""Reference computations for calibration tests (all activations held in memory)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from qcompiler.runtime import DecoderRunner


def reference_activations(model_path: Path, names: list[str], windows: np.ndarray) -> dict[str, np.ndarray]:
    """Every activation of ``names`` over all windows, held in memory: ``[rows, C]`` float64.

    Independent of the engine: the whole model (weights loaded) with the values added as
    graph outputs, one plain ORT session, windows fed one by one.
    """
    proto = onnx.load(str(model_path))
    for n in names:
        proto.graph.output.append(onnx.ValueInfoProto(name=n))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    # the same GEMM path as the engine (prepacked weights take another summation order)
    so.add_session_config_entry("session.disable_prepacking", "1")
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    runner = DecoderRunner(sess)
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for w in windows:
        for n, out in zip(names, sess.run(names, runner.feeds(w[None]))):
            parts[n].append(out.reshape(-1, out.shape[-1]).astype(np.float64))
    return {n: np.concatenate(p) for n, p in parts.items()}


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def entropy_reference(absx: np.ndarray, edges: np.ndarray, levels: int) -> float:
    """TensorRT's KL search written plainly, on a histogram of all values held in memory."""
    hist, _ = np.histogram(absx, bins=edges)
    hist = hist.astype(np.float64)
    width = edges[1] - edges[0]
    last = int(np.nonzero(hist)[0][-1]) + 1
    best, best_i = np.inf, last
    for i in range(levels, last + 1):
        p = hist[:i].copy()
        p[i - 1] += hist[i:].sum()
        step = i // levels
        q = np.zeros(i)
        for j in range(levels):
            lo, hi = j * step, (i if j == levels - 1 else (j + 1) * step)
            nz = p[lo:hi] != 0
            if nz.sum():
                q[lo:hi][nz] = hist[lo:hi].sum() / nz.sum()
        pn, qn = p / p.sum(), q / q.sum()
        zero = (qn == 0) & (pn > 0)
        if zero.any():
            nzq = qn > 0
            qn = qn.copy()
            qn[zero] = 1e-4
            qn[nzq] -= 1e-4 * zero.sum() / nzq.sum()
            if (qn[nzq] <= 0).any():
                continue
        m = pn > 0
        kl = float(np.sum(pn[m] * np.log(pn[m] / qn[m])))
        if kl < best:
            best, best_i = kl, i
    return best_i * width
