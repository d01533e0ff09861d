"""The out-of-domain range check (qc analyze --text): calibrated ranges and overshoots against numpy."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from qcompiler.analysis.ranges import range_shift
from tests.passes.w8a8_util import run_values


def test_ranges_and_overshoot_match_numpy(synthetic_dir, tmp_path) -> None:
    folder, _ = synthetic_dir
    rng = np.random.default_rng(0)
    calib = rng.integers(32, 127, (2, 32))  # printable bytes
    text = rng.integers(0, 256, (2, 32))  # any byte: other "domain"
    res = range_shift(folder, calib, text, threads=1, top=3)
    names = [e["value"] for e in res["inputs"]]
    assert len(names) == 2 * 4  # qkv, o, gate_up, down per layer
    cal = [run_values(folder, names, ids, tmp_path / f"c{i}") for i, ids in enumerate(calib)]
    new = [run_values(folder, names, ids, tmp_path / f"t{i}") for i, ids in enumerate(text)]
    for e in res["inputs"]:
        n = e["value"]
        hi = max(float(c[n].max()) for c in cal)
        lo = min(float(c[n].min()) for c in cal)
        np.testing.assert_allclose([e["calibrated"]["max"], e["calibrated"]["min"]], [hi, lo], rtol=1e-5)
        x = np.concatenate([t[n].reshape(-1, t[n].shape[-1]) for t in new]).astype(np.float64)
        r = np.maximum(x.max(1) / hi, x.min(1) / lo)
        assert abs(e["tokens_outside"] - float((r > 1).mean())) < 1e-9
        if (r > 1).any():
            assert abs(e["max_overshoot"] - r.max()) < 1e-4 * r.max()
            w = e["worst_tokens"][0]
            assert w["token"] == bytes([int(text[w["window"], w["position"]])]).decode("latin-1") or w["token"]
        else:
            assert e["worst_tokens"] == [] and e["clipped_energy"] == 0.0
    # the calibration text itself stays inside its own ranges
    same = range_shift(folder, calib, calib, threads=1)
    assert all(e["tokens_outside"] == 0 and e["clipped_energy"] == 0 for e in same["inputs"])


def test_cli_ranges_only(synthetic_dir, synthetic_text, tmp_path) -> None:
    folder, _ = synthetic_dir
    other = tmp_path / "other.txt"
    other.write_bytes(bytes(np.random.default_rng(1).integers(0, 128, 400).astype(np.uint8)))
    out = tmp_path / "r"
    proc = subprocess.run([sys.executable, "-m", "qcompiler", "analyze", str(folder), "--calib", str(synthetic_text),
                           "--text", str(other), "--ranges-only", "--out", str(out), "--samples", "2",
                           "--seq-len", "64", "--text-tokens", "128"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "ranges.json").read_text())
    assert data["tokens"] == 128 and len(data["inputs"]) == 8
    assert "| linears |" in (out / "ranges.md").read_text()
