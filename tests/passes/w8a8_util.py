"""Helpers of the W8A8 / outlier pass tests (not fixtures)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from qcompiler.calibrate import CalibConfig, Calibrator
from qcompiler.irutil import load_model, save_model
from qcompiler.pipeline import PassContext, parse_pipeline, run_passes
from qcompiler.runtime import DecoderRunner


def calibrator(folder: Path, text: Path, cache: Path, samples: int = 4, seq_len: int = 64) -> Calibrator:
    """A small, cached calibrator (``samples`` windows of ``seq_len`` tokens)."""
    return Calibrator(folder, CalibConfig(calib=str(text), samples=samples, seq_len=seq_len, progress=False,
                                          cache_dir=str(cache)))


def compile_model(folder: Path, pipeline: str, calib: Calibrator | None = None) -> tuple[ir.Model, PassContext]:
    ctx = PassContext(calibrate=calib)
    model, _ = run_passes(load_model(folder / "model.onnx"), parse_pipeline(pipeline, ctx))
    return model, ctx


def run_values(model: ir.Model | Path, names: list[str], ids: np.ndarray, tmp: Path,
               optimize: bool = False) -> dict[str, np.ndarray]:
    """Values ``names`` (added as outputs) of a model (folder or IR model saved under ``tmp``) on one window."""
    if isinstance(model, ir.Model):
        tmp.mkdir(parents=True, exist_ok=True)
        save_model(model, tmp / "model.onnx")
        model = tmp
    proto = onnx.load(str(Path(model) / "model.onnx"), load_external_data=False)
    have = {o.name for o in proto.graph.output}
    for n in names:
        if n not in have:
            proto.graph.output.append(onnx.ValueInfoProto(name=n))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(Path(model)))
    cwd = os.getcwd()
    try:
        os.chdir(model)
        sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    finally:
        os.chdir(cwd)
    runner = DecoderRunner(sess)
    return dict(zip(names, sess.run(names, runner.feeds(ids))))


def l2_rel(ref: np.ndarray, test: np.ndarray) -> float:
    """``‖ref − test‖ / ‖ref‖`` (float64)."""
    ref64 = ref.astype(np.float64)
    return float(np.linalg.norm(ref64 - test.astype(np.float64)) / max(np.linalg.norm(ref64), 1e-30))


def shared_calibrator(tmp_path_factory, folder: Path, text: Path, **kw: int) -> Calibrator:
    """A calibrator whose statistics cache is shared by every W8A8 test module of the session."""
    cache = tmp_path_factory.getbasetemp() / "w8a8-calib-cache"
    cache.mkdir(exist_ok=True)
    return calibrator(folder, text, cache, **kw)


class NoStatistics:
    """A calibrator that returns statistics for no value (each ``get`` raises, like a stale cache)."""

    def __call__(self, model, requests):
        return self

    def get(self, value, observer):
        from qcompiler.errors import CalibrationError

        raise CalibrationError(f"no '{observer}' statistics for value '{value}'")
