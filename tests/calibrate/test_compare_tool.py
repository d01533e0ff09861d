"""tools/compare_calibration.py end to end on a small model (the SmolLM2 128×512 run is a measurement)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest


def test_compare_tool_runs_both_sides_in_children(synthetic_nokv_dir, synthetic_text: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tools.compare_calibration import main

    model_dir, _ = synthetic_nokv_dir
    out = tmp_path / "rows.json"
    rc = main(["--model", str(model_dir), "--calib", str(synthetic_text), "--samples", "3", "--seq-len", "32",
               "--rows", "qc,qc-bound,ort", "--bound", "400MB", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| qc | 3 |" in text and "| qc-bound | 3 |" in text and "| ort | 3 |" in text
    assert "RSS target" in text and "speed: qc" in text and "(measured)" in text and "CPU time ORT/qc" in text
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    for side in ("qc", "qc-bound", "ort"):
        assert "error" not in rows[side], rows[side]
        assert rows[side]["seconds"] > 0 and rows[side]["peak_rss_mb"] > 50  # a real child process's own peak
    assert rows["qc"]["values"] == 8 and rows["qc"]["hessian_bytes"] == 4 * (3 * 64 * 64 + 160 * 160) * 2
    assert rows["qc"]["sweeps"] == 1 and rows["qc-bound"]["max_memory"] == "400MB"
    assert rows["ort"]["windows"] == 3 and 0 < rows["ort"]["loop_seconds"] < rows["ort"]["seconds"]


def test_compare_tool_extrapolates_ort_from_fewer_windows(synthetic_nokv_dir, synthetic_text: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tools.compare_calibration import main, ort_seconds_for

    model_dir, _ = synthetic_nokv_dir
    rc = main(["--model", str(model_dir), "--calib", str(synthetic_text), "--samples", "4", "--seq-len", "32",
               "--rows", "ort,qc", "--ort-samples", "2"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| ort | 2 |" in text and "| qc | 4 |" in text and "extrapolated from its 2 windows" in text
    assert "CPU time ORT (extrapolated)/qc" in text
    # set-up once plus the per-window rate: 10 s of which 4 s for 2 windows → 6 + 2·8 for 8 windows
    row = {"windows": 2, "seconds": 10.0, "loop_seconds": 4.0}
    assert ort_seconds_for(row, 8) == (22.0, True) and ort_seconds_for(row, 2) == (10.0, False)
