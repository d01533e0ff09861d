"""Output folders: never an input, --force only over qcompiler's own output, stale partials cleaned."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qcompiler.artifact import MARKER, atomic_output_dir, check_not_overlapping, check_output_dir
from qcompiler.errors import EXIT_CODES, OutputError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("out", "inp", "words"), [
    ("a", "a", "is the input"), ("a/b", "a", "is inside the input"), ("a", "a/b.txt", "contains the input"),
])
def test_overlap_refused(out: str, inp: str, words: str, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    with pytest.raises(OutputError, match=words):
        check_not_overlapping(tmp_path / out, [tmp_path / inp])
    check_not_overlapping(tmp_path / "c", [tmp_path / "a", None])


def test_force_replaces_only_marked_or_empty_folders(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("x")
    with pytest.raises(OutputError, match="was not written by qcompiler"):
        check_output_dir(out, force=True)
    (out / MARKER).write_text("")
    check_output_dir(out, force=True)
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "f").write_text("new")
    assert (out / "f").read_text() == "new" and (out / MARKER).is_file() and not (out / "mine.txt").exists()


def test_live_runs_partial_is_kept(tmp_path: Path) -> None:
    """A partial folder whose process is alive (this one) belongs to a running command: left alone."""
    live = tmp_path / f".out.partial-{os.getpid()}-xyz"
    live.mkdir()
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("")
    assert live.is_dir()


def test_readme_exit_code_table_matches_errors() -> None:
    readme = (ROOT / "README.md").read_text()
    for code in EXIT_CODES:
        assert f"| {code} |" in readme, f"exit code {code} missing from the README's table"
