"""Typed calibration options and requests (what passes and commands hand the engine)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qcompiler.calibrate.observers import ObserverConfig, check_observers
from qcompiler.calibrate.plan import parse_memory
from qcompiler.errors import OptionError

#: Bumped when what observers compute changes (part of the cache key).
ENGINE_VERSION = 2  # 2: power-of-two histogram widths, float sums per shard (mergeable observers)


@dataclass(frozen=True)
class StatRequest:
    """Statistics ``observers`` (see :mod:`qcompiler.calibrate.observers`) of the graph value ``value``."""

    value: str
    observers: tuple[str, ...]

    def __post_init__(self) -> None:
        if isinstance(self.observers, str):
            object.__setattr__(self, "observers", (self.observers,))
        object.__setattr__(self, "observers", tuple(self.observers))
        check_observers(self.observers)


@dataclass(frozen=True)
class CalibConfig:
    """Typed calibration options (``qc calibrate`` flags; ``QuantizeOptions`` for ``qc quantize``)."""

    calib: str | None = None
    samples: int = 128
    seq_len: int = 512
    seed: int = 0
    max_memory: int | None = None  # bytes; None: 80% of the memory available at start
    skip_nonfinite: bool = False
    threads: int | None = None
    cache_dir: str | None = None  # default $QC_CALIB_CACHE or ~/.cache/qcompiler/calib
    overhead_bytes: int = 320 << 20  # interpreter, ONNX Runtime, graph, transient tensors (planning)
    progress: bool = True
    observer: ObserverConfig = field(default_factory=ObserverConfig)

    @classmethod
    def from_options(cls, options: Any, **overrides: Any) -> CalibConfig:
        kw: dict[str, Any] = {
            "calib": options.calib,
            "samples": options.calib_samples,
            "seq_len": options.seq_len,
            "seed": options.seed,
            "max_memory": parse_memory(options.max_memory),
            "observer": ObserverConfig(seed=options.seed),
        }
        kw.update(overrides)
        return cls(**kw)

    @property
    def cache_root(self) -> Path:
        default = Path(os.environ.get("QC_CALIB_CACHE", Path.home() / ".cache" / "qcompiler" / "calib"))
        return Path(self.cache_dir) if self.cache_dir else default


def config_hash(cfg: ObserverConfig) -> str:
    blob = json.dumps({"engine": ENGINE_VERSION, **dataclasses.asdict(cfg)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def merge_requests(requests: Sequence[StatRequest]) -> dict[str, tuple[str, ...]]:
    wanted: dict[str, list[str]] = {}
    for r in requests:
        obs = wanted.setdefault(r.value, [])
        obs.extend(o for o in r.observers if o not in obs)
    if not wanted:
        raise OptionError("no statistics were requested")
    return {v: tuple(o) for v, o in wanted.items()}
