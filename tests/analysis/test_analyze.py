"""qc analyze on the synthetic models: injected outliers found exactly, a valid report, a page that renders."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import pytest
from qcompiler.models.synthetic import SyntheticConfig, build_model_dir

from qcompiler.analysis import AnalyzeConfig, MeasureConfig, analyze
from qcompiler.analysis.schema import SCHEMA, SCHEMA_ID, SCHEMA_VERSION
from qcompiler.cli import main

FAST = MeasureConfig(samples=6, seq_len=128, rows=256, block_windows=2, block_seq_len=64, progress=False)


def _config(text: Path, cache: Path, **kw: object) -> AnalyzeConfig:
    base = dict(calib=str(text), cache_dir=str(cache), measure=FAST, budget=5.0, pareto_budgets=(4.75, 5.0, 5.5),
                e2e_top=4, e2e_windows=2, e2e_seq_len=64)
    base.update(kw)
    return AnalyzeConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def analyzed(synthetic_dir, synthetic_text, tmp_path_factory):
    folder, truth = synthetic_dir
    tmp = tmp_path_factory.mktemp("analyze")
    report = analyze(folder, tmp / "report", _config(synthetic_text, tmp / "cache"))
    return tmp / "report", report, truth


def test_injected_outliers_massive_activation_and_super_weight_found_exactly(analyzed) -> None:
    _, report, truth = analyzed
    out = report["outliers"]
    assert [d["dim"] for d in out["llm_int8"]["dims"]] == sorted(truth.outlier_dims)
    assert all(d["layer_fraction"] == 1.0 for d in out["llm_int8"]["dims"])
    assert out["massive"]["dims"] == [truth.massive_dim]
    assert out["massive"]["positions"] == [truth.massive_position]
    examples = out["massive"]["examples"]
    assert examples and {(e["dim"], e["position"]) for e in examples} == {(truth.massive_dim, truth.massive_position)}
    assert [(s["layer"], s["row"], s["col"]) for s in out["super_weights"]] == [truth.super_weight]
    # the normalized hidden states carry the injected dims
    sev = {s["value"]: s for s in out["severity"]}
    assert all(s["outlier_channels"] >= 2 for s in sev.values() if s["linears"][0].endswith(("q_proj", "gate_proj")))


def test_clean_model_reports_nothing(synthetic_text, tmp_path: Path) -> None:
    folder, _ = build_model_dir(tmp_path / "clean", SyntheticConfig(outlier_dims=(), massive_dim=None, super_weight=None))
    report = analyze(folder, tmp_path / "report", _config(synthetic_text, tmp_path / "cache", e2e_top=0,
                                                         pareto_e2e=False))
    out = report["outliers"]
    assert out["llm_int8"]["dims"] == []
    assert out["massive"]["dims"] == [] and out["massive"]["positions"] == []
    assert out["super_weights"] == []
    assert all(s["class"] in ("mild", "moderate") for s in out["severity"])


def test_report_json_matches_its_schema(analyzed) -> None:
    import jsonschema

    folder, _, _ = analyzed
    on_disk = json.loads((folder / "report.json").read_text())
    assert on_disk["schema"] == SCHEMA_ID and on_disk["schema_version"] == SCHEMA_VERSION
    jsonschema.validate(on_disk, json.loads((folder / "report.schema.json").read_text()))
    assert json.loads((folder / "report.schema.json").read_text()) == json.loads(json.dumps(SCHEMA))
    broken = json.loads(json.dumps(on_disk))
    del broken["layers"][0]["sensitivity"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA)


def test_errors_sensitivity_ranking_and_budget_are_consistent(analyzed) -> None:
    _, report, _ = analyzed
    ref = report["reference"]
    layers = {r["key"]: r for r in report["layers"]}
    assert len(layers) == 14 and report["ranking"][0] == min(layers.values(), key=lambda r: r["rank"])["key"]
    scores = [layers[k]["sensitivity"][ref] for k in report["ranking"]]
    assert scores == sorted(scores, reverse=True)
    for r in layers.values():
        e = r["errors"]
        assert e["w8c"]["snr_db"] > e["w4g128"]["snr_db"] + 15  # 4 more bits ≈ 24 dB
        assert e["w4g32"]["snr_db"] > e["w4g128"]["snr_db"]
        assert 0.9 < e["w8c"]["cosine"] <= 1.0
        for cand, s in r["sensitivity"].items():  # S_j(c) = G_j · rel_j(c)
            assert s == pytest.approx(r["gain"] * e[cand]["rel"], rel=1e-9)
    assert r["recommendation"]["weight"] in report["mixed"]["options"]
    mixed = report["mixed"]
    assert mixed["avg_bits"] <= mixed["budget"] + 1e-12
    uniform = {p["label"]: p for p in report["pareto"] if p["kind"] == "uniform"}
    # the assignment at 5 bits predicts less error than uniform g32 at 5.125 bits
    assert mixed["predicted_error"] < uniform["w4g32"]["predicted_error"]
    assert len(report["e2e"]["results"]) == 4 and all(r["kl"] > 0 for r in report["e2e"]["results"])


def test_html_embeds_every_plot(analyzed) -> None:
    from PIL import Image

    folder, _, _ = analyzed
    page = (folder / "report.html").read_text()
    found = dict(re.findall(r"<img class='plot' id='plot-([^']+)'[^>]*src='data:image/png;base64,([^']+)'", page))
    assert set(found) == {"ranges", "heatmap", "sensitivity", "error_vs_bits", "pareto"}
    for data in found.values():
        w, h = Image.open(io.BytesIO(base64.b64decode(data))).size
        assert w > 400 and h > 200


def test_report_renders_in_headless_chromium(analyzed, tmp_path: Path) -> None:
    from tools.check_report_render import check, chromium

    if chromium() is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    folder, _, _ = analyzed
    res = check(folder, tmp_path / "shot.png")
    assert res["plots_loaded"] == "5/5"
    assert res["ok"], res


def test_cli_refuses_impossible_budget_and_unwritable_folder(synthetic_dir, synthetic_text, tmp_path: Path,
                                                             capsys) -> None:
    folder, _ = synthetic_dir
    rc = main(["analyze", str(folder), "--calib", str(synthetic_text), "--out", str(tmp_path / "r"), "--budget", "3"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "below the smallest possible model: 4.5357 average bits" in err
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    rc = main(["analyze", str(folder), "--calib", str(synthetic_text), "--out", str(blocker / "report")])
    err = capsys.readouterr().err
    assert rc == 4 and "cannot write the report folder" in err and "report" in err
    rc = main(["analyze", str(folder), "--calib", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "r")])
    assert rc == 3 and "no such text file" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_fp16_range_reports_an_activation_past_65504(synthetic_text, tmp_path: Path) -> None:
    """A massive activation of 1e5 (the residual stream of position 0) is reported as past fp16's
    range from the residual it enters on; the default model (800) is fp16-safe."""
    folder, _ = build_model_dir(tmp_path / "huge", SyntheticConfig(massive_value=1e5))
    report = analyze(folder, tmp_path / "report", _config(synthetic_text, tmp_path / "cache", e2e_top=0,
                                                         pareto_e2e=False))
    fp16 = report["outliers"]["fp16_range"]
    assert not fp16["fp16_safe"] and fp16["max_abs"] > 65504
    assert fp16["overflow"] and all(o["absmax"] > 65504 for o in fp16["overflow"])
    assert {o["label"] for o in fp16["overflow"]} >= {"layers.1.input"}
    kept = fp16["keep_fp32"]["ops"]  # the residual Adds carrying it, and the norms reading them
    assert any("/model/layers.0/Add" in n for n in kept) and any("input_layernorm" in n for n in kept)


def test_fp16_range_safe_model(analyzed) -> None:
    _, report, _ = analyzed
    fp16 = report["outliers"]["fp16_range"]
    assert fp16["fp16_safe"] and fp16["overflow"] == [] and 0 < fp16["max_abs"] < 65504
    assert fp16["keep_fp32"]["ops"] == []
