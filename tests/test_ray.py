"""``--ray``: the same bytes as one process, and no Ray import without the flag.

Ray is started once for the module (2 CPUs, no dashboard) and stopped at the end; the
commands under test find it initialized and use it (``qcompiler.distributed``).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qcompiler.cli import main
from qcompiler.distributed import RayExecutor, Resources

ray = pytest.importorskip("ray")

MODEL_FILES = ("model.onnx", "model.onnx_data")
NO_RESOURCES = Resources()


@pytest.fixture(scope="module", autouse=True)
def ray_cluster() -> object:
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _private_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QC_CALIB_CACHE", str(tmp_path / "calib-cache"))


class _Counting(RayExecutor):
    """A Ray executor that records which functions became tasks."""

    def __init__(self) -> None:
        super().__init__("local")
        self.seen: list[str] = []

    def map(self, fn, calls, resources: Resources = NO_RESOURCES, desc: str = ""):  # type: ignore[no-untyped-def]
        self.seen.append(fn.__name__)
        return super().map(fn, calls, resources, desc)


def _digests(folder: Path) -> dict[str, str]:
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in MODEL_FILES}


def _npz_arrays(folder: Path) -> dict[str, bytes]:
    out = {}
    for f in sorted(folder.glob("group-*.npz")):
        with np.load(f) as z:
            out.update({f"{f.name}/{k}": z[k].dtype.str.encode() + z[k].tobytes() for k in z.files})
    return out


def test_calibrate_with_ray_equals_one_process_bit_for_bit(synthetic_dir, synthetic_text: Path, tmp_path: Path) -> None:
    """Every observer (Hessians and Σ|x| included), several sweeps with hand-offs, 3 shards of 2 windows."""
    from qcompiler.calibrate import CalibConfig, Calibrator, ObserverConfig, linear_requests
    from qcompiler.distributed import Executor
    from qcompiler.irutil import load_model

    model_dir = synthetic_dir[0]
    model = load_model(model_dir / "model.onnx")
    observers = ("minmax", "absmax_channel", "absmax_channel_window", "mean_abs_channel", "absmax_token",
                 "histogram", "hessian", "outliers", "sample")
    requests = linear_requests(model, observers)
    for name, executor in (("one", Executor()), ("ray", RayExecutor("local"))):
        cfg = CalibConfig(calib=str(synthetic_text), samples=5, seq_len=32, max_memory=700_000, overhead_bytes=0,
                          progress=False, cache_dir=str(tmp_path / f"cache-{name}"),
                          observer=ObserverConfig(histogram_bins=64, sample_rows=40, shard_windows=2))
        Calibrator(model_dir, cfg, executor).calibrate_into(model, requests, tmp_path / name).close()
    a, b = _npz_arrays(tmp_path / "one"), _npz_arrays(tmp_path / "ray")
    assert len(list((tmp_path / "one").glob("group-*.npz"))) > 1  # several sweeps: hand-offs between tasks
    assert a.keys() == b.keys() and any("xtx" in k for k in a)
    assert [k for k in a if a[k] != b[k]] == []
    # one cache for both: what Ray computed is reused in one process (same key, same folder) ...
    cfg = CalibConfig(calib=str(synthetic_text), samples=5, seq_len=32, max_memory=700_000, overhead_bytes=0,
                      progress=False, cache_dir=str(tmp_path / "cache-ray"),
                      observer=ObserverConfig(histogram_bins=64, sample_rows=40, shard_windows=2))
    cal = Calibrator(model_dir, cfg)
    cal.calibrate_into(model, requests, tmp_path / "ray").close()
    assert cal.last_run is not None and cal.last_run.groups_computed == 0
    # ... and a run on Ray extends statistics computed in one process
    more = linear_requests(model, ("minmax", "absmax_token"))
    cal = Calibrator(model_dir, cfg, RayExecutor("local"))
    stats = cal(model, requests[:1], store_dir=tmp_path / "ext")
    stats = Calibrator(model_dir, cfg)(model, more, store_dir=tmp_path / "ext")
    ref = Calibrator(model_dir, cfg)(model, more, store_dir=tmp_path / "ref")
    for r in more:
        for o in r.observers:
            assert np.array_equal(np.asarray(stats.get(r.value, o) if o != "minmax" else stats.get(r.value, o).max),
                                  np.asarray(ref.get(r.value, o) if o != "minmax" else ref.get(r.value, o).max))


def test_quantize_w8a8_smooth_with_ray_is_byte_identical(synthetic_dir, synthetic_text: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from qcompiler.quantize import quantize
    from qcompiler.recipes import QuantizeOptions

    outs = {}
    for mode in ("one", "ray"):
        monkeypatch.setenv("QC_CALIB_CACHE", str(tmp_path / f"cache-{mode}"))  # both compute, neither reuses
        out = tmp_path / mode
        argv = ["-q", "quantize", str(synthetic_dir[0]), str(out), "--recipe", "w8a8-smooth",
                "--calib", str(synthetic_text), "--calib-samples", "12", "--seq-len", "32"]
        assert main(argv + (["--ray", "local"] if mode == "ray" else [])) == 0
        outs[mode] = _digests(out)
    assert outs["one"] == outs["ray"]
    # the work really went to Ray: calibration shards and the α searches
    monkeypatch.setenv("QC_CALIB_CACHE", str(tmp_path / "cache-api"))
    executor = _Counting()
    opts = QuantizeOptions(calib=str(synthetic_text), calib_samples=12, seq_len=32)
    quantize(synthetic_dir[0], tmp_path / "api", recipe="w8a8-smooth", options=opts, executor=executor)
    assert {"observe_shard", "search_alpha"} <= set(executor.seen)
    assert _digests(tmp_path / "api") == outs["one"]


def test_without_the_flag_nothing_imports_ray(synthetic_dir, synthetic_text: Path, tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from qcompiler.cli import main\n"
        f"rc = main(['-q', 'calibrate', {str(synthetic_dir[0])!r}, '--calib', {str(synthetic_text)!r}, "
        f"'--calib-samples', '2', '--seq-len', '16', '--no-progress', '--out', {str(tmp_path / 'st')!r}])\n"
        "assert rc == 0, rc\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
        "print('ok')\n"
    )
    env = {**os.environ, "QC_CALIB_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_analyze_with_ray_gives_the_same_sensitivity_ranking(synthetic_dir, synthetic_text: Path,
                                                             tmp_path: Path) -> None:
    from qcompiler.analysis import AnalyzeConfig, MeasureConfig, analyze

    measure = MeasureConfig(samples=6, seq_len=64, rows=128, block_windows=2, block_seq_len=32, progress=False)
    reports = {}
    counting = _Counting()
    for name, executor in (("one", None), ("ray", counting)):
        cfg = AnalyzeConfig(calib=str(synthetic_text), cache_dir=str(tmp_path / f"cache-{name}"), measure=measure,
                            budget=5.0, pareto_budgets=(5.0,), e2e_top=0, pareto_e2e=False)
        reports[name] = analyze(synthetic_dir[0], tmp_path / name, cfg, executor=executor)
    assert {"observe_shard", "_layers_task"} <= set(counting.seen)
    one, ray_ = reports["one"], reports["ray"]
    assert one["ranking"] == ray_["ranking"] and len(one["ranking"]) > 4
    assert one["mixed"]["assignment"] == ray_["mixed"]["assignment"]
    for a, b in zip(one["layers"], ray_["layers"]):
        assert a["key"] == b["key"]
        for cand, v in a["sensitivity"].items():
            assert b["sensitivity"][cand] == pytest.approx(v, rel=1e-6, abs=0.0), (a["key"], cand)


def test_bench_rows_as_ray_tasks_match_the_rows_run_here(synthetic_dir, synthetic_text: Path, tmp_path: Path) -> None:
    """The same table (quality columns: perplexity, KL, top-1, size), in the same row order."""
    small = ["--eval-tokens", "256", "--eval-seq-len", "64", "--no-speed", "--threads", "1", "--group-size", "32",
             "--recipes", "w4a16-rtn,w8a16-rtn"]
    tables = {}
    for mode in ("one", "ray"):
        out = tmp_path / mode
        argv = ["-q", "bench", str(synthetic_dir[0]), "--text", str(synthetic_text), "--out", str(out), *small]
        assert main(argv + (["--ray", "local"] if mode == "ray" else [])) == 0
        data = json.loads((out / "bench.json").read_text())
        tables[mode] = [(r["name"], r["status"], r["perplexity"], r["kl"], r["top1"], r["size_bytes"])
                        for r in data["rows"]]
    assert [r[0] for r in tables["one"]] == ["fp32", "w4a16-rtn", "w8a16-rtn"]
    assert all(r[1] == "ok" for r in tables["ray"])
    assert tables["one"] == tables["ray"]
