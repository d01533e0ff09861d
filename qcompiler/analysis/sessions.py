"""ONNX Runtime sessions over cut-out parts of a model, with weights that can be swapped per run.

For outputs ``O`` and cut values ``C`` the session runs ``prune(G, O, C)``: the nodes
that ``O`` depends on, walking backward and stopping at ``C``, which become graph
inputs.  So ``prune(G, {r_{l+1}}, {r_l})`` is decoder layer ``l`` alone (plus the
mask/rotary nodes computed from ``position_ids``/``attention_mask``): feeding cached
residual-stream rows ``r_l`` recomputes one block, not the model.

Linear weights named in ``overridable`` stay initializers but are also listed as graph
inputs (ONNX "overridable initializers"): a run may feed ``Ŵ`` in place of ``W``, so
one session evaluates every quantization candidate of every linear it contains —
``f(x; W₁…Ŵⱼ…Wₙ)`` with only linear ``j`` changed — without rebuilding anything.
Weights are never copied: the graph refers to the model's external-data files by path
(weights that earlier passes changed in memory are written once to a scratch file).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from qcompiler.errors import QCError
from qcompiler.floattype import graph_float_type
from qcompiler.irutil import external_weights_proto, relocate_external_data
from qcompiler.runtime import proto_session

_PAST_PREFIX = "past_key_values."


def _node_inputs(node: onnx.NodeProto) -> Iterator[str]:
    """A node's inputs, and the outer-scope names its subgraphs read."""
    yield from node.input
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            for sub in g.node:
                yield from _node_inputs(sub)


def prune_with_cuts(proto: onnx.ModelProto, outputs: Sequence[str], cuts: Iterable[str],
                    overridable: Iterable[str], value_types: Mapping[str, onnx.TypeProto]) -> None:
    """Keep what ``outputs`` need, stopping at ``cuts`` (made graph inputs); in place."""
    graph = proto.graph
    del graph.output[:]
    for name in outputs:
        vi = onnx.ValueInfoProto(name=name)
        if name in value_types:
            vi.type.CopyFrom(value_types[name])
        graph.output.append(vi)
    cut = set(cuts)
    needed = set(outputs)
    keep: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(o in needed and o not in cut for o in node.output):
            keep.append(node)
            needed.update(i for i in _node_inputs(node) if i)
    keep.reverse()
    init_names = {t.name for t in graph.initializer}
    inits = [t for t in graph.initializer if t.name in needed]
    old_inputs = [vi for vi in graph.input if vi.name in needed and vi.name not in cut and vi.name not in init_names]
    new_inputs = list(old_inputs)
    for name in cut:
        if name not in needed:
            raise QCError(f"internal error: cut value '{name}' is not needed by {list(outputs)}")
        vi = onnx.ValueInfoProto(name=name)
        tp = value_types.get(name)
        if tp is None:
            tp = onnx.TypeProto()
            tp.tensor_type.elem_type = onnx.TensorProto.FLOAT
        vi.type.CopyFrom(tp)
        new_inputs.append(vi)
    by_name = {t.name: t for t in inits}
    for name in overridable:
        t = by_name.get(name)
        if t is None:
            continue
        new_inputs.append(onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
    del graph.node[:]
    graph.node.extend(keep)
    del graph.initializer[:]
    graph.initializer.extend(inits)
    del graph.input[:]
    graph.input.extend(new_inputs)
    del graph.value_info[:]


#: ORT input type → numpy type for half inputs fed from float32 computations
_HALF_FEEDS = {"tensor(float16)": np.dtype(np.float16)}


class PartRunner:
    """A session computing ``outputs`` of ``model`` from graph inputs and fed cut values.

    ``run(ids, cut_feeds, overrides)``: ``ids[B, T]`` token windows (for ``input_ids``,
    ``position_ids = 0..T−1``, an all-ones ``attention_mask`` and an empty KV cache),
    ``cut_feeds`` the cut values ``[B, T, C]``, ``overrides`` replacement weights.
    """

    def __init__(self, model: ir.Model, outputs: Sequence[str], cuts: Sequence[str] = (),
                 overridable: Sequence[str] = (), threads: int | None = None, optimize: bool = True) -> None:
        self.outputs = list(outputs)
        values = {v.name: v for v in model.graph.inputs}
        for node in model.graph:
            for o in node.outputs:
                values[o.name] = o
        types: dict[str, onnx.TypeProto] = {}
        unknown = int(graph_float_type(model.graph))  # a value of unknown type: the graph's float type
        for name in [*cuts, *self.outputs]:
            v = values.get(name)
            if v is None:
                raise QCError(f"internal error: the model has no value '{name}'")
            tp = onnx.TypeProto()
            tp.tensor_type.elem_type = int(v.dtype) if v.dtype is not None else unknown
            types[name] = tp
        # in-memory weights are written to the scratch folder, which lives as long as the session
        self._scratch = tempfile.TemporaryDirectory(prefix="qc-part-")
        scratch = self._scratch.name
        proto, paths = external_weights_proto(model, Path(scratch), "weights.bin")
        prune_with_cuts(proto, self.outputs, cuts, overridable, types)
        root = relocate_external_data(proto, paths, Path(scratch))
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                       else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        try:  # a bf16 graph runs computed in float32 (no bf16 MatMul on CPU)
            self.session = proto_session(proto, so, root)
        except QCError:
            raise
        except Exception as e:  # ORT raises its own exception types
            self._scratch.cleanup()
            raise QCError(f"ONNX Runtime cannot run a part of the model: {str(e).splitlines()[0]}") from None
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self._types = {i.name: i.type for i in (*self.session.get_inputs(),
                                                *self.session.get_overridable_initializers())}
        self.overridable = [n for n in overridable if n in self.inputs]

    def feeds(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        ids = np.atleast_2d(np.asarray(ids, dtype=np.int64))
        b, t = ids.shape
        out: dict[str, np.ndarray] = {}
        for name, arg in self.inputs.items():
            if name in self.overridable:
                continue
            if name == "input_ids":
                out[name] = ids
            elif name == "attention_mask":
                out[name] = np.ones((b, t), dtype=np.int64)
            elif name == "position_ids":
                out[name] = np.broadcast_to(np.arange(t, dtype=np.int64), (b, t)).copy()
            elif name.startswith(_PAST_PREFIX):
                shape = arg.shape
                if not isinstance(shape[1], int) or not isinstance(shape[3], int):
                    raise QCError(f"cannot read the KV-cache shape of input {name}: {shape}")
                dt = np.float16 if "float16" in arg.type else np.float32
                out[name] = np.zeros((b, shape[1], 0, shape[3]), dtype=dt)
            elif name == "use_cache_branch":
                out[name] = np.array([False])
        return out

    def run(self, ids: np.ndarray, cut_feeds: Mapping[str, np.ndarray] | None = None,
            overrides: Mapping[str, np.ndarray] | None = None,
            outputs: Sequence[str] | None = None) -> list[np.ndarray]:
        feeds = self.feeds(ids)
        feeds.update(cut_feeds or {})
        feeds.update(overrides or {})
        missing = [n for n in self.inputs if n not in feeds and n not in self.overridable]
        if missing:
            raise QCError(f"don't know how to feed model input(s) {', '.join(missing)}")
        for name, arr in feeds.items():  # values computed wide (float32) enter a half graph in its type
            want = _HALF_FEEDS.get(self._types.get(name, ""))
            if want is not None and arr.dtype != want:
                feeds[name] = np.asarray(arr).astype(want)
        return self.session.run(list(outputs) if outputs else self.outputs, feeds)

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]
        self._scratch.cleanup()
