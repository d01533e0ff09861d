"""Statistics on disk: a folder of ``.npz`` groups plus ``stats.json`` metadata.

::

    STATS_DIR/
      stats.json       key (model hash, data hash, config hash), data and observer settings,
                       and per finished group: its file, which (value, observer) pairs it holds,
                       the array names, skipped windows, time and peak memory
      group-000.npz    the observers' states of the values of one sweep
      group-001.npz    ...

A group is written when its sweep has finished: first the ``.npz`` (temporary name,
then renamed), then ``stats.json`` (the same way), so a run killed at any point
leaves a consistent folder holding every finished group, and a rerun computes only
what is missing.  :class:`CalibrationStats` reads arrays lazily, one at a time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qcompiler.artifact import write_json
from qcompiler.calibrate.observers import OBSERVERS
from qcompiler.errors import CalibrationError, OutputError

log = logging.getLogger(__name__)

FORMAT = "qcompiler-calibration"
VERSION = 1
META = "stats.json"


@dataclass(frozen=True)
class StatsKey:
    """What statistics depend on: the model, the calibration windows, the observer settings."""

    model_hash: str
    data_hash: str
    config_hash: str

    @property
    def dirname(self) -> str:
        return f"{self.model_hash[:16]}-{self.data_hash[:12]}-{self.config_hash[:8]}"

    def mismatch(self, other: StatsKey) -> str | None:
        """A sentence naming the first differing hash (``self`` = stored), else None."""
        for field, what in (("model_hash", "another model"), ("data_hash", "other calibration data"),
                            ("config_hash", "other observer settings")):
            a, b = getattr(self, field), getattr(other, field)
            if a != b:
                return f"they were computed for {what}: {field.replace('_', ' ')} {a[:12]} ≠ {b[:12]} of this run"
        return None


def read_meta(path: Path) -> dict[str, Any]:
    p = path / META
    try:
        meta = json.loads(p.read_text())
    except FileNotFoundError:
        raise CalibrationError(f"{path} holds no calibration statistics (no {META})") from None
    except (OSError, ValueError) as e:
        raise CalibrationError(f"{p} is unreadable or not JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CalibrationError(f"{p} is not a qcompiler calibration file")
    if meta.get("version") != VERSION:
        raise CalibrationError(f"{p} has format version {meta.get('version')}, this qcompiler reads {VERSION}")
    return meta


def stored_key(meta: dict[str, Any]) -> StatsKey:
    k = meta["key"]
    return StatsKey(k["model_hash"], k["data_hash"], k["config_hash"])


class StatsStore:
    """A statistics folder being written (see module docstring)."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        self.meta = meta

    @classmethod
    def open(cls, path: str | os.PathLike, key: StatsKey, info: dict[str, Any]) -> StatsStore:
        """Open ``path`` for ``key`` (creating it), refusing a folder that holds other statistics."""
        p = Path(path)
        if (p / META).is_file():
            meta = read_meta(p)
            why = stored_key(meta).mismatch(key)
            if why:
                raise CalibrationError(f"{p} holds statistics that cannot be reused: {why}")
            return cls(p, meta)
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create {p}: {e.strerror or e}") from None
        meta = {"format": FORMAT, "version": VERSION, "key": key.__dict__, **info, "groups": []}
        write_json(p / META, meta)
        return cls(p, meta)

    def pairs(self) -> dict[str, set[str]]:
        have: dict[str, set[str]] = {}
        for g in self.meta["groups"]:
            for value, obs in g["arrays"].items():
                have.setdefault(value, set()).update(obs)
        return have

    def skipped_windows(self) -> set[int]:
        return {w for g in self.meta["groups"] for w in g.get("skipped_windows", [])}

    def write_group(self, states: dict[str, dict[str, dict[str, np.ndarray]]], info: dict[str, Any]) -> None:
        """Save one finished sweep: ``states[value][observer][field]`` arrays."""
        index = len(self.meta["groups"])
        name = f"group-{index:03d}.npz"
        arrays: dict[str, np.ndarray] = {}
        names: dict[str, dict[str, dict[str, str]]] = {}
        for vi, (value, per_obs) in enumerate(states.items()):
            for obs, fields in per_obs.items():
                for field, arr in fields.items():
                    key = f"v{vi}.{obs}.{field}"
                    arrays[key] = arr
                    names.setdefault(value, {}).setdefault(obs, {})[field] = key
        tmp = self.path / f".{name}.tmp"
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, self.path / name)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise OutputError(f"cannot write {self.path / name}: {e.strerror or e}") from None
        self.meta["groups"].append({"file": name, "arrays": names, **info})
        write_json(self.path / META, self.meta)

    def set(self, **fields: Any) -> None:
        self.meta.update(fields)
        write_json(self.path / META, self.meta)

    def stats(self) -> CalibrationStats:
        return CalibrationStats(self.path, self.meta)


class CalibrationStats:
    """Statistics by (value name, observer), read lazily from a statistics folder.

    ``get(value, observer)`` returns what the observer documents (an array or a small
    dataclass such as :class:`~qcompiler.calibrate.histogram.Histogram` with
    ``percentile(p)``, ``entropy_range(bits)``, ``mse_range(bits)``).
    """

    def __init__(self, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.meta = meta if meta is not None else read_meta(self.path)
        self._index: dict[tuple[str, str], tuple[str, dict[str, str]]] = {}
        for g in self.meta["groups"]:
            for value, per_obs in g["arrays"].items():
                for obs, fields in per_obs.items():
                    self._index[(value, obs)] = (g["file"], fields)
        self._files: dict[str, Any] = {}

    @classmethod
    def load(cls, path: str | os.PathLike, model_hash: str | None = None) -> CalibrationStats:
        """Open a statistics folder; with ``model_hash``, refuse statistics of another model."""
        stats = cls(path)
        if model_hash is not None and stats.model_hash != model_hash:
            raise CalibrationError(
                f"{path} holds statistics of another model: model hash {stats.model_hash[:12]} ≠ "
                f"{model_hash[:12]} of this model; recalibrate (qc calibrate) for this model"
            )
        return stats

    @property
    def model_hash(self) -> str:
        return self.meta["key"]["model_hash"]

    @property
    def data_hash(self) -> str:
        return self.meta["key"]["data_hash"]

    def values(self) -> list[str]:
        return sorted({v for v, _ in self._index})

    def observers(self, value: str) -> list[str]:
        return sorted(o for v, o in self._index if v == value)

    def has(self, value: str, observer: str) -> bool:
        return (value, observer) in self._index

    def get(self, value: str, observer: str) -> Any:
        if (value, observer) not in self._index:
            have = self.observers(value)
            detail = f"it has {', '.join(have)}" if have else "the value was not observed"
            raise CalibrationError(f"no '{observer}' statistics for value '{value}' in {self.path} ({detail})")
        file, fields = self._index[(value, observer)]
        if file not in self._files:
            try:
                self._files[file] = np.load(self.path / file, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise CalibrationError(f"cannot read {self.path / file}: {e}") from None
        npz = self._files[file]
        return OBSERVERS[observer].result({f: npz[k] for f, k in fields.items()})

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> CalibrationStats:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        return f"CalibrationStats({self.path}, {len(self.values())} values, {len(self._index)} statistics)"
