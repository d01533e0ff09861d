"""qc check: nodes not assigned to the target's provider, from ORT's placement or the op-support table."""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime as ort
import pytest
from qcompiler.passes.lower_qc_ops import LowerQcOps
from qcompiler.passes.lower_w8a8_cpu import LowerW8A8Cpu

from qcompiler.cli import main
from qcompiler.errors import QCError
from qcompiler.irutil import load_model, save_model
from qcompiler.ops import build
from qcompiler.partition import check_partition, onnx_full_check
from qcompiler.pipeline import QCPass, parse_pipeline, run_passes
from tests.ops.helpers import apply_w8a8

CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers()


def save(model, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, folder / "model.onnx")
    return folder


def w8a8_folder(src: Path, out: Path, lower: type[QCPass]) -> Path:
    model = load_model(src / "model.onnx")
    run_passes(model, parse_pipeline("canonicalize"))
    apply_w8a8(model)
    lower()(model)
    return save(model, out)


def test_cpu_target_uses_onnxruntime_placement(synthetic_dir) -> None:
    folder, _ = synthetic_dir
    report = check_partition(folder, "cpu")
    assert report.method == "onnxruntime" and report.provider == "CPUExecutionProvider"
    assert report.ok and report.total_nodes > 50 and "node assignment recorded" in report.note


def test_cpu_target_runs_qcompiler_ops_on_cpu(synthetic_dir, ops_lib: Path, tmp_path: Path) -> None:
    folder, _ = synthetic_dir
    qc = w8a8_folder(folder, tmp_path / "qc", LowerQcOps)
    report = check_partition(qc, "cpu")
    assert report.method == "onnxruntime" and report.ok


def test_cuda_table_lists_cpu_only_ops(synthetic_dir, tmp_path: Path) -> None:
    folder, _ = synthetic_dir
    cpu_lowered = w8a8_folder(folder, tmp_path / "cpu", LowerW8A8Cpu)
    report = check_partition(cpu_lowered, "cuda", use_table=True)
    assert report.method == "op-support table" and "not from running a session" in report.note
    fallback = [p for p in report.not_assigned if p.op_type == "MatMulIntegerToFloat"]
    assert len(fallback) == 14 and all(p.placed_on == "CPU (fallback)" for p in fallback)
    assert {p.op_type for p in report.not_assigned} == {"MatMulIntegerToFloat"}
    text = report.render()
    assert "com.microsoft.MatMulIntegerToFloat ×14 → CPU (fallback): no CUDA kernel" in text


@pytest.mark.skipif(CUDA_EP, reason="the CUDA provider is installed: the runtime placement is used instead")
def test_cuda_without_provider_says_it_used_the_table(synthetic_dir) -> None:
    folder, _ = synthetic_dir
    report = check_partition(folder, "cuda")
    assert report.method == "op-support table"
    assert "CUDAExecutionProvider is not available in this onnxruntime" in report.note
    assert report.ok  # the float Llama graph uses only ops the CUDA provider has


def test_cuda_table_and_qcompiler_ops(synthetic_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, _ = synthetic_dir
    qc = w8a8_folder(folder, tmp_path / "qc", LowerQcOps)
    monkeypatch.setattr(build, "default_build_dirs", lambda: [tmp_path / "nothing"])
    report = check_partition(qc, "cuda", use_table=True)
    assert len(report.not_assigned) == 14
    assert all(p.op_type == "W8A8MatMul" and "qc ops build --cuda" in p.reason for p in report.not_assigned)
    fake = tmp_path / "built"
    fake.mkdir()
    (fake / build.CUDA_LIB).write_bytes(b"")
    (fake / build.STAMP).write_text(json.dumps({"source_hash": build.source_hash()}))
    monkeypatch.setattr(build, "default_build_dirs", lambda: [fake])
    assert check_partition(qc, "cuda", use_table=True).ok


def test_npu_rules(synthetic_nokv_dir, tmp_path: Path) -> None:
    folder, _ = synthetic_nokv_dir
    asym = load_model(folder / "model.onnx")
    run_passes(asym, parse_pipeline("canonicalize,quantize-weights{bits=4,group_size=32}"))
    report = check_partition(save(asym, tmp_path / "asym"), "npu")
    assert report.method == "op-support table"
    assert len(report.not_assigned) == 14
    assert all("weight stored as uint4" in p.reason for p in report.not_assigned)
    assert any("dynamic dimensions" in issue for issue in report.model_issues)
    npu = load_model(folder / "model.onnx")
    run_passes(npu, parse_pipeline("canonicalize,quantize-weights{bits=4,group_size=32},lower-npu{static_shapes=32}"))
    clean = save(npu, tmp_path / "npu")
    report = check_partition(clean, "npu")
    assert report.ok, report.render()
    assert onnx_full_check(clean) == []


def test_cli_check(synthetic_dir, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, _ = synthetic_dir
    cpu_lowered = w8a8_folder(folder, tmp_path / "cpu", LowerW8A8Cpu)
    assert main(["check", str(cpu_lowered), "--target", "cuda", "--table", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "op-support table" and out["assigned"] == out["total_nodes"] - 14 and not out["ok"]
    assert main(["check", str(cpu_lowered), "--target", "cuda", "--table", "--strict"]) == 1
    assert "MatMulIntegerToFloat ×14" in capsys.readouterr().out
    assert main(["check", str(cpu_lowered), "--target", "tpu"]) == 2
    assert "unknown target 'tpu'; choices: cpu, cuda, npu" in capsys.readouterr().err


def test_quantize_unknown_target_lists_choices(synthetic_dir, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    folder, _ = synthetic_dir
    assert main(["quantize", str(folder), str(tmp_path / "o"), "--recipe", "w4a16-rtn", "--target", "gpu"]) == 2
    assert "unknown target 'gpu'; choices: cpu, cuda, npu" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_missing_model_folder() -> None:
    with pytest.raises(QCError, match="no such model folder"):
        check_partition("/nonexistent/model", "cpu")


@pytest.mark.parametrize("recipe", ["w4a16-rtn", "w8a8-dynamic"])
def test_cuda_target_output_stays_on_cuda(recipe: str, synthetic_dir, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole `--target cuda` outputs (fusions included) have no node the CUDA table sends to CPU."""
    from qcompiler.quantize import quantize
    from qcompiler.recipes import QuantizeOptions

    folder, _ = synthetic_dir
    out = tmp_path / recipe
    quantize(folder, out, recipe=recipe, options=QuantizeOptions(target="cuda"), force=True)
    fake = tmp_path / "built"
    fake.mkdir()
    (fake / build.CUDA_LIB).write_bytes(b"")
    (fake / build.STAMP).write_text(json.dumps({"source_hash": build.source_hash()}))
    monkeypatch.setattr(build, "default_build_dirs", lambda: [fake])
    report = check_partition(out, "cuda", use_table=True)
    assert report.ok, [(p.op_type, p.reason) for p in report.not_assigned]
    assert "QuickGelu" not in {n.op_type for n in load_model(out / "model.onnx").graph}
