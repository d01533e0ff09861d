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
               "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| qc |" in text and "| ort |" in text and "RSS target" in text and "speed: qc" in text
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    for side in ("qc", "ort"):
        assert "error" not in rows[side], rows[side]
        assert rows[side]["seconds"] > 0 and rows[side]["peak_rss_mb"] > 50  # a real child process's own peak
    assert rows["qc"]["values"] == 8 and rows["qc"]["hessian_bytes"] == 4 * (3 * 64 * 64 + 160 * 160) * 2
