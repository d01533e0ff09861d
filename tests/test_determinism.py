"""The same ``qc quantize`` twice gives byte-identical model files (every registered recipe)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from qcompiler.cli import main
from qcompiler.errors import QCError
from qcompiler.quantize import quantize
from qcompiler.recipes import QuantizeOptions, available_recipes, get_recipe

MODEL_FILES = ("model.onnx", "model.onnx_data")


def _digests(folder: Path) -> dict[str, str]:
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.name != "quantization.json")
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.mark.parametrize("recipe", sorted(available_recipes()))
def test_recipe_is_deterministic(recipe: str, synthetic_dir, synthetic_text: Path, tmp_path: Path) -> None:
    opts = QuantizeOptions(group_size=32, calib_samples=4, seq_len=64, budget=6.0)  # budget: for 'mixed'
    if get_recipe(recipe).needs_calibration:
        opts = opts.with_overrides(calib=str(synthetic_text))
    runs = []
    for i in range(2):  # different output folders: names of temporary folders must not leak into the files
        out = tmp_path / f"run{i}" / "out"
        try:
            summary = quantize(synthetic_dir[0], out, recipe=recipe, options=opts)
        except QCError as e:
            pytest.skip(f"{recipe} does not run on the synthetic model: {e}")
        runs.append((_digests(out), summary))
    (a, sa), (b, sb) = runs
    assert set(MODEL_FILES) <= set(a)
    assert a == b, f"{recipe}: files differ between two identical runs: {[k for k in a if a[k] != b.get(k)]}"
    # quantization.json differs only in measured times and memory
    volatile = {"wall_seconds", "peak_rss_mb", "passes"}
    assert {k: v for k, v in sa.items() if k not in volatile} == {k: v for k, v in sb.items() if k not in volatile}
    assert [p["text"] for p in sa["passes"]] == [p["text"] for p in sb["passes"]]


def test_genai_folder_is_deterministic(synthetic_dir, tmp_path: Path) -> None:
    outs = [tmp_path / f"g{i}" for i in range(2)]
    for out in outs:
        assert main(["-q", "quantize", str(synthetic_dir[0]), str(out), "--recipe", "w4a16-rtn", "--group-size", "32",
                     "--genai"]) == 0
    a, b = (_digests(o) for o in outs)
    assert "genai_config.json" in a and a == b


@pytest.mark.slow
def test_real_model_same_command_twice(smollm2_kv: Path, tmp_path: Path) -> None:
    outs = [tmp_path / f"w4-{i}" for i in range(2)]
    for out in outs:
        assert main(["-q", "quantize", str(smollm2_kv), str(out), "--recipe", "w4a16-rtn"]) == 0
    a, b = (_digests(o) for o in outs)
    for name in MODEL_FILES:
        assert a[name] == b[name], name
    assert a == b
    q = json.loads((outs[0] / "quantization.json").read_text())
    assert str(tmp_path) not in (outs[0] / "model.onnx").read_bytes().decode("latin-1")
    assert q["recipe"] == "w4a16-rtn"
