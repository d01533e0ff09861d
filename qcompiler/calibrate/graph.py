"""The calibration graph: a slice of the current model whose outputs are the values to observe.

For values ``V`` and a start position ``P`` a sweep runs ``slice(G, V, P)``: the nodes
at positions ``≥ P`` that ``V`` depends on (backward reachability), with ``V`` as the
only graph outputs, so nothing after the last observed value is computed (no
lm_head, no later layers).  Values that the slice needs from nodes before ``P`` form
the *cut* (for a decoder: the residual stream, rotary tables, attention mask); they
become graph inputs, fed from what the previous sweep handed off, so no layer is
computed twice and a sweep only touches its own layers' weights.  Graph
optimizations are off (``ORT_DISABLE_ALL``) so every value keeps its name.

Weights are never copied: the graph is handed to ONNX Runtime as bytes whose
initializers refer to their external-data files (the model folder's
``model.onnx_data``, by path relative to a common root given in
``session.model_external_initializers_file_folder_path``), which ONNX Runtime maps
into memory.  Tensors that earlier passes changed in memory are written once to a
scratch data file first.  Prepacking is off, so each weight is resident once; idle
intra-op threads sleep rather than spin, leaving the cores to the observers.

:func:`model_fingerprint` hashes what determines activations: opsets, graph inputs,
nodes (op, domain, value names, attributes) and initializer contents; external data
is hashed by file content (memoized per file path/size/mtime), never node names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from qcompiler.errors import CalibrationError, QCError
from qcompiler.floattype import widen_float
from qcompiler.irutil import external_weights_proto, relocate_external_data
from qcompiler.runtime import DecoderRunner, proto_session

log = logging.getLogger(__name__)

#: ``model.graph.meta`` key: when true, the calibration graph of a half model computes in float32
#: (:func:`qcompiler.floattype.widen_float`), so a value past fp16's range is measured instead of
#: being ``inf`` (``keep-fp32``); part of :func:`model_fingerprint`.
WIDEN_META = "qc.calib_widen"
#: In-memory initializers at least this large go to the scratch data file (smaller ones stay inline).
INLINE_LIMIT = 1 << 16
SCRATCH_DATA = "calib_weights.bin"


# ----------------------------------------------------------------------------- fingerprint

_FILE_DIGESTS: dict[tuple[str, int, int, int], str] = {}


def _digest_memo_path() -> Path:
    return Path(os.environ.get("QC_CACHE", Path.home() / ".cache" / "qcompiler")) / "file-digests.json"


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's content, memoized by (path, size, mtime, inode) in memory and on disk."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns, st.st_ino)
    if key in _FILE_DIGESTS:
        return _FILE_DIGESTS[key]
    memo_path = _digest_memo_path()
    skey = "|".join(map(str, key))
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    digest = memo.get(skey)
    if digest is None:
        h = hashlib.sha256()
        buf = bytearray(8 << 20)
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(memoryview(buf)[:n])
        digest = h.hexdigest()
        memo[skey] = digest
        try:
            memo_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo_path.with_name(f".{memo_path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(memo))
            os.replace(tmp, memo_path)
        except OSError:
            pass  # the memo is only an optimization
    _FILE_DIGESTS[key] = digest
    return digest


def tensor_digest(t: ir.TensorProtocol) -> str:
    if isinstance(t, ir.ExternalTensor):
        return f"ext:{file_digest(t.path)}:{t.offset or 0}:{t.length}"
    return "mem:" + hashlib.sha256(t.tobytes()).hexdigest()


def model_fingerprint(model: ir.Model) -> str:
    """A SHA-256 of everything that determines the model's activations (see module docstring)."""
    h = hashlib.sha256()
    h.update(repr(sorted(model.opset_imports.items())).encode())
    if model.graph.meta.get(WIDEN_META):
        h.update(b"widened to float32")
    _hash_graph(model.graph, h)
    return h.hexdigest()


def _hash_graph(g: ir.Graph | ir.Function, h: Any) -> None:
    def up(*parts: object) -> None:
        h.update(repr(parts).encode())

    for v in g.inputs:
        up("in", v.name, str(v.dtype), str(v.shape))
    for name, v in sorted(getattr(g, "initializers", {}).items()):
        t = v.const_value
        up("init", name, None if t is None else (str(t.dtype), tuple(t.shape), tensor_digest(t)))
    for node in g:
        up("node", node.domain, node.op_type, node.overload,
           [i.name if i is not None else "" for i in node.inputs], [o.name for o in node.outputs])
        for key in sorted(node.attributes):
            attr = node.attributes[key]
            if not isinstance(attr, ir.Attr):
                up("ref", key, repr(attr))
            elif attr.type == ir.AttributeType.TENSOR:
                up("attr", key, tensor_digest(attr.value))
            elif attr.type == ir.AttributeType.TENSORS:
                up("attr", key, [tensor_digest(t) for t in attr.value])
            elif attr.type == ir.AttributeType.GRAPH:
                up("graph", key)
                _hash_graph(attr.value, h)
            elif attr.type == ir.AttributeType.GRAPHS:
                for sub in attr.value:
                    up("graph", key)
                    _hash_graph(sub, h)
            else:
                up("attr", key, attr.type.name, repr(attr.value))
    for v in g.outputs:
        up("out", v.name)


# ----------------------------------------------------------------------------- graph


def find_values(model: ir.Model) -> dict[str, ir.Value]:
    """Every named value of the main graph that a session can output (node outputs, graph inputs)."""
    found: dict[str, ir.Value] = {v.name: v for v in model.graph.inputs if v.name}
    for node in model.graph:
        for o in node.outputs:
            if o.name:
                found[o.name] = o
    return found


def _subgraph_inputs(node: ir.Node) -> Iterable[str]:
    """Names a node's subgraphs read (outer-scope values included)."""
    for attr in node.attributes.values():
        if not isinstance(attr, ir.Attr):
            continue
        graphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else (
            list(attr.value) if attr.type == ir.AttributeType.GRAPHS else [])
        for g in graphs:
            for sub in g:
                yield from (i.name for i in sub.inputs if i is not None and i.name)
                yield from _subgraph_inputs(sub)


@dataclass
class GraphIndex:
    """The main graph's data flow by node position (the order of ``model.graph`` and of its proto)."""

    inputs: list[list[str]]
    ops: list[str]
    producer: dict[str, int]

    @classmethod
    def of(cls, model: ir.Model) -> GraphIndex:
        inputs, ops, producer = [], [], {}
        for i, node in enumerate(model.graph):
            names = [v.name for v in node.inputs if v is not None and v.name]
            names.extend(_subgraph_inputs(node))
            inputs.append(names)
            ops.append(node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}")
            for o in node.outputs:
                if o.name:
                    producer[o.name] = i
        return cls(inputs, ops, producer)

    def slice(self, outputs: Iterable[str], start: int = 0) -> tuple[list[int], list[str]]:
        """Nodes at positions ``≥ start`` that ``outputs`` need, and the *cut*: values they need
        from nodes before ``start`` (to be fed as inputs).  Constants are kept, never cut."""
        needed = list(dict.fromkeys(outputs))
        seen = set(needed)
        keep: set[int] = set()
        cut: list[str] = []
        while needed:
            name = needed.pop()
            i = self.producer.get(name)
            if i is None:
                continue  # graph input or initializer
            if i < start and self.ops[i] != "Constant":
                cut.append(name)
                continue
            if i in keep:
                continue
            keep.add(i)
            for n in self.inputs[i]:
                if n not in seen:
                    seen.add(n)
                    needed.append(n)
        return sorted(keep), sorted(cut, key=lambda n: self.producer[n])


def _value_info(name: str, elem_type: int | None) -> onnx.ValueInfoProto:
    vi = onnx.ValueInfoProto(name=name)
    if elem_type is not None:
        vi.type.tensor_type.elem_type = elem_type
    return vi


def calibration_proto(model: ir.Model, outputs: Sequence[str], scratch: Path, keep: Sequence[int],
                      cut: dict[str, int]) -> tuple[onnx.ModelProto, Path]:
    """The graph with nodes ``keep`` only, ``cut`` values (name → ONNX element type) as extra
    inputs and ``outputs`` as its outputs; weights refer to files.  Returns (proto, data root)."""
    nodes_ir = list(model.graph)
    read = {v.name for i in keep for v in nodes_ir[i].inputs if v is not None}
    read.update(n for i in keep for n in _subgraph_inputs(nodes_ir[i]))
    # weights this slice does not read are not written (and dropped from the graph below)
    proto, paths = external_weights_proto(model, scratch, SCRATCH_DATA, read, INLINE_LIMIT)
    graph = proto.graph
    nodes = [graph.node[i] for i in keep]
    needed = {n for node in nodes for n in node.input} | set(outputs)
    for node in nodes:
        for attr in node.attribute:
            for g in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                needed.update(n for sub in g.node for n in sub.input)
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(inits)
    graph.input.extend(_value_info(n, t) for n, t in cut.items())
    values = find_values(model)
    del graph.output[:]
    graph.output.extend(
        _value_info(n, int(values[n].dtype) if n in values and values[n].dtype is not None else None) for n in outputs
    )
    root = relocate_external_data(proto, paths, scratch)
    if model.graph.meta.get(WIDEN_META):  # after the paths: widening renames the initializers it casts
        widen_float(proto, (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16))
    return proto, root


@dataclass
class CalibSession:
    """An ORT session over the calibration graph and the feeds for one window."""

    session: ort.InferenceSession
    runner: DecoderRunner
    outputs: list[str]

    def run(self, ids: np.ndarray, extra: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
        feeds = self.runner.feeds(ids)
        if extra:
            feeds.update(extra)
        return self.session.run(self.outputs, feeds)


def open_session(model: ir.Model, outputs: Sequence[str], scratch: Path, keep: Sequence[int],
                 cut: dict[str, int] | None = None, threads: int | None = None) -> CalibSession:
    """An ORT session (no graph optimizations, no prepacking) computing ``outputs`` of ``model``
    with only the nodes ``keep`` (see :meth:`GraphIndex.slice`), fed the ``cut`` values."""
    proto, root = calibration_proto(model, outputs, scratch, keep, cut or {})
    return session_from_proto(proto, root, list(outputs), list(cut or {}), threads)


def session_from_proto(proto: onnx.ModelProto, root: Path, outputs: Sequence[str], cut: Sequence[str],
                       threads: int | None = None) -> CalibSession:
    """:func:`open_session` on a graph from :func:`calibration_proto` (also in a worker process:
    the proto is small, its weights are files under ``root``)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    so.add_session_config_entry("session.disable_prepacking", "1")
    # idle intra-op threads sleep instead of spinning: the CPU goes to the observers (and to
    # other processes on a shared machine)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:  # a bf16 graph is observed computed in float32 (no bf16 MatMul on CPU)
        session = proto_session(proto, so, root)
    except QCError:
        raise
    except Exception as e:  # ORT raises its own exception types
        raise CalibrationError(f"ONNX Runtime cannot run the calibration graph: {str(e).splitlines()[0]}") from None
    try:
        runner = DecoderRunner(session, require_logits=False)
    except QCError as e:
        raise CalibrationError(f"cannot feed the model for calibration: {e}") from None
    for name in cut:
        runner.inputs.pop(name, None)  # fed by the caller from the previous sweep's hand-off
    return CalibSession(session, runner, list(outputs))
