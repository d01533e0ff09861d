"""Helpers for the calibrated weight-only passes' tests (GPTQ, AWQ): contexts and per-linear outputs."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from qcompiler.calibrate import CalibConfig, Calibrator
from qcompiler.irutil import save_model
from qcompiler.pipeline import PassContext
from qcompiler.runtime import DecoderRunner, make_session
from qcompiler.spec import Role, linear_info


def calib_context(model_dir: Path, text: Path, samples: int = 6, seq_len: int = 64) -> PassContext:
    """A pass context whose calibrator draws ``samples`` windows of ``seq_len`` tokens from ``text``."""
    cfg = CalibConfig(calib=str(text), samples=samples, seq_len=seq_len, progress=False)
    return PassContext(calibrate=Calibrator(model_dir, cfg))


def values_of(model: ir.Model, names: list[str], windows: np.ndarray) -> list[list[np.ndarray]]:
    """Values ``names`` of ``model`` (saved to a temporary folder, names as extra outputs) per window."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        save_model(model, path)
        proto = onnx.load(str(path), load_external_data=False)
        proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
        onnx.save(proto, str(path))
        runner = DecoderRunner(make_session(path, optimize=False), require_logits=False)
        return [runner.session.run(names, runner.feeds(ids)) for ids in windows]


def linear_outputs(model: ir.Model, windows: np.ndarray) -> dict[str, np.ndarray]:
    """``{linear key: its output on all windows [rows, N]}`` for every decoder linear of ``model``."""
    names = {linear_info(n).key: n.outputs[0].name for n in model.graph
             if linear_info(n) is not None and linear_info(n).role != Role.LM_HEAD}
    keys = list(names)
    runs = values_of(model, [names[k] for k in keys], windows)
    return {k: np.concatenate([r[i].reshape(-1, r[i].shape[-1]) for r in runs]) for i, k in enumerate(keys)}


def output_mse(ref: dict[str, np.ndarray], test: dict[str, np.ndarray]) -> dict[str, float]:
    return {k: float(np.mean((ref[k].astype(np.float64) - test[k]) ** 2)) for k in ref}
