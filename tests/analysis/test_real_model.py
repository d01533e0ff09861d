"""qc analyze on the real SmolLM2-135M (small settings): a complete, valid report and sane findings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qcompiler.analysis import AnalyzeConfig, MeasureConfig, analyze
from qcompiler.analysis.schema import SCHEMA

pytestmark = pytest.mark.slow


def test_analyze_smollm2(smollm2_kv: Path, calib_text: Path, tmp_path: Path) -> None:
    import jsonschema

    cfg = AnalyzeConfig(
        calib=str(calib_text), cache_dir=str(tmp_path / "cache"),
        measure=MeasureConfig(samples=2, seq_len=256, rows=64, block_windows=1, block_seq_len=48, progress=False),
        e2e_top=2, e2e_windows=1, e2e_seq_len=48, pareto_e2e=False, pareto_budgets=(4.5, 5.0),
    )
    report = analyze(smollm2_kv, tmp_path / "report", cfg)
    jsonschema.validate(json.loads((tmp_path / "report" / "report.json").read_text()), SCHEMA)
    assert report["model"]["num_layers"] == 30 and len(report["layers"]) == 210
    assert all(r["gain"] is not None and r["gain"] > 0 for r in report["layers"])  # every layer rerun
    assert report["mixed"]["avg_bits"] <= 4.5 and len(set(report["mixed"]["assignment"].values())) > 1
    # SmolLM2's residual stream carries massive activations on the first position of a window
    assert report["outliers"]["massive"]["positions"] == [0] and report["outliers"]["massive"]["dims"]
    assert len(report["e2e"]["results"]) == 2 and all(r["kl"] > 0 for r in report["e2e"]["results"])
