"""Weight-only recipes from the command line: AWQ/GPTQ/HQQ, --quantize-embeddings, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper
from qcompiler.models.synthetic import SyntheticConfig, build_model_dir

from qcompiler.cli import main
from qcompiler.irutil import load_model, op_types


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, (err[-1] if err else "")


def _nothing_written(parent: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in parent.iterdir() if ".partial-" in p.name]


@pytest.mark.parametrize("recipe", ["w4a16-gptq", "w4a16-awq"])
def test_calibrated_recipe_without_calib_says_so(synthetic_dir, tmp_path: Path, capsys, recipe: str) -> None:
    rc, err = run_cli(["quantize", str(synthetic_dir[0]), str(tmp_path / "out"), "--recipe", recipe], capsys)
    assert rc != 0 and f"recipe '{recipe}' needs calibration data: pass --calib PATH" in err
    _nothing_written(tmp_path, tmp_path / "out")


def test_unknown_recipe_lists_the_weight_only_recipes(synthetic_dir, tmp_path: Path, capsys) -> None:
    rc, err = run_cli(["quantize", str(synthetic_dir[0]), str(tmp_path / "out"), "--recipe", "w4a16-magic"], capsys)
    assert rc != 0 and "unknown recipe 'w4a16-magic'; choices:" in err
    assert all(r in err for r in ("w4a16-awq", "w4a16-gptq", "w4a16-hqq", "w4a16-rtn", "w8a16-rtn"))


def test_model_without_matmul_is_refused(synthetic_text: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "relu"
    folder.mkdir()
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(folder / "model.onnx"))
    for recipe in ("w4a16-gptq", "w4a16-awq", "w4a16-hqq"):
        out = tmp_path / f"out-{recipe}"
        calib = [] if recipe == "w4a16-hqq" else ["--calib", str(synthetic_text)]  # hqq reads no --calib
        rc, err = run_cli(["quantize", str(folder), str(out), "--recipe", recipe, *calib], capsys)
        assert rc != 0 and "the model has no MatMul/Gemm: nothing to quantize" in err, recipe
        _nothing_written(tmp_path, out)


def test_awq_end_to_end_with_embeddings(synthetic_text: Path, tmp_path: Path, capsys) -> None:
    src, _ = build_model_dir(tmp_path / "tied", SyntheticConfig(tie_embeddings=True))
    out = tmp_path / "out"
    rc, _ = run_cli(["quantize", str(src), str(out), "--recipe", "w4a16-awq", "--calib", str(synthetic_text),
                     "--calib-samples", "2", "--seq-len", "32", "--group-size", "32", "--quantize-embeddings"], capsys)
    assert rc == 0
    summary = json.loads((out / "quantization.json").read_text())
    assert summary["recipe"] == "w4a16-awq" and "quantize-embeddings" in summary["pipeline"]
    assert summary["report"]["awq"]["calibration_windows"] == 2
    assert "tied" in summary["report"]["embeddings"]["model.embed_tokens.weight"]
    ops = op_types(load_model(out / "model.onnx"))
    assert ops.get("com.microsoft.GatherBlockQuantized") == 1
    assert (out / "model.onnx_data").stat().st_size < 0.3 * (src / "model.onnx_data").stat().st_size
