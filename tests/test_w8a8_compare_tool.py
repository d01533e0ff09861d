"""tools/compare_w8a8.py end to end on a small model (the SmolLM2 run is a measurement, in the closing note)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest


def test_compare_w8a8_rows_and_analysis(synthetic_nokv_dir, synthetic_text: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tools.compare_w8a8 import main

    monkeypatch.setenv("QC_CALIB_CACHE", str(tmp_path / "calib"))
    model_dir, _ = synthetic_nokv_dir
    out = tmp_path / "out"
    rows = "qc-smooth,qc-static-smooth,qc-int8mix,ort-static-same"
    rc = main([str(model_dir), "--calib", str(synthetic_text), "--text", str(synthetic_text), "--rows", rows,
               "--calib-samples", "3", "--calib-seq-len", "32", "--seq-len", "32", "--max-tokens", "64",
               "--prefill", "16", "--repeats", "1", "--out", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    got = {r["row"]: r for r in json.loads((out / "rows.json").read_text())}
    assert list(got) == ["fp32", *rows.split(",")]
    for name in rows.split(","):
        r = got[name]
        assert "error" not in r, r
        assert r["perplexity"] > 0 and 0 <= r["top1"] <= 1 and r["kl"] >= 0 and r["prefill_ratio"] > 0
        assert f"| {name} | {r['perplexity']:.3f} |" in table
    assert got["fp32"]["prefill_ratio"] == 1.0

    analysis = json.loads((out / "w8a8_analysis.json").read_text())
    assert analysis["outlier_criteria"] == {"threshold": 6.0, "min_tokens": 0.06, "min_layers": 0.25}
    per_layer = analysis["outliers_per_layer"]
    assert set(per_layer) == {"0", "1"}
    for layer, entry in per_layer.items():
        dims = {g: analysis["outliers"][f"layers.{layer}.{g}"]["outlier_dims"] for g in entry["dims"]}
        assert entry["dims"] == dims and entry["count"] == sum(map(len, dims.values()))
    smooth = analysis["smoothing"]["layers.0.qkv"]
    assert len(smooth["channel_absmax_before"]) == len(smooth["channel_absmax_after"]) == len(smooth["scales"])
    # w8a8-static-smooth smooths q/k/v and o_proj only: its MLP inputs get the block transforms instead
    assert set(analysis["static_smoothing"]) == {k for k in analysis["smoothing"] if not k.endswith(("gate_up", "down_proj"))}
    assert {k.rsplit(".", 1)[1] for k in analysis["static_smoothing"]} == {"qkv", "o_proj"}
    assert analysis["splitting"]["budget"] == 0.05

    (out / "w8a8_analysis.json").unlink()  # the analysis can be rewritten from the kept folders
    assert main(["analysis", str(out)]) == 0
    assert json.loads((out / "w8a8_analysis.json").read_text()) == analysis
