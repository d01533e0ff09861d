"""Interrupted calibration resumes from its last finished group, with bitwise identical results."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qcompiler.calibrate import linear_requests
from qcompiler.irutil import load_model

from .test_engine import assert_same, calibrator

OBS = ("minmax", "absmax_channel", "hessian", "histogram", "sample")
BOUND = dict(max_memory=700_000, overhead_bytes=0)  # several sweeps on the synthetic model


@pytest.fixture()
def setup(synthetic_dir, synthetic_text: Path, tmp_path: Path):
    model_dir, _ = synthetic_dir
    model = load_model(model_dir / "model.onnx")
    requests = linear_requests(model, OBS)
    reference = calibrator(model_dir, synthetic_text, tmp_path / "reference", **BOUND)(model, requests)
    return model_dir, model, requests, reference


def test_ctrl_c_after_one_group_then_resume(setup, synthetic_text: Path, tmp_path: Path) -> None:
    model_dir, model, requests, reference = setup
    total = len(reference.meta["groups"])
    assert total >= 3
    cal = calibrator(model_dir, synthetic_text, tmp_path / "cache", **BOUND)

    def interrupt(group: int, _n: int) -> None:
        if group == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cal(model, requests, on_group_done=interrupt)
    stats = cal(model, requests)
    assert cal.last_run.groups_reused == 1
    assert cal.last_run.groups_computed == total - 1
    assert_same(reference, stats, requests)


def test_killed_process_resumes_only_missing_groups(setup, synthetic_text: Path, tmp_path: Path) -> None:
    """SIGKILL (no clean-up at all) right after the first group is saved; rerun in this process."""
    model_dir, model, requests, reference = setup
    total = len(reference.meta["groups"])
    cache = tmp_path / "cache"
    script = textwrap.dedent(f"""
        import os, signal
        from qcompiler.calibrate import linear_requests
        from qcompiler.irutil import load_model
        from tests.calibrate.test_engine import calibrator
        model = load_model({str(model_dir / "model.onnx")!r})
        cal = calibrator({str(model_dir)!r}, {str(synthetic_text)!r}, {str(cache)!r}, **{BOUND!r})
        cal(model, linear_requests(model, {OBS!r}),
            on_group_done=lambda g, n: os.kill(os.getpid(), signal.SIGKILL) if g == 0 else None)
    """)
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(root)), timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    (store,) = cache.iterdir()
    assert sorted(p.name for p in store.glob("group-*.npz")) == ["group-000.npz"]
    first = (store / "group-000.npz").stat()
    cal = calibrator(model_dir, synthetic_text, cache, **BOUND)
    stats = cal(model, requests)
    assert cal.last_run.groups_reused == 1
    assert cal.last_run.groups_computed == total - 1
    assert cal.last_run.values_computed == len(requests) - len(stats.meta["groups"][0]["values"])
    again = (store / "group-000.npz").stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # the finished group is kept as is
    assert_same(reference, stats, requests)


def test_resume_without_hand_off_recomputes_from_inputs(setup, synthetic_text: Path, tmp_path: Path) -> None:
    """A lost hand-off (e.g. deleted scratch) costs time, never correctness."""
    import shutil

    model_dir, model, requests, reference = setup
    cal = calibrator(model_dir, synthetic_text, tmp_path / "cache", **BOUND)

    def interrupt(group: int, _n: int) -> None:
        if group == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cal(model, requests, on_group_done=interrupt)
    (store,) = (tmp_path / "cache").iterdir()
    assert (store / "handoff").is_dir()
    shutil.rmtree(store / "handoff")
    stats = cal(model, requests)
    assert cal.last_run.groups_reused == 2
    assert_same(reference, stats, requests)
