"""Planning sweeps under a memory bound.

Memory of one sweep over a group ``G`` of values in layers ``L(G)`` (what
``--max-memory`` bounds)::

    peak ≈ overhead + W_other + Σ_{l∈L(G)} W_l + Σ_{v∈G} (state(v) + 2·rows(v)·C(v)·4)

``W_l`` is the bytes of layer ``l``'s linear weights (a sweep computes, and ONNX
Runtime maps, only the layers since the previous sweep: earlier ones are handed
off), ``W_other`` the
other weights except embedding tables only read by ``Gather`` (only the rows of the
calibration tokens are touched), ``overhead`` the interpreter, ONNX Runtime, the
graph and its transient tensors (``CalibConfig.overhead_bytes``), ``state(v)`` the
observers' memory (``Observer.nbytes``: e.g. ``4·C²`` for a Hessian) and the last
term one batch of the activation (ORT's output and a working copy such as ``|x|``).

Values are ordered by their position in the graph and grouped by decoder *layer*
(the layer of the linear that reads them, from canonicalize's ``LinearInfo``; a
value no linear reads joins the next linear's layer).  Whole layers are packed
greedily into sweeps; a layer that alone exceeds the budget is split by value, and
a single value that does not fit is an error naming the numbers.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

import onnx_ir as ir

from qcompiler.calibrate.graph import GraphIndex, find_values
from qcompiler.calibrate.observers import OBSERVERS, ObserverConfig
from qcompiler.errors import OptionError, QCError
from qcompiler.irutil import linear_weight, topo_index
from qcompiler.spec import linear_info

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_memory(text: str | int | None) -> int | None:
    """``"4GB"`` → bytes (binary units: 1 GB = 2³⁰ B); None stays None."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise QCError(f"--max-memory '{text}': expected a size like 4GB, 512MB or 1.5GiB")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise QCError(f"--max-memory '{text}' must be positive")
    return value


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


@dataclass(frozen=True)
class PlannedValue:
    name: str
    observers: tuple[str, ...]
    position: int  # producer's index in the graph (-1 for a graph input)
    layer: int  # sweep unit
    channels: int  # last axis (estimated when the graph has no shape for it)
    rows: int  # rows per window

    def state_bytes(self, cfg: ObserverConfig, windows: int) -> int:
        return sum(OBSERVERS[o].nbytes(cfg, self.channels, self.rows * windows) for o in self.observers)

    def batch_bytes(self) -> int:
        return 2 * self.rows * self.channels * 4

    def bytes(self, cfg: ObserverConfig, windows: int) -> int:
        return self.state_bytes(cfg, windows) + self.batch_bytes()


def describe_values(model: ir.Model, wanted: dict[str, tuple[str, ...]], seq_len: int) -> list[PlannedValue]:
    """Position, layer, channels and rows of each requested value, in graph order."""
    values = find_values(model)
    order = topo_index(model.graph)
    linears: list[tuple[int, int]] = []  # (position, layer) of annotated decoder linears
    widths: list[int] = []
    for node in model.graph:
        info = linear_info(node)
        if info is not None and info.layer >= 0:
            linears.append((order[id(node)], info.layer))
        lw = linear_weight(node)
        if lw is not None and lw[0].shape is not None:
            widths.append(int(lw[0].shape[1 if lw[1] else 0]))
    linears.sort()
    fallback_width = max(widths, default=4096)
    out = []
    for name, obs in wanted.items():
        v = values.get(name)
        if v is None:
            raise OptionError(
                f"no value named '{name}' in the model to calibrate (requests name values of the graph, "
                "e.g. a linear's input)"
            )
        prod = v.producer()
        pos = order[id(prod)] if prod is not None else -1
        layer = _layer_of(v, pos, linears)
        channels, rows = _extent(v, seq_len, fallback_width)
        out.append(PlannedValue(name, obs, pos, layer, channels, rows))
    out.sort(key=lambda p: (p.position, p.name))
    return out


def _layer_of(v: ir.Value, pos: int, linears: list[tuple[int, int]]) -> int:
    readers = [info.layer for u in v.consumers() if (info := linear_info(u)) is not None and info.layer >= 0]
    if readers:
        return min(readers)
    if not linears:
        return pos  # no annotations: every value is its own unit, in graph order
    i = bisect.bisect_left(linears, (pos, -1))
    return linears[i][1] if i < len(linears) else linears[-1][1] + 1


def _extent(v: ir.Value, seq_len: int, fallback_width: int) -> tuple[int, int]:
    channels = None
    if v.shape is not None and len(v.shape) and isinstance(v.shape[-1], int):
        channels = int(v.shape[-1])
    if channels is None:
        for u in v.consumers():
            lw = linear_weight(u)
            if lw is not None and u.inputs[0] is v and lw[0].shape is not None:
                channels = int(lw[0].shape[1 if lw[1] else 0])
                break
    rows = seq_len
    if v.shape is not None and len(v.shape) > 1:
        rows = 1
        for i, d in enumerate(v.shape[:-1]):
            rows *= d if isinstance(d, int) else (1 if i == 0 else seq_len)
    return channels or fallback_width, max(rows, 1)


def weight_bytes(model: ir.Model, upto: int | None = None) -> tuple[dict[int, int], int]:
    """``({layer: bytes of its linear weights}, bytes of the other weights)`` that nodes at graph
    positions ``≤ upto`` read; see module docstring."""
    order = topo_index(model.graph)
    last = len(order) if upto is None else upto
    per_layer: dict[int, int] = {}
    counted: set[int] = set()
    for node in model.graph:
        info = linear_info(node)
        lw = linear_weight(node)
        if info is None or info.layer < 0 or lw is None or lw[0].const_value is None:
            continue
        if id(lw[0]) not in counted:
            counted.add(id(lw[0]))
            per_layer[info.layer] = per_layer.get(info.layer, 0) + lw[0].const_value.nbytes
    other = 0
    for v in model.graph.initializers.values():
        if id(v) in counted or v.const_value is None:
            continue
        users = [u for u in v.consumers() if order.get(id(u), -1) <= last]
        if not users or all(u.op_type == "Gather" and u.inputs[0] is v for u in users):
            continue  # not computed, or an embedding table: only the calibration tokens' rows are touched
        other += v.const_value.nbytes
    return per_layer, other


def plan_groups(values: list[PlannedValue], budget: int | None, cfg: ObserverConfig, windows: int,
                fixed: int, layer_weights: dict[int, int] | None = None) -> tuple[list[list[PlannedValue]], int]:
    """Pack layers into sweeps whose memory stays within ``budget`` (None: one sweep).

    Returns the groups and the estimated peak of the largest sweep (``fixed`` included).
    """
    layer_weights = layer_weights or {}
    room = budget - fixed if budget is not None else None
    units: dict[int, list[PlannedValue]] = {}
    for v in values:
        units.setdefault(v.layer, []).append(v)
    groups: list[list[PlannedValue]] = []
    cur: list[PlannedValue] = []
    used = peak = 0
    prev = -1
    for layer in sorted(units, key=lambda u: min(p.position for p in units[u])):
        members = units[layer]
        # the sweep holding this unit also computes the layers since the previous unit
        lw = sum(layer_weights.get(k, 0) for k in range(prev + 1, layer + 1)) if layer_weights else 0
        prev = max(prev, layer)
        size = lw + sum(v.bytes(cfg, windows) for v in members)
        pieces = [members] if room is None or size <= room else [[v] for v in members]
        for piece in pieces:
            b = sum(v.bytes(cfg, windows) for v in piece) + lw
            if room is not None and b > room:
                raise OptionError(
                    f"--max-memory {format_bytes(budget or 0)} is too small: the runtime and shared weights need "
                    f"{format_bytes(fixed)} and '{piece[0].name}' (layer {layer}) alone {format_bytes(b)} "
                    f"(at least {format_bytes(fixed + b)} in all)"
                )
            if cur and room is not None and used + b > room:
                groups.append(cur)
                cur, used = [], 0
            cur.extend(piece)
            used += b
            peak = max(peak, used)
    if cur:
        groups.append(cur)
    return groups, fixed + peak


@dataclass
class Sweep:
    """One pass over the windows: the values it observes, its slice of the graph, its hand-offs."""

    values: list[PlannedValue]
    start: int  # first graph position computed
    keep: list[int]  # node positions of the slice
    cut: list[str]  # values fed from earlier sweeps' hand-offs
    handoff: list[str]  # values this sweep hands to later sweeps

    @property
    def outputs(self) -> list[str]:
        names = [v.name for v in self.values]
        return names + [h for h in self.handoff if h not in names]


def plan_sweeps(index: GraphIndex, groups: list[list[PlannedValue]]) -> list[Sweep]:
    """Slice the graph per group so each node is computed once (see module docstring)."""
    sweeps: list[Sweep] = []
    later: set[str] = set()  # values later sweeps need from earlier ones
    for g in reversed(range(len(groups))):
        values = groups[g]
        start = 0 if g == 0 else max(v.position for v in groups[g - 1]) + 1  # where the previous sweep stops
        mine = sorted((n for n in later if index.producer.get(n, -1) >= start), key=index.producer.__getitem__)
        names = [v.name for v in values]
        keep, cut = index.slice(names + [n for n in mine if n not in names], start)
        sweeps.append(Sweep(values, start, keep, cut, mine))
        later = (later - set(mine)) | set(cut)
    return sweeps[::-1]
