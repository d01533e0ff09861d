"""Run every case of the bad-input corpus (``cases.py``) through ``qc``'s entry point."""

from __future__ import annotations

from pathlib import Path

import pytest

from qcompiler.cli import main
from tests.badinputs.cases import CASES, OUT, Case


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".partial-" in p.name or ".old-" in p.name or p.name.endswith(".tmp")]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, synthetic_dir, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work = tmp_path / "work"
    work.mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = case.argv(work, synthetic_dir[0])
    rc = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    assert rc == case.exit_code, f"exit {rc}, expected {case.exit_code}; stderr:\n{err[-2000:]}"
    if case.exit_code:
        assert lines and lines[-1].startswith("qc: error: "), err[-2000:]
        assert case.message in lines[-1], lines[-1]
        assert not (work / OUT).exists(), "a failing command left an output folder"
    else:
        assert (work / OUT / "model.onnx").is_file()
    assert not _leftovers(tmp_path), "partial or temporary files were left behind"
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "something was written outside the work folder"
    if case.after is not None:
        case.after(work)
