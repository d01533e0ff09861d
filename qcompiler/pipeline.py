"""Pass contract, registry, textual pipelines and the pass manager.

A pass is a class in ``passes/`` deriving from :class:`QCPass` (an
``onnx_ir.passes.InPlacePass``) with a ``name`` (``"quantize-weights"``), a typed
``Config`` (frozen dataclass, parsed from the textual form) and ``call(model)``
returning ``PassResult(model, modified)``.  ``requires``/``ensures`` check pre- and
post-conditions (``onnx_ir``'s pass contract): a failed precondition is a one-line error naming
the pass (``pass 'fuse-attention': ...``), a failed postcondition an internal error naming it.  Passes register themselves with :func:`register_pass`; every module
of ``qcompiler.passes`` is imported on first lookup.

Textual form: ``"canonicalize,quantize-weights{bits=4,group_size=128},lower-cpu"``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import importlib
import logging
import pkgutil
import time
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import onnx_ir as ir

from qcompiler.errors import QCError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NoConfig:
    """For passes without options."""


@dataclass
class PassContext:
    """What passes may use beyond the model: calibration, a scratch folder, a report.

    ``calibrate`` (set by the caller when calibration data is available) takes the
    current model and a list of statistic requests and returns statistics (see
    :mod:`qcompiler.calibrate`).  ``report`` collects per-pass findings that end up in
    ``quantization.json``.
    """

    calibrate: Callable[..., Any] | None = None
    workdir: Path | None = None
    executor: Any = None  # qcompiler.distributed.Executor for independent per-layer work (None: in process)
    report: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    def require_calibration(self, who: str) -> Callable[..., Any]:
        if self.calibrate is None:
            raise QCError(f"{who} needs calibration data: pass --calib PATH (a .txt, .jsonl or folder of .txt)")
        return self.calibrate


class QCPass(ir.passes.InPlacePass):
    """Base class of qcompiler passes (in place; the result says whether it changed the model)."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = NoConfig
    #: precondition: the model was canonicalized (``run_passes`` runs ``canonicalize`` first when it was
    #: not; called on its own, the pass refuses with a PreconditionError naming it).  The passes that read
    #: the (layer, role) annotations declare it, and so do the fusions: canonicalize's role rules read the
    #: unfused decoder (``softmax(q·kᵀ)·v``, the MLP's activation), which a fused graph no longer shows.
    needs_canonical: ClassVar[bool] = False

    def __init__(self, config: Any = None, context: PassContext | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else self.Config()
        self.context = context if context is not None else PassContext()

    def requires(self, model: ir.Model) -> None:
        if self.needs_canonical and not is_canonical(model):
            raise ir.passes.PreconditionError(f"pass '{self.name}' needs a canonicalized model: run canonicalize first")

    def __repr__(self) -> str:
        return f"{self.name}{format_config(self.config)}"


def is_canonical(model: ir.Model) -> bool:
    return model.graph.meta.get("qc.canonical") is not None


_REGISTRY: dict[str, type[QCPass]] = {}
_DISCOVERED = False
#: pass modules that failed to import (module name → error), reported when a pass is missing
BROKEN_PASS_MODULES: dict[str, str] = {}


def register_pass(cls: type[QCPass]) -> type[QCPass]:
    """Class decorator: make a pass available by ``cls.name`` in textual pipelines."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"pass name '{cls.name}' registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    pkg = importlib.import_module("qcompiler.passes")  # plugin discovery: the core names no pass

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_"):
            continue
        try:
            importlib.import_module(f"qcompiler.passes.{info.name}")
        except Exception as e:  # one broken pass module must not take every pipeline down
            BROKEN_PASS_MODULES[info.name] = f"{type(e).__name__}: {e}"
            log.error("pass module qcompiler.passes.%s failed to import: %s", info.name, e)
    _DISCOVERED = True


def available_passes() -> dict[str, type[QCPass]]:
    _discover()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[QCPass]:
    """The pass class named ``name``.  A pass lives in the module named like it (``quantize-weights`` in
    ``passes/quantize_weights.py``): that module alone is imported first, so a pipeline loads only its
    own passes (and their dependencies: not SciPy for an RTN compile); anything else discovers all."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name and all(c.isalnum() or c == "-" for c in name) and not name.startswith("-"):
        # no such module, or it failed: full discovery below reports it
        with contextlib.suppress(Exception):
            importlib.import_module(f"qcompiler.passes.{name.replace('-', '_')}")
        if name in _REGISTRY:
            return _REGISTRY[name]
    passes = available_passes()
    if name not in passes:
        broken = "".join(f"; module {m} failed to import ({err})" for m, err in BROKEN_PASS_MODULES.items())
        raise QCError(f"unknown pass '{name}'; available: {', '.join(passes)}{broken}")
    return passes[name]


# ----------------------------------------------------------------------------- textual form


def split_pipeline(text: str) -> list[tuple[str, dict[str, str]]]:
    """``"a,b{x=1,y=2}"`` → ``[("a", {}), ("b", {"x": "1", "y": "2"})]``."""
    items: list[tuple[str, dict[str, str]]] = []
    depth, start = 0, 0
    parts: list[str] = []
    for i, ch in enumerate(text):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise QCError(f"unbalanced '}}' in pipeline '{text}'")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise QCError(f"unbalanced '{{' in pipeline '{text}'")
    parts.append(text[start:])
    for part in parts:
        part = part.strip()
        if not part:
            continue
        if "{" in part:
            if not part.endswith("}"):
                raise QCError(f"malformed pass '{part}': expected name{{key=value,...}}")
            name, body = part[:-1].split("{", 1)
            opts: dict[str, str] = {}
            for kv in filter(None, (s.strip() for s in body.split(","))):
                if "=" not in kv:
                    raise QCError(f"malformed option '{kv}' for pass '{name}': expected key=value")
                k, v = kv.split("=", 1)
                opts[k.strip().replace("-", "_")] = v.strip()
            items.append((name.strip(), opts))
        else:
            items.append((part, {}))
    return items


def _convert(raw: str, typ: Any, where: str) -> Any:
    origin = typing.get_origin(typ)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if raw.lower() in ("none", "null", ""):
            return None
        return _convert(raw, args[0], where)
    if origin in (tuple, list):
        (inner, *_rest) = typing.get_args(typ) or (str,)
        vals = [_convert(x, inner, where) for x in filter(None, raw.replace(";", ":").split(":"))]
        return tuple(vals) if origin is tuple else vals
    try:
        if typ is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if isinstance(typ, type) and issubclass(typ, enum.Enum):
            return typ(raw)
        if typ in (int, float, str):
            return typ(raw)
    except ValueError:
        choices = f" (one of {', '.join(e.value for e in typ)})" if isinstance(typ, type) and issubclass(typ, enum.Enum) else ""
        raise QCError(f"{where}: cannot read '{raw}' as {getattr(typ, '__name__', typ)}{choices}") from None
    return raw


def make_config(cls: type[QCPass], options: dict[str, Any]) -> Any:
    """Build ``cls.Config`` from textual (or already typed) options, with clear errors."""
    cfg_cls = cls.Config
    fields = {f.name: f for f in dataclasses.fields(cfg_cls)}
    hints = typing.get_type_hints(cfg_cls)
    kwargs: dict[str, Any] = {}
    for key, raw in options.items():
        if key not in fields:
            raise QCError(f"pass '{cls.name}' has no option '{key}'; options: {', '.join(fields) or 'none'}")
        kwargs[key] = _convert(raw, hints[key], f"{cls.name}.{key}") if isinstance(raw, str) else raw
    try:
        return cfg_cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise QCError(f"pass '{cls.name}': {e}") from None


def format_value(v: Any) -> str:
    """An option value as a pipeline text writes it (what :func:`split_pipeline` and ``make_config`` read back):
    ``none``, an enum's value, a sequence joined by ``:``, anything else as ``str``."""
    if v is None:
        return "none"
    if isinstance(v, enum.Enum):
        return str(v.value)
    if isinstance(v, (tuple, list)):
        return ":".join(format_value(x) for x in v)
    return str(v)


def config_defaults(cls: type[QCPass]) -> dict[str, Any]:
    """A pass's options with their default values (``default_factory`` ones built)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls.Config):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def format_config(config: Any) -> str:
    if not dataclasses.is_dataclass(config):
        return ""
    items = []
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if v != f.default:
            items.append(f"{f.name}={format_value(v)}")
    return "{" + ",".join(items) + "}" if items else ""


def parse_pipeline(text: str, context: PassContext | None = None) -> list[QCPass]:
    context = context or PassContext()
    return [get_pass(name)(make_config(get_pass(name), opts), context) for name, opts in split_pipeline(text)]


def pipeline_text(passes: Sequence[QCPass]) -> str:
    return ",".join(repr(p) for p in passes)


# ----------------------------------------------------------------------------- running


@dataclass
class PassRecord:
    name: str
    text: str
    modified: bool
    seconds: float


def run_passes(
    model: ir.Model,
    passes: Sequence[QCPass],
    dump_ir: str | Path | None = None,
    check: bool = True,
) -> tuple[ir.Model, list[PassRecord]]:
    """Run ``passes`` in order; with ``dump_ir`` write the model after every pass.

    A pass that needs a canonicalized model gets ``canonicalize`` run before it when
    the model is not canonical yet.  With ``check``, the graph is checked for
    well-formedness (every input produced before use) after each pass that modified it.
    """
    from qcompiler.irutil import save_model

    records: list[PassRecord] = []
    seq = list(passes)
    i = 0
    while i < len(seq):
        p = seq[i]
        if p.needs_canonical and not is_canonical(model):
            seq.insert(i, get_pass("canonicalize")(None, p.context))
            continue
        t0 = time.perf_counter()
        log.info("pass %d/%d: %r", i + 1, len(seq), p)
        try:
            result = p(model)
        except ir.passes.PreconditionError as e:
            raise QCError(f"pass '{p.name}': {e.__cause__ or e}") from None
        except ir.passes.PostconditionError as e:
            raise QCError(f"internal error: pass '{p.name}' broke its guarantee: {e.__cause__ or e}") from None
        model = result.model
        dt = time.perf_counter() - t0
        records.append(PassRecord(p.name, repr(p), result.modified, dt))
        log.info("pass %s: %s in %.2fs", p.name, "modified the model" if result.modified else "no change", dt)
        if check and result.modified:  # a pass that changed nothing cannot have broken the order
            check_well_formed(model, after=p.name)
        if dump_ir is not None:
            d = Path(dump_ir) / f"{i + 1:02d}-{p.name}"
            d.mkdir(parents=True, exist_ok=True)
            save_model(model, d / "model.onnx")
        i += 1
    return model, records


def check_well_formed(model: ir.Model, after: str = "") -> None:
    """Every node input is a graph input, an initializer or produced by an earlier node."""
    graph = model.graph
    known: set[int] = {id(v) for v in graph.inputs} | {id(v) for v in graph.initializers.values()}
    for node in graph:
        for v in node.inputs:
            if v is None or id(v) in known or v.const_value is not None:
                continue
            if v.producer() is None and v.is_graph_input() is False and not v.is_initializer():
                raise QCError(f"internal error after pass '{after}': value '{v.name}' used by {node.op_type} has no producer")
            if v.producer() is not None and id(v) not in known:
                raise QCError(
                    f"internal error after pass '{after}': '{v.name}' is used by {node.op_type} "
                    f"'{node.name}' before it is produced"
                )
        known.update(id(o) for o in node.outputs)
    for out in graph.outputs:
        if id(out) not in known:
            raise QCError(f"internal error after pass '{after}': graph output '{out.name}' is not produced")
