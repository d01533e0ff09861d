"""The calibration engine: ONNX Runtime sweeps over token windows, observers reduced per batch.

``Calibrator(model, requests)``:

1. key = (SHA-256 of the model as it is now, of the calibration windows, of the
   observer settings); statistics live in ``<cache>/<key>/`` (or a folder the caller
   names) and whatever (value, observer) pairs are already there are reused;
2. the missing values are planned into sweeps under the memory bound
   (:mod:`qcompiler.calibrate.plan`);
3. per sweep, one ORT session computes the sweep's slice of the graph (see
   :mod:`qcompiler.calibrate.graph`), fed per window with the values the previous
   sweep handed off (:mod:`qcompiler.calibrate.handoff`); each window is one batch:
   its outputs are checked for NaN/Inf (abort naming the value and batch, or drop the
   batch with ``skip_nonfinite``), folded into the observers and released.  Values are
   folded in parallel on a thread pool (``threads`` or one per core) with BLAS limited
   to one thread each: numpy and BLAS release the GIL, and a multi-threaded ``syrk``
   per value spends its time synchronizing (measured on SmolLM2, 2 loaded cores: half
   the CPU time and wall time of serial updates with multi-threaded BLAS);
4. the sweep's states are saved as one group before the next sweep starts, so an
   interrupted run resumes from the last finished group.

Windows are observed in shards of ``shard_windows`` (:mod:`qcompiler.calibrate.shard`):
in this process one after the other, or — with an executor from ``--ray``
(:mod:`qcompiler.distributed`) — one Ray task per shard and sweep, each opening its own
session over the sweep's graph, and the shards' observers merged in shard order: the
same statistics, bit for bit, and the same cache folder, so a run started with Ray
resumes without it and the other way round.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from qcompiler.artifact import check_not_overlapping
from qcompiler.calibrate.config import CalibConfig, StatRequest, config_hash, merge_requests
from qcompiler.calibrate.graph import GraphIndex, calibration_proto, model_fingerprint, open_session
from qcompiler.calibrate.handoff import Handoff
from qcompiler.calibrate.observers import (
    BatchView,
    Observer,
    ObserverConfig,
    Sample,
)
from qcompiler.calibrate.plan import (
    PlannedValue,
    Sweep,
    describe_values,
    format_bytes,
    plan_groups,
    plan_sweeps,
    weight_bytes,
)
from qcompiler.calibrate.shard import (
    Observers,
    ShardJob,
    merge_shards,
    observe_shard,
    observe_windows,
    shard_ranges,
)
from qcompiler.calibrate.store import META, CalibrationStats, StatsKey, StatsStore, read_meta, stored_key
from qcompiler.calibrate.windows import CalibWindows, load_windows
from qcompiler.distributed import Executor, Resources
from qcompiler.errors import CalibrationError, OptionError, OutputError
from qcompiler.memory import peak_rss_mb

log = logging.getLogger(__name__)

@dataclass
class RunInfo:
    """What the last call did (for reports and tests)."""

    path: Path
    groups_computed: int = 0
    groups_reused: int = 0
    values_computed: int = 0
    skipped_windows: list[int] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0


def _available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (so two runs with one key compute it once)."""
    path.mkdir(parents=True, exist_ok=True)
    with open(path / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _update(observers: dict[str, Observer], view: BatchView) -> None:
    for o in observers.values():
        o.update(view)
    view.release()


def _external_bytes(proto: onnx.ModelProto) -> int:
    """Bytes of the weights a calibration graph maps (its external-data lengths)."""
    total = 0
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "length":
                total += int(e.value)
    return total


def _remove_leftovers(path: Path) -> None:
    """Scratch files of a killed run (the lock is held: no other run is using them)."""
    for p in [*path.glob(".scratch-*"), *path.glob(".*.tmp"), *path.glob("handoff/.*.tmp")]:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


class Calibrator:
    """Computes :class:`CalibrationStats` of a model (as it is now) on the calibration windows."""

    def __init__(self, model_dir: str | os.PathLike, config: CalibConfig, executor: Executor | None = None) -> None:
        if not config.calib:
            raise OptionError("calibration needs data: pass --calib PATH (a .txt, .jsonl or folder of .txt)")
        self.model_dir = Path(model_dir)
        self.config = config
        self.executor = executor or Executor()
        self._windows: CalibWindows | None = None
        self.last_run: RunInfo | None = None

    @property
    def windows(self) -> CalibWindows:
        if self._windows is None:
            c = self.config
            self._windows = load_windows(self.model_dir, str(c.calib), c.samples, c.seq_len, c.seed)
        return self._windows

    def key(self, model: ir.Model, observer: ObserverConfig | None = None) -> StatsKey:
        return StatsKey(model_fingerprint(model), self.windows.digest, config_hash(observer or self.config.observer))

    def __call__(self, model: ir.Model, requests: Sequence[StatRequest], *, store_dir: str | os.PathLike | None = None,
                 cache: bool = True, on_group_done: Callable[[int, int], None] | None = None) -> CalibrationStats:
        """Statistics for ``requests`` on ``model``; reuses and extends the statistics folder of its key.

        ``cache=False`` (e.g. GPTQ calling again after every layer: the model never
        repeats) keeps the statistics in a temporary folder, removed with the result.
        """
        if cache or store_dir is not None:
            return self._run(model, merge_requests(requests), self.config.observer, store_dir, on_group_done)
        root = self.config.cache_root
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".uncached-", dir=root))
        try:
            stats = self._run(model, merge_requests(requests), self.config.observer, tmp, on_group_done)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        weakref.finalize(stats, shutil.rmtree, tmp, True)
        return stats

    def capture(self, model: ir.Model, values: Sequence[str], max_rows: int | None = None) -> dict[str, Sample]:
        """A seeded uniform sample of at most ``max_rows`` rows of each value (the same rows for all)."""
        obs = self.config.observer
        if max_rows is not None:
            obs = dataclasses.replace(obs, sample_rows=max_rows)
        stats = self._run(model, {v: ("sample",) for v in values}, obs, None, None)
        return {v: stats.get(v, "sample") for v in values}

    def calibrate_into(self, model: ir.Model, requests: Sequence[StatRequest], out: str | os.PathLike,
                       force: bool = False, on_group_done: Callable[[int, int], None] | None = None) -> CalibrationStats:
        """Write statistics to the folder ``out`` (``qc calibrate --out``).

        Work happens in ``.<out>.partial`` beside it, renamed to ``out`` when complete; a
        rerun after an interruption resumes there.  An existing ``out`` for the same key
        is reused (and extended); one of another model or data is refused unless ``force``.
        """
        t0 = time.perf_counter()
        out = Path(out)
        check_not_overlapping(out, (self.model_dir, self.config.calib), what="statistics folder")
        partial = out.with_name(f".{out.name}.partial")
        key = self.key(model)
        wanted = merge_requests(requests)
        if out.exists():
            if not (out / META).is_file():
                if not out.is_dir() or any(out.iterdir()):  # --force replaces statistics, never other folders
                    raise OutputError(f"{out} exists and is not a statistics folder (no {META}); choose another "
                                      "--out or remove it yourself (--force only replaces statistics)")
            else:
                why = stored_key(read_meta(out)).mismatch(key)
                if why and not force:
                    raise OutputError(f"{out} holds statistics that cannot be reused: {why}; "
                                           "pass --force to replace them or choose another --out")
                if not why:
                    stats = CalibrationStats(out)
                    if all(stats.has(v, o) for v, obs in wanted.items() for o in obs):
                        self.last_run = RunInfo(out, groups_reused=len(stats.meta["groups"]),
                                                seconds=time.perf_counter() - t0, peak_rss_mb=peak_rss_mb())
                        log.info("statistics for this model and data are already in %s", out)
                        return stats
                    stats.close()
                    shutil.rmtree(partial, ignore_errors=True)
                    os.replace(out, partial)  # extend them: work on the folder under the partial name
        if partial.exists() and (partial / META).is_file() and stored_key(read_meta(partial)).mismatch(key):
            log.info("discarding %s (an interrupted run for other inputs)", partial)
            shutil.rmtree(partial)
        try:
            self._run(model, wanted, self.config.observer, partial, on_group_done).close()
        except KeyboardInterrupt:
            log.warning("interrupted: finished sweeps are kept in %s; rerun the same command to resume", partial)
            raise
        if out.exists():
            shutil.rmtree(out)
        os.replace(partial, out)
        if self.last_run is not None:
            self.last_run.path = out
        return CalibrationStats(out)

    # ------------------------------------------------------------------------- internals

    def _run(self, model: ir.Model, wanted: dict[str, tuple[str, ...]], obs_cfg: ObserverConfig,
             store_dir: str | os.PathLike | None, on_group_done: Callable[[int, int], None] | None) -> CalibrationStats:
        t0 = time.perf_counter()
        windows = self.windows
        key = self.key(model, obs_cfg)
        path = Path(store_dir) if store_dir is not None else self.config.cache_root / key.dirname
        info = RunInfo(path)
        with _locked(path):
            _remove_leftovers(path)
            store = StatsStore.open(path, key, {
                "data": windows.describe(),
                "observer_config": dataclasses.asdict(obs_cfg),
                "model_dir": str(self.model_dir),
            })
            have = store.pairs()
            missing = {v: tuple(o for o in obs if o not in have.get(v, set())) for v, obs in wanted.items()}
            missing = {v: obs for v, obs in missing.items() if obs}
            info.groups_reused = len(store.meta["groups"])
            if missing:
                planned = describe_values(model, missing, windows.seq_len)
                groups = self._resumed_plan(store, planned) or self._plan(model, planned, obs_cfg)
                index = GraphIndex.of(model)
                sweeps = plan_sweeps(index, groups)
                handoff = Handoff(path / "handoff")
                pending = [{v.name: list(v.observers) for v in g} for g in groups]
                store.set(pending=pending)
                for gi, sweep in enumerate(sweeps):
                    store.meta["pending"] = pending[gi + 1 :]  # saved with the group, in one write
                    info.skipped_windows += self._sweep(model, index, sweep, store, handoff, obs_cfg, gi, len(sweeps))
                    info.groups_computed += 1
                    info.values_computed += len(sweep.values)
                    if on_group_done is not None:
                        on_group_done(gi, len(sweeps))
                store.set(pending=[])
                shutil.rmtree(handoff.path, ignore_errors=True)
            else:
                log.info("calibration statistics loaded from %s", path)
        info.seconds = time.perf_counter() - t0
        info.peak_rss_mb = peak_rss_mb()
        self.last_run = info
        return store.stats()

    @staticmethod
    def _resumed_plan(store: StatsStore, planned: list[PlannedValue]) -> list[list[PlannedValue]] | None:
        """The interrupted run's remaining sweeps, if they are exactly what is missing now."""
        pending = store.meta.get("pending") or []
        by_name = {v.name: v for v in planned}
        want = {(v.name, o) for v in planned for o in v.observers}
        have = {(n, o) for g in pending for n, obs in g.items() for o in obs}
        if not pending or want != have:
            return None
        log.info("resuming: %d sweep(s) left from the interrupted run", len(pending))
        return [[by_name[n] for n in g] for g in pending]

    def _plan(self, model: ir.Model, planned: list[PlannedValue], obs_cfg: ObserverConfig) -> list[list[PlannedValue]]:
        n = self.windows.count
        per_layer, other = weight_bytes(model, upto=max(v.position for v in planned))
        fixed = other + self.config.overhead_bytes
        budget = self.config.max_memory
        if budget is None:
            # default bound: 1.5 × the weights plus the statistics' own state (Hessians, histograms),
            # so the runtime's copies and one window's activations cost at most half the model more;
            # never above 80% of the memory available now
            avail = _available_bytes()
            roomy = None if avail is None else int(0.8 * avail + peak_rss_mb() * (1 << 20))
            states = sum(v.state_bytes(obs_cfg, n) for v in planned)
            default = int(1.5 * (sum(per_layer.values()) + other) + states)
            budget = default if roomy is None else min(default, roomy)
            try:
                groups, est = plan_groups(planned, budget, obs_cfg, n, fixed, per_layer)
            except OptionError:  # one layer alone needs more: use what the machine has
                budget = roomy
                groups, est = plan_groups(planned, budget, obs_cfg, n, fixed, per_layer)
        else:
            groups, est = plan_groups(planned, budget, obs_cfg, n, fixed, per_layer)
        log.info("calibration: %d values in %d sweep(s) over %d windows of %d tokens, estimated peak %s%s",
                 len(planned), len(groups), n, self.windows.seq_len, format_bytes(est),
                 f" (bound {format_bytes(budget)})" if budget else "")
        return groups

    def _sweep(self, model: ir.Model, index: GraphIndex, sweep: Sweep, store: StatsStore, handoff: Handoff,
               obs_cfg: ObserverConfig, gi: int, ngroups: int) -> list[int]:
        t0 = time.perf_counter()
        skip = store.skipped_windows()
        names = [v.name for v in sweep.values]
        outputs = sweep.outputs
        keep, cut = sweep.keep, sweep.cut
        if cut and not handoff.has(cut):
            log.info("sweep %d: the previous sweep's hand-off is missing; computing from the model's inputs", gi + 1)
            keep, cut = index.slice(outputs, 0)
        cut_types = {n: onnx.helper.np_dtype_to_tensor_dtype(np.dtype(handoff.index[n]["dtype"])) for n in cut}
        values = [(v.name, tuple(v.observers)) for v in sweep.values]
        desc = f"calibrate {gi + 1}/{ngroups}"
        if self.executor.distributed:
            observers, used, skipped = self._sweep_tasks(model, sweep, outputs, keep, cut, cut_types, values, store,
                                                         handoff, obs_cfg, skip, desc)
        else:
            observers, used, skipped = self._sweep_here(model, sweep, outputs, keep, cut, cut_types, values, store,
                                                        handoff, obs_cfg, skip, desc)
        if used == 0:
            raise CalibrationError(f"every calibration batch of sweep {gi + 1} was dropped (NaN/Inf activations)")
        states = {name: {o: ob.state() for o, ob in observers[name].items()} for name in names}
        seconds = time.perf_counter() - t0
        store.write_group(states, {
            "values": names,
            "windows_used": used,
            "skipped_windows": skipped,
            "nodes": len(keep),
            "cut": len(cut),
            "seconds": round(seconds, 2),
            "peak_rss_mb": round(peak_rss_mb(), 1),
        })
        log.info("%s: %d values, %d batches, %d nodes in %.1fs (peak RSS %.0f MiB)",
                 desc, len(names), used, len(keep), seconds, peak_rss_mb())
        return skipped

    def _sweep_here(self, model: ir.Model, sweep: Sweep, outputs: list[str], keep: list[int], cut: list[str],
                    cut_types: dict[str, int], values: list[tuple[str, tuple[str, ...]]], store: StatsStore,
                    handoff: Handoff, obs_cfg: ObserverConfig, skip: set[int],
                    desc: str) -> tuple[Observers, int, list[int]]:
        """All windows in this process; values folded in parallel on a thread pool."""
        windows = self.windows
        observers: Observers = {}
        writer = handoff.writer() if sweep.handoff else None
        workers = self.config.threads or os.cpu_count() or 1
        with tempfile.TemporaryDirectory(prefix=".scratch-", dir=store.path) as scratch, \
                ThreadPoolExecutor(workers) as pool, threadpool_limits(1, user_api="blas"):
            session = open_session(model, outputs, Path(scratch), keep, cut_types, self.config.threads)
            bar = tqdm(total=windows.count, desc=desc, unit="batch", disable=not self.config.progress, leave=False)

            def run(w: int) -> list[np.ndarray]:
                return session.run(windows.ids[w : w + 1], {n: handoff.read(n, w) for n in cut})

            def update(obs: list[dict[str, Observer]], views: list[BatchView]) -> None:
                # values in parallel, one BLAS thread each (numpy/BLAS release the GIL)
                list(pool.map(_update, obs, views))

            try:
                used, skipped = observe_windows(
                    run, outputs, values, range(windows.count), skip, windows.count, obs_cfg, observers,
                    writer=writer, handoff_out=sweep.handoff, skip_nonfinite=self.config.skip_nonfinite,
                    update=update, tick=lambda: bar.update(1))
                if writer is not None:
                    writer.commit()
            finally:
                bar.close()
                if writer is not None:
                    writer.close()
                session = None  # release ONNX Runtime
        return observers, used, skipped

    def _sweep_tasks(self, model: ir.Model, sweep: Sweep, outputs: list[str], keep: list[int], cut: list[str],
                     cut_types: dict[str, int], values: list[tuple[str, tuple[str, ...]]], store: StatsStore,
                     handoff: Handoff, obs_cfg: ObserverConfig, skip: set[int],
                     desc: str) -> tuple[Observers, int, list[int]]:
        """One task per shard of windows (:func:`~qcompiler.calibrate.shard.observe_shard`), merged in shard order."""
        windows = self.windows
        handoff.path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".scratch-", dir=store.path) as scratch:
            proto, root = calibration_proto(model, outputs, Path(scratch), keep, cut_types)
            graph = Path(scratch) / "sweep.onnx"
            graph.write_bytes(proto.SerializeToString())
            shards = shard_ranges(windows.count, obs_cfg.shard_windows)
            memory = (_external_bytes(proto) + self.config.overhead_bytes
                      + sum(v.bytes(obs_cfg, len(shards[0])) for v in sweep.values))
            jobs = [(ShardJob(str(graph), str(root), tuple(outputs), tuple(values), tuple(cut), str(handoff.path),
                              tuple(sweep.handoff), tuple(r), windows.ids[r.start : r.stop], frozenset(skip),
                              windows.count, obs_cfg, self.config.skip_nonfinite, 1),) for r in shards]
            del proto
            writer = handoff.writer() if sweep.handoff else None
            try:
                results = self.executor.map(observe_shard, jobs, Resources(1.0, memory),
                                            desc=f"{desc}: {len(shards)} shard(s) of {obs_cfg.shard_windows} windows")
                if writer is not None:
                    for r in results:
                        writer.adopt(r.handoff)
                    writer.commit()
            finally:
                if writer is not None:
                    writer.close()
        observers = merge_shards([r.observers for r in results], obs_cfg)
        return observers, sum(r.used for r in results), [w for r in results for w in r.dropped]


def fewer_windows(calibrate: Any, samples: int) -> Any:
    """``calibrate`` (a pass context's calibrator) drawing at most ``samples`` windows (the same text and seed);
    ``calibrate`` itself when it draws no more, ``samples <= 0``, or it is not a :class:`Calibrator`."""
    if samples <= 0 or not isinstance(calibrate, Calibrator) or calibrate.config.samples <= samples:
        return calibrate
    return Calibrator(calibrate.model_dir, dataclasses.replace(calibrate.config, samples=samples), calibrate.executor)


def make_calibrator(model_dir: Path, options: Any, executor: Executor | None = None) -> Calibrator:
    """The calibrator ``qc quantize`` hands to passes (``options``: ``QuantizeOptions``)."""
    return Calibrator(model_dir, CalibConfig.from_options(options), executor)
