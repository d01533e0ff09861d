"""Bad input gives a one-line error naming the problem, a non-zero exit, and nothing half-written."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qcompiler.cli import main


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, (err[-1] if err else "")


def _no_partials(parent: Path) -> None:
    assert not [p for p in parent.iterdir() if ".partial-" in p.name]


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_truncated_onnx(synthetic_dir, tmp_path: Path, capsys) -> None:
    folder = copy_model(synthetic_dir[0], tmp_path / "m")
    data = (folder / "model.onnx").read_bytes()
    (folder / "model.onnx").write_bytes(data[: len(data) // 3])
    rc, err = run_cli(["quantize", str(folder), str(tmp_path / "out"), "--recipe", "w4a16-rtn"], capsys)
    assert rc != 0
    assert err.startswith("qc: error:") and "not a valid ONNX model" in err
    assert not (tmp_path / "out").exists()
    _no_partials(tmp_path)


def test_folder_without_model(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    rc, err = run_cli(["quantize", str(tmp_path / "empty"), str(tmp_path / "out"), "--recipe", "w4a16-rtn"], capsys)
    assert rc != 0 and "has no model.onnx" in err
    rc, err = run_cli(["eval", str(tmp_path / "missing"), "--text", __file__], capsys)
    assert rc != 0 and "no such model folder" in err


def test_missing_external_data(synthetic_dir, tmp_path: Path, capsys) -> None:
    folder = copy_model(synthetic_dir[0], tmp_path / "m")
    (folder / "model.onnx_data").unlink()
    rc, err = run_cli(["quantize", str(folder), str(tmp_path / "out"), "--recipe", "w4a16-rtn"], capsys)
    assert rc != 0 and "missing external-data file 'model.onnx_data'" in err
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(synthetic_dir, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    args = ["quantize", str(synthetic_dir[0]), str(out), "--recipe", "w4a16-rtn", "--group-size", "32"]
    rc, err = run_cli(args, capsys)
    assert rc != 0 and "already exists; pass --force" in err
    assert (out / "keep.txt").read_text() == "user data"
    # --force replaces only a folder qcompiler wrote: the user's folder stays as it is
    rc, err = run_cli([*args, "--force"], capsys)
    assert rc == 4 and "was not written by qcompiler" in err
    assert (out / "keep.txt").read_text() == "user data"
    (out / "keep.txt").unlink()  # an empty folder may be replaced
    rc, _ = run_cli([*args, "--force"], capsys)
    assert rc == 0
    assert (out / "model.onnx").is_file() and (out / "quantization.json").is_file()
    assert (out / ".qcompiler-output").is_file()
    rc, _ = run_cli([*args, "--force"], capsys)  # and so may qcompiler's own output
    assert rc == 0
    _no_partials(tmp_path)


def test_gguf_that_is_not_one(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"NOTGGUF" + bytes(100))
    rc, err = run_cli(["export", str(bad), str(tmp_path / "out")], capsys)
    assert rc != 0 and "is not a GGUF file" in err
    assert not (tmp_path / "out").exists()


def test_unknown_recipe_lists_choices(synthetic_dir, tmp_path: Path, capsys) -> None:
    rc, err = run_cli(["quantize", str(synthetic_dir[0]), str(tmp_path / "o"), "--recipe", "w3a3-magic"], capsys)
    assert rc != 0 and "unknown recipe 'w3a3-magic'; choices:" in err and "w4a16-rtn" in err


def test_hub_id_without_network_fails_fast(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, err = run_cli(["export", "someorg/not-a-cached-model", str(tmp_path / "out")], capsys)
    assert rc != 0
    assert "pass a local model folder or a .gguf file" in err


def test_interrupt_leaves_nothing(synthetic_dir, tmp_path: Path, monkeypatch, capsys) -> None:
    """Ctrl-C while the model is being written: exit 130, no output folder, no partial folder."""
    import qcompiler.quantize as qmod

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(qmod, "save_model", boom)
    rc, err = run_cli(["quantize", str(synthetic_dir[0]), str(tmp_path / "out"), "--recipe", "w4a16-rtn"], capsys)
    assert rc == 130 and "interrupted" in err
    assert not (tmp_path / "out").exists()
    _no_partials(tmp_path)


def test_console_script_runs(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "qcompiler", "passes"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "w4a16-rtn" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "qcompiler", "eval", str(tmp_path / "x"), "--text", "y"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("qc: error:")
    assert "Traceback" not in proc.stderr
