"""``qc calibrate`` and the calibrator ``qc quantize`` hands to passes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from qcompiler.models.synthetic import SyntheticConfig, build_model_dir

from qcompiler.calibrate import CalibrationStats, Calibrator, StatRequest, linear_inputs
from qcompiler.cli import main
from qcompiler.irutil import load_model
from qcompiler.quantize import make_context
from qcompiler.recipes import QuantizeOptions


def _qc(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict | None, str]:
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, (json.loads(cap.out) if rc == 0 else None), cap.err


def test_qc_calibrate_writes_reuses_and_refuses(synthetic_dir, synthetic_text: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    model_dir, _ = synthetic_dir
    out = tmp_path / "stats"
    args = ["calibrate", str(model_dir), "--calib", str(synthetic_text), "--out", str(out), "--calib-samples", "4",
            "--seq-len", "32", "--observers", "minmax,absmax_channel,hessian,histogram", "--no-progress",
            "--max-memory", "1GB"]
    rc, summary, _ = _qc(capsys, *args)
    assert rc == 0 and summary["values"] == 8 and summary["sweeps_computed"] >= 1
    assert not list(tmp_path.glob(".stats.partial*"))  # renamed into place when complete
    stats = CalibrationStats(out)
    model = load_model(model_dir / "model.onnx")
    assert sorted(stats.values()) == sorted(linear_inputs(model))
    assert stats.get(stats.values()[0], "hessian").xtx.shape in ((64, 64), (160, 160))
    # the same command again: loaded, nothing computed
    rc, again, _ = _qc(capsys, *args)
    assert rc == 0 and again["sweeps_computed"] == 0 and again["model_hash"] == summary["model_hash"]
    assert again["sweeps_reused"] == summary["sweeps_computed"] and 0 < again["wall_seconds"] < 5
    # another model into the same folder: refused with the hash mismatch (an output that may not be replaced)
    other, _ = build_model_dir(tmp_path / "other", SyntheticConfig(seed=3))
    rc, _, err = _qc(capsys, "calibrate", str(other), *args[2:])
    assert rc == 4 and "another model: model hash" in err and "--force" in err
    rc, _, err = _qc(capsys, *args[:-2], "--max-memory", "lots")
    assert rc == 2 and "--max-memory 'lots'" in err


def test_qc_calibrate_values_by_name(synthetic_nokv_dir, synthetic_text: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    model_dir, _ = synthetic_nokv_dir
    name = next(iter(linear_inputs(load_model(model_dir / "model.onnx"))))
    rc, summary, _ = _qc(capsys, "calibrate", str(model_dir), "--calib", str(synthetic_text), "--out",
                         str(tmp_path / "s"), "--calib-samples", "2", "--seq-len", "16", "--values", name,
                         "--observers", "outliers,sample", "--sample-rows", "8", "--no-progress")
    assert rc == 0 and summary["values"] == 1
    assert CalibrationStats(tmp_path / "s").get(name, "sample").rows.shape == (8, 64)
    rc, _, err = _qc(capsys, "calibrate", str(model_dir), "--calib", str(synthetic_text), "--out",
                     str(tmp_path / "t"), "--values", "no/such/value", "--no-progress")
    assert rc == 2 and "no value named 'no/such/value'" in err


def test_quantize_context_calibrates_the_current_model(synthetic_nokv_dir, synthetic_text: Path) -> None:
    model_dir, _ = synthetic_nokv_dir
    opts = QuantizeOptions(calib=str(synthetic_text), calib_samples=3, seq_len=32, max_memory="2GB")
    ctx = make_context(model_dir, opts)
    assert isinstance(ctx.calibrate, Calibrator)
    model = load_model(model_dir / "model.onnx")
    name = next(iter(linear_inputs(model)))
    stats = ctx.require_calibration("test-pass")(model, [StatRequest(name, ("absmax_channel",))])
    assert stats.get(name, "absmax_channel").shape == (64,)
    assert ctx.calibrate.windows.ids.shape == (3, 32)
    assert np.all(stats.get(name, "absmax_channel") > 0)
