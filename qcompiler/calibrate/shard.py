"""One sweep over a range of calibration windows: the loop the engine runs in-process, and a Ray task.

Windows ``0..n-1`` are cut into *shards* of ``ObserverConfig.shard_windows`` consecutive
windows (boundaries depend only on the window index).  :func:`observe_windows` runs the
sweep's ONNX Runtime session window by window, writes the hand-off values, checks each
batch for NaN/Inf, folds it into the observers and closes the observers' shard
(:meth:`~qcompiler.calibrate.observers.Observer.end_shard`) after each shard's last
window.  The engine calls it either once over all windows with one set of observers (in
this process), or, with ``--ray``, once per shard in a task (:func:`observe_shard`, fresh
observers), and merges the shards' observers in shard order.  Both perform the same
floating-point additions in the same order, so the statistics are bit-identical
(:mod:`~qcompiler.calibrate.observers`, "Merging").

A task receives a :class:`ShardJob` — the path of the sweep's graph (a few MB: the weights
stay in the model's external-data files, which ONNX Runtime maps), the token ids of its
windows, the observer settings — and returns a :class:`ShardResult`: the observers'
states (a Hessian is ``C²`` floats; everything else is ``O(C)`` or ``O(rows)``) and what
it wrote into the hand-off files (disjoint windows of shared files, by positional writes).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from threadpoolctl import threadpool_limits

from qcompiler.calibrate.handoff import Handoff, HandoffWriter
from qcompiler.calibrate.observers import OBSERVERS, BatchView, Observer, ObserverConfig
from qcompiler.errors import CalibrationError

log = logging.getLogger(__name__)

Observers = dict[str, dict[str, Observer]]


def batch_views(outs: Sequence[np.ndarray], names: Sequence[str], w: int, count: int,
                skip_nonfinite: bool) -> list[BatchView] | None:
    """The batch of window ``w`` as views; None if a value holds NaN/Inf and such batches are dropped."""
    views = []
    for name, out in zip(names, outs):
        if not np.issubdtype(out.dtype, np.floating):
            raise CalibrationError(f"value '{name}' is {out.dtype}, not a floating-point activation")
        view = BatchView(out, w)
        if not view.is_finite():
            where = f"value '{name}' holds NaN or Inf in calibration batch {w} (window {w + 1} of {count})"
            if not skip_nonfinite:
                raise CalibrationError(f"non-finite activation: {where}; pass --skip-nonfinite to drop such batches")
            log.warning("dropping a batch: %s", where)
            return None
        views.append(view)
    return views


def _update_all(observers: list[dict[str, Observer]], views: list[BatchView]) -> None:
    for obs, view in zip(observers, views):
        for o in obs.values():
            o.update(view)
        view.release()


def observe_windows(
    run: Callable[[int], list[np.ndarray]],
    outputs: Sequence[str],
    values: Sequence[tuple[str, Sequence[str]]],
    windows: Sequence[int],
    skip: set[int],
    count: int,
    cfg: ObserverConfig,
    observers: Observers,
    *,
    writer: HandoffWriter | None = None,
    handoff_out: Sequence[str] = (),
    skip_nonfinite: bool = False,
    update: Callable[[list[dict[str, Observer]], list[BatchView]], None] = _update_all,
    tick: Callable[[], None] | None = None,
) -> tuple[int, list[int]]:
    """Observe ``windows`` (ascending; those in ``skip`` are passed over); returns (batches used, dropped).

    ``run(w)`` gives the session's ``outputs`` for window ``w``; observers are created in
    ``observers`` on first sight of a value and their shard is closed after every shard's
    last window (module docstring).
    """
    names = [n for n, _ in values]
    used, dropped = 0, []
    for w in windows:
        if tick is not None:
            tick()
        if w not in skip:
            outs = dict(zip(outputs, run(w)))
            if writer is not None:
                for h in handoff_out:
                    writer.write(h, w, outs[h])
            views = batch_views([outs[n] for n in names], names, w, count, skip_nonfinite)
            del outs
            if views is None:
                dropped.append(w)
            else:
                for (name, obs), view in zip(values, views):
                    if name not in observers:
                        observers[name] = {o: OBSERVERS[o](cfg, view.channels) for o in obs}
                update([observers[n] for n in names], views)
                used += 1
                del views
        if (w + 1) % cfg.shard_windows == 0 or w == count - 1:
            for obs in observers.values():
                for o in obs.values():
                    o.end_shard()
    return used, dropped


def shard_ranges(count: int, shard_windows: int) -> list[range]:
    """The shards of ``count`` windows: ``[0, s), [s, 2s), ...``."""
    return [range(a, min(a + shard_windows, count)) for a in range(0, count, shard_windows)]


def merge_shards(results: Sequence[Observers], cfg: ObserverConfig) -> Observers:
    """Fresh observers with every shard's observers merged into them, in shard order."""
    merged: Observers = {}
    for part in results:
        for name, obs in part.items():
            into = merged.setdefault(name, {})
            for o, ob in obs.items():
                if o not in into:
                    into[o] = OBSERVERS[o](cfg, ob.channels)
                into[o].merge(ob)
    return merged


@dataclass(frozen=True)
class ShardJob:
    """What a calibration task needs (small: paths, token ids, settings)."""

    graph: str  # the sweep's graph (.onnx without weights)
    root: str  # the folder its external-data locations are relative to
    outputs: tuple[str, ...]
    values: tuple[tuple[str, tuple[str, ...]], ...]  # (value, observers)
    cut: tuple[str, ...]  # fed from the hand-off folder
    handoff_dir: str
    handoff_out: tuple[str, ...]  # written for later sweeps
    windows: tuple[int, ...]
    ids: np.ndarray  # [len(windows), seq_len] token ids of those windows
    skip: frozenset[int]
    count: int
    cfg: ObserverConfig
    skip_nonfinite: bool = False
    threads: int = 1


@dataclass
class ShardResult:
    observers: Observers
    used: int
    dropped: list[int]
    handoff: dict[str, dict[str, Any]] = field(default_factory=dict)


def observe_shard(job: ShardJob) -> ShardResult:
    """A Ray task: one shard of one sweep (module docstring)."""
    from qcompiler.calibrate.graph import session_from_proto

    proto = onnx.load_model(job.graph, load_external_data=False)
    session = session_from_proto(proto, Path(job.root), list(job.outputs), list(job.cut), job.threads)
    handoff = Handoff(Path(job.handoff_dir))
    writer = handoff.writer() if job.handoff_out else None
    row = {w: i for i, w in enumerate(job.windows)}

    def run(w: int) -> list[np.ndarray]:
        return session.run(job.ids[row[w] : row[w] + 1], {n: handoff.read(n, w) for n in job.cut})

    observers: Observers = {}
    try:
        with threadpool_limits(job.threads, user_api="blas"):
            used, dropped = observe_windows(run, job.outputs, job.values, job.windows, set(job.skip), job.count,
                                            job.cfg, observers, writer=writer, handoff_out=job.handoff_out,
                                            skip_nonfinite=job.skip_nonfinite)
        infos = {}
        if writer is not None:
            writer.flush()
            infos = writer.infos()
    finally:
        session = None  # release ONNX Runtime before returning
    return ShardResult(observers, used, dropped, infos)
