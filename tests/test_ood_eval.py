"""tools/ood_eval.py: windows from the middle of each text, one compile per recipe × target, Δ% per text."""

from __future__ import annotations

import json
import math

import numpy as np

from qcompiler.data import tokenize
from qcompiler.eval import evaluate_windows
from qcompiler.runtime import open_runner
from tools import ood_eval


def test_mid_windows_start_at_a_third(synthetic_dir, synthetic_text) -> None:
    folder, _ = synthetic_dir
    text = synthetic_text.read_text()
    ids = tokenize(folder, text)
    win = ood_eval.mid_windows(folder, text, 128, 64)
    assert win.shape == (2, 64)
    start = len(ids) // 3
    np.testing.assert_array_equal(win.reshape(-1), ids[start:start + 128])


def test_tool_end_to_end(synthetic_nokv_dir, synthetic_text, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("QC_CALIB_CACHE", str(tmp_path / "calib"))
    folder, _ = synthetic_nokv_dir
    other = tmp_path / "other.txt"
    other.write_bytes(bytes(np.random.default_rng(2).integers(32, 127, 3000).astype(np.uint8)))
    out = tmp_path / "ood"
    rc = ood_eval.main([str(folder), "--calib", str(synthetic_text), "--out", str(out), "--recipes", "w8a8-static",
                        "--targets", "cpu", "--text", f"bytes={other}", "--tokens", "128", "--seq-len", "64",
                        "--extra", "--calib-samples 2 --seq-len 64"])
    assert rc == 0
    data = json.loads((out / "rows.json").read_text())
    row = data["rows"][0]
    assert row["status"] == "ok" and row["compile_s"] > 0
    t = row["texts"]["bytes"]
    # recompute the perplexity of the compiled model on the same windows
    win = ood_eval.mid_windows(folder, other.read_text(), 128, 64)
    res = evaluate_windows(open_runner(out / "models" / "w8a8-static-cpu"), win, open_runner(folder), progress=False)
    assert math.isclose(t["perplexity"], res.perplexity, rel_tol=1e-6)
    assert math.isclose(t["delta_pct"], 100 * (res.perplexity / res.reference_perplexity - 1), rel_tol=1e-6)
    assert "| w8a8-static | cpu |" in (out / "table.md").read_text()


def test_ort_rtn_row(synthetic_nokv_dir, tmp_path) -> None:
    """``--recipes ort-rtn``: ONNX Runtime's MatMulNBitsQuantizer in a child that reports its own peak RSS; the
    row's model is the quantizer's (MatMulNBits), evaluated like the others."""
    from qcompiler.irutil import load_model, op_types

    folder, _ = synthetic_nokv_dir
    other = tmp_path / "other.txt"
    other.write_bytes(bytes(np.random.default_rng(3).integers(32, 127, 3000).astype(np.uint8)))
    out = tmp_path / "ood"
    assert ood_eval.main([str(folder), "--out", str(out), "--recipes", "ort-rtn", "--targets", "cpu",
                          "--text", f"bytes={other}", "--tokens", "128", "--seq-len", "64"]) == 0
    row = json.loads((out / "rows.json").read_text())["rows"][0]
    assert row["status"] == "ok" and row["command"].startswith("MatMulNBitsQuantizer(block_size=128")
    assert row["compile_s"] > 0 and row["peak_rss_mb"] > 0 and row["texts"]["bytes"]["perplexity"] > 0
    model_dir = out / "models" / "ort-rtn-cpu"
    assert op_types(load_model(model_dir / "model.onnx"))["com.microsoft.MatMulNBits"] > 0
    assert (model_dir / "config.json").is_file()  # the model's other files come along
