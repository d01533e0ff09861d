"""Run the bad-input corpus (``cases.py``) through ``qc``'s entry point: one parametrised test per fault class.

Every case checks the exit code, the key words of the one-line message, that nothing is
left behind (no output, no ``.partial-``/``.old-``/``.tmp``), and that every input — the
files the case made and the shared synthetic model — is byte-identical afterwards.
With ``QC_CORPUS_TABLE=path.md`` the table (case, exit code, message, leftovers) is written
at the end of the session.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from qcompiler.cli import main
from tests.badinputs.cases import CORPUS, OUT, Case

ROWS: list[tuple[str, str, int, str, str]] = []


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".partial-" in p.name or ".old-" in p.name or p.name.endswith(".tmp")]


def _snapshot(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, str]:
    """Relative path → content digest (files), link target (symlinks) or "dir", outside ``skip``."""
    snap: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        if any(p == s or s in p.parents for s in skip) or ".partial-" in str(p) or ".old-" in str(p):
            continue
        rel = str(p.relative_to(root))
        if p.is_symlink():
            snap[rel] = "-> " + os.readlink(p)
        elif p.is_dir():
            snap[rel] = "dir"
        else:
            snap[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return snap


def run_case(case: Case, fault: str, model: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work = tmp_path / "work"
    work.mkdir()
    before_root = sorted(p.name for p in tmp_path.iterdir())
    model_before = _snapshot(model)
    argv = case.argv(work, model)
    out = work / OUT
    skip = (out,) if case.exit_code == 0 or case.keeps_out else ()
    inputs_before = _snapshot(work, skip)
    if case.patch is not None:
        case.patch(monkeypatch, work)
    try:
        rc = main(argv)
    finally:
        monkeypatch.undo()
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    message = lines[-1] if lines and rc else "(exit 0; result checked)"
    left = _leftovers(tmp_path)
    ROWS.append((fault, case.id, rc, message.replace(str(tmp_path), "…"), ", ".join(p.name for p in left) or "none"))
    assert "Traceback" not in err
    assert rc == case.exit_code, f"exit {rc}, expected {case.exit_code}; stderr:\n{err[-2000:]}"
    if case.exit_code:
        assert lines and lines[-1].startswith("qc: error: "), err[-2000:]
        assert case.message in lines[-1], lines[-1]
        if not case.keeps_out:
            assert not out.exists(), "a failing command left an output folder"
    else:
        assert (out / "model.onnx").is_file()
    assert not left, "partial or temporary files were left behind"
    assert sorted(p.name for p in tmp_path.iterdir()) == before_root, "something was written outside the work folder"
    assert _snapshot(work, skip) == inputs_before, "an input was changed, removed or added to"
    assert _snapshot(model) == model_before, "the shared input model was changed"
    if case.after is not None:
        case.after(work)


def _params(fault: str):
    return pytest.mark.parametrize("case", CORPUS[fault], ids=[c.id for c in CORPUS[fault]])


@_params("model-file")
def test_model_file(case: Case, synthetic_dir, tmp_path: Path, capsys, monkeypatch) -> None:
    run_case(case, "model-file", synthetic_dir[0], tmp_path, capsys, monkeypatch)


@_params("external-data")
def test_external_data(case: Case, synthetic_dir, tmp_path: Path, capsys, monkeypatch) -> None:
    run_case(case, "external-data", synthetic_dir[0], tmp_path, capsys, monkeypatch)


@_params("weights")
def test_weights(case: Case, synthetic_dir, tmp_path: Path, capsys, monkeypatch) -> None:
    run_case(case, "weights", synthetic_dir[0], tmp_path, capsys, monkeypatch)


@_params("text")
def test_text(case: Case, synthetic_dir, tmp_path: Path, capsys, monkeypatch) -> None:
    run_case(case, "text", synthetic_dir[0], tmp_path, capsys, monkeypatch)


@_params("options")
def test_options(case: Case, synthetic_dir, tmp_path: Path, capsys, monkeypatch) -> None:
    run_case(case, "options", synthetic_dir[0], tmp_path, capsys, monkeypatch)


@_params("output")
def test_output(case: Case, synthetic_dir, tmp_path: Path, capsys, monkeypatch) -> None:
    run_case(case, "output", synthetic_dir[0], tmp_path, capsys, monkeypatch)


@_params("export")
def test_export(case: Case, synthetic_dir, tmp_path: Path, capsys, monkeypatch) -> None:
    run_case(case, "export", synthetic_dir[0], tmp_path, capsys, monkeypatch)


@pytest.fixture(scope="session", autouse=True)
def _corpus_table():
    yield
    path = os.environ.get("QC_CORPUS_TABLE")
    if path and ROWS:
        lines = ["| class | case | exit code | message | leftovers |", "|---|---|---|---|---|"]
        lines += [f"| {f} | {c} | {rc} | {m.replace('|', '/')} | {left} |" for f, c, rc, m, left in ROWS]
        Path(path).write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(("sig", "code"), [("SIGINT", 130), ("SIGTERM", 143), ("SIGKILL", -9)])
def test_interrupt(sig: str, code: int, synthetic_dir, tmp_path: Path, capsys) -> None:
    """A real signal while the external data is half written; after ``kill -9`` the next run cleans up."""
    import subprocess
    import sys

    from tests.test_robustness import _SIGNAL_DRIVER, ROOT

    model = synthetic_dir[0]
    model_before = _snapshot(model)
    out = tmp_path / OUT
    argv = ["quantize", str(model), str(out), "--recipe", "w4a16-rtn"]
    proc = subprocess.run([sys.executable, "-c", _SIGNAL_DRIVER, sig, *argv], capture_output=True, text=True,
                          timeout=240, cwd=ROOT)
    lines = proc.stderr.strip().splitlines()
    left = _leftovers(tmp_path)
    ROWS.append(("interrupt", f"{sig}-mid-write", proc.returncode,
                 (lines[-1] if lines and code > 0 else f"killed; left {len(left)} partial folder(s)").replace(
                     str(tmp_path), "…"), ", ".join(p.name for p in left) or "none"))
    assert proc.returncode == code, proc.stderr
    assert not out.exists() and _snapshot(model) == model_before
    if code > 0:
        assert "interrupted; nothing was written" in proc.stderr and "Traceback" not in proc.stderr
        assert not left
        return
    # kill -9 runs no clean-up: its .out.partial-PID-* stays until the next run for the same output
    assert len(left) == 1 and left[0].name.startswith(f".{OUT}.partial-")
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    left_after = _leftovers(tmp_path)
    ROWS.append(("interrupt", "rerun-after-kill-9", rc, next((ln for ln in err.splitlines() if "killed" in ln), ""),
                 ", ".join(p.name for p in left_after) or "none"))
    assert rc == 0 and (out / "model.onnx").is_file()
    assert f"removing {left[0]}, left by an earlier run" in err and not left_after
