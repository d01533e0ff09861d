"""Run a decoder one layer at a time: capture each layer's inputs once, then run single layers.

A Llama-family decoder is a chain of residual blocks ``h_{i+1} = f_i(h_i, side)``: the
residual stream ``h_i`` enters decoder layer ``i`` and ``h_{i+1}`` is the residual
``Add`` after its ``down_proj``.  ``side`` are the values every layer reads that do not
depend on the residual stream's *data*: the attention mask, the rotary tables, graph
inputs such as an (empty) KV cache.  So with ``h_0`` and ``side`` captured once per
calibration window (one run of the graph's prefix), layer ``i`` alone can be run in
ONNX Runtime on ``h_i`` — its outputs are ``h_{i+1}`` for the next layer, or any value
inside it (a linear's input, for a Hessian).  Weight-quantizing passes (GPTQ, AWQ) quantize
layer ``i`` and feed its *quantized* outputs to layer ``i + 1`` (sequential quantization),
at the cost of about one model forward in all instead of one per layer.

Layers are found from canonicalize's annotations (the linears of layer ``i``) and the
residual-``Add`` structure; layer ``i``'s subgraph is the set of nodes that depend on
``h_i`` and that ``h_{i+1}`` depends on, plus constant-only producers (``Constant``,
a quantized weight's ``DequantizeLinear``).  Sessions are rebuilt from the model as it
is now, so a pass sees its own changes; unchanged weights are read by ONNX Runtime
straight from the model's external-data file.

    runner = LayerwiseRunner(model, windows)           # windows: int64 [n, seq_len] token ids
    runner.start()                                     # h_0 and side values, one prefix run
    for layer in runner.layers:
        stats = runner.observe(layer.index, {x.name: ("hessian",)})
        ...                                            # change layer's weights
        runner.advance()                               # h_{i+1} = layer(h_i) with the new weights
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from threadpoolctl import threadpool_limits

from qcompiler.canonical import canonical_summary
from qcompiler.errors import QCError, UnsupportedModelError
from qcompiler.irutil import topo_index
from qcompiler.spec import Role, linear_info

log = logging.getLogger(__name__)

#: Ops whose output carries a shape, not data: a value behind them does not depend on data.
_SHAPE_ONLY = frozenset({"Shape", "Size"})
_PASSTHROUGH = frozenset({"Cast", "Identity"})
#: ... and the views a residual stream goes through (OPT's MLP works on ``[B·T, H]``)
_STREAM_VIEWS = _PASSTHROUGH | {"Reshape"}


@dataclass
class DecoderLayer:
    """Decoder layer ``index``: residual stream ``input`` → ``output``, and its linears by role."""

    index: int
    input: ir.Value
    output: ir.Value
    linears: dict[Role, ir.Node] = field(default_factory=dict)


def _skip_passthrough(value: ir.Value, ops: frozenset[str] = _PASSTHROUGH) -> ir.Value:
    node = value.producer()
    while node is not None and node.op_type in ops and node.domain == "":
        value = node.inputs[0]
        node = value.producer()
    return value


def _is_constant(value: ir.Value) -> bool:
    value = _skip_passthrough(value)
    node = value.producer()
    return value.const_value is not None or (node is not None and node.op_type == "Constant")


def _residual_add(graph: ir.Graph, linear: ir.Node, accept: Callable[[ir.Value], bool]) -> tuple[ir.Node, ir.Value]:
    """The first ``Add`` (graph order) downstream of ``linear`` whose other input ``accept`` takes.

    Downstream, not only next: a post-norm (Gemma 2/3, OLMo 2) or the other branch of a
    parallel block (``h + (attn + mlp)``: falcon, phi, cohere, gpt_neox) may come between
    the linear and the residual ``Add``.  Returns the Add and the stream's other input.
    """
    reach = _forward(linear.outputs[0])
    for node in graph:
        if id(node) not in reach or node.op_type != "Add" or node.domain != "":
            continue
        for a in (0, 1):
            mine, other = node.inputs[a], node.inputs[1 - a]
            if mine is None or other is None or _is_constant(other):  # a bias, a norm's epsilon
                continue
            if (mine is linear.outputs[0] or id(mine.producer()) in reach) and accept(other):
                return node, other
    raise UnsupportedModelError(
        f"layer-wise running: the output of {linear.name or linear.op_type} does not reach a residual Add"
    )


def find_decoder_layers(model: ir.Model) -> list[DecoderLayer]:
    """The decoder layers of a canonicalized model, in order (see the module docstring)."""
    summary = canonical_summary(model)
    by_layer: dict[int, dict[Role, ir.Node]] = {}
    for node in summary.linears.values():
        info = linear_info(node)
        if info is not None and info.expert is not None:  # DecoderLayer holds one linear per role
            experts = len({linear_info(n).expert for n in summary.linears.values()  # type: ignore[union-attr]
                           if linear_info(n).layer == info.layer and linear_info(n).expert is not None})  # type: ignore[union-attr]
            raise UnsupportedModelError(
                f"layer-wise running (awq, gptq): decoder layer {info.layer} is a mixture of {experts} experts; "
                "only dense MLPs are supported (use w4a16-rtn, w4a16-fast-rtn, w4a16-hqq or a w8a8 recipe)")
        if info is not None and info.layer >= 0:
            by_layer.setdefault(info.layer, {})[info.role] = node
    if not by_layer:
        if not any(n.op_type in ("MatMul", "Gemm") for n in model.graph):
            raise UnsupportedModelError("the model has no MatMul/Gemm: nothing to quantize")
        raise UnsupportedModelError("no decoder layer was recognized (canonicalize found none)")
    layers: list[DecoderLayer] = []
    previous: ir.Value | None = None
    for i in range(max(by_layer) + 1):
        linears = by_layer.get(i, {})
        o, down = linears.get(Role.O), linears.get(Role.DOWN)
        if o is None or down is None:
            raise UnsupportedModelError(f"layer-wise running: decoder layer {i} has no o_proj/down_proj")
        # h_i: the residual operand that depends on none of the layer's linears; h_{i+1}: the Add
        # after down_proj whose other operand is h_i + attn (sequential) or h_i (parallel, post-norm)
        after = set().union(*(_forward(n.outputs[0]) for n in linears.values()))
        attn_add, attn_residual = _residual_add(model.graph, o, lambda v, after=after: id(v.producer()) not in after)
        h_in = _skip_passthrough(attn_residual, _STREAM_VIEWS)
        stream = (h_in, attn_add.outputs[0])
        out = _residual_add(model.graph, down,
                            lambda v, stream=stream: _skip_passthrough(v, _STREAM_VIEWS) in stream)[0].outputs[0]
        if previous is not None and h_in is not previous:
            raise UnsupportedModelError(
                f"layer-wise running: the residual input of decoder layer {i} is not layer {i - 1}'s output"
            )
        layers.append(DecoderLayer(i, h_in, out, dict(linears)))
        previous = out
    return layers


# ----------------------------------------------------------------------------- graph closures


def _forward(start: ir.Value, data_only: bool = False) -> set[int]:
    """Ids of the nodes depending on ``start`` (with ``data_only``: not through Shape/Size)."""
    nodes: set[int] = set()
    queue: deque[ir.Value] = deque([start])
    while queue:
        for user in queue.popleft().consumers():
            if id(user) in nodes or (data_only and user.op_type in _SHAPE_ONLY):
                continue
            nodes.add(id(user))
            queue.extend(user.outputs)
    return nodes


def _backward(end: ir.Value) -> set[int]:
    nodes: set[int] = set()
    queue: deque[ir.Value] = deque([end])
    while queue:
        node = queue.popleft().producer()
        if node is None or id(node) in nodes:
            continue
        nodes.add(id(node))
        queue.extend(i for i in node.inputs if i is not None)
    return nodes


class _ConstOnly:
    """Memoized: is a value computed from initializers and constants alone?"""

    def __init__(self) -> None:
        self.memo: dict[int, bool] = {}

    def __call__(self, value: ir.Value) -> bool:
        key = id(value)
        if key not in self.memo:
            if value.const_value is not None:
                self.memo[key] = True
            elif value.is_graph_input() or value.producer() is None:
                self.memo[key] = False
            else:
                self.memo[key] = True  # cycles cannot occur in a valid graph; provisional
                node = value.producer()
                self.memo[key] = all(i is None or self(i) for i in node.inputs)
        return self.memo[key]


def _side_inputs(model: ir.Model, layer: DecoderLayer, const_only: _ConstOnly) -> list[ir.Value]:
    inside = _forward(layer.input) & _backward(layer.output)
    produced = {id(o) for n in model.graph if id(n) in inside for o in n.outputs}
    side: dict[int, ir.Value] = {}
    for node in model.graph:
        if id(node) not in inside:
            continue
        for v in node.inputs:
            if v is None or v is layer.input or id(v) in produced or const_only(v):
                continue
            side[id(v)] = v
    return list(side.values())


# ----------------------------------------------------------------------------- the runner


def _release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise): RSS follows the live data."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _onnx_type(arr: np.ndarray) -> int:
    return int(onnx.helper.np_dtype_to_tensor_dtype(arr.dtype))


class WindowStore:
    """One array per window, in memory or (with ``folder``) as ``.npy`` files read back one at a time."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder
        self.items: list[np.ndarray | Path] = []
        self.nbytes = 0

    def append(self, arr: np.ndarray) -> None:
        self.nbytes += arr.nbytes
        if self.folder is None:
            self.items.append(arr)
            return
        path = self.folder / f"{id(self):x}-{len(self.items)}.npy"
        np.save(path, arr)
        self.items.append(path)

    def __getitem__(self, i: int) -> np.ndarray:
        item = self.items[i]
        return np.load(item) if isinstance(item, Path) else item

    def __len__(self) -> int:
        return len(self.items)

    def clear(self) -> None:
        for item in self.items:
            if isinstance(item, Path):
                item.unlink(missing_ok=True)
        self.items, self.nbytes = [], 0


class LayerwiseRunner:
    """Runs decoder layers one at a time on captured inputs (see the module docstring).

    ``windows`` are token ids ``[n, seq_len]`` (one batch per window).  :meth:`start`
    captures ``h_0`` and the side values; :meth:`run`/:meth:`observe` run the current
    layer (``position``) with the model's weights as they are now; :meth:`advance`
    replaces the stored inputs by the current layer's outputs and moves to the next.
    Memory: one layer's weights in ONNX Runtime and the captured values: the residual
    stream (``n·seq_len·hidden`` floats, twice while advancing) and the side values.
    When those exceed ``max_memory_bytes`` (default 64 MiB) they are kept as one file per
    window in a temporary folder (``spill_dir``) and read back one window at a time, so
    memory does not grow with the number of windows or the hidden size.
    """

    def __init__(self, model: ir.Model, windows: np.ndarray, *, threads: int | None = None,
                 progress: bool = True, max_memory_bytes: int = 64 << 20,
                 spill_dir: str | os.PathLike | None = None) -> None:
        self.model = model
        self.windows = np.ascontiguousarray(np.asarray(windows, dtype=np.int64))
        if self.windows.ndim != 2 or self.windows.shape[0] == 0:
            raise QCError(f"layer-wise running needs token windows [n, seq_len], got shape {self.windows.shape}")
        self.threads = threads
        self.progress = progress
        self.layers = find_decoder_layers(model)
        const_only = _ConstOnly()
        self._sides = [_side_inputs(model, layer, const_only) for layer in self.layers]
        data_dependent = _forward(self.layers[0].output, data_only=True)
        for layer, sides in zip(self.layers, self._sides):
            for v in sides:
                if v.producer() is not None and id(v.producer()) in data_dependent:
                    raise UnsupportedModelError(
                        f"layer-wise running: decoder layer {layer.index} reads '{v.name}', computed from an "
                        "earlier layer's activations; this graph cannot be run one layer at a time"
                    )
        self.position = 0
        self._by_name: dict[str, ir.Value] = {}
        self._order: dict[int, int] = {}
        self.hidden = WindowStore()
        self._side_values: dict[str, WindowStore] = {}
        self._feeds: Any = None
        self.max_memory_bytes = max_memory_bytes
        self._spill_parent = spill_dir
        self._spill: tempfile.TemporaryDirectory[str] | None = None

    @classmethod
    def from_calibrator(cls, model: ir.Model, calibrator: Any, max_windows: int | None = None,
                        max_tokens: int | None = None, **kw: Any) -> LayerwiseRunner:
        """A runner over the windows of a :class:`qcompiler.calibrate.Calibrator` (``qc quantize --calib``);
        with ``max_windows``/``max_tokens``, the first windows and their first tokens only."""
        find_decoder_layers(model)  # a model we cannot run layer by layer fails before the data is read
        windows = getattr(calibrator, "windows", None)
        if windows is None:
            raise QCError("layer-wise quantization needs the calibration engine's windows (qc quantize --calib PATH)")
        config = getattr(calibrator, "config", None)
        kw.setdefault("threads", getattr(config, "threads", None))
        kw.setdefault("progress", getattr(config, "progress", True))
        ids = windows.ids[:max_windows, :max_tokens]
        return cls(model, ids, **kw)

    @property
    def num_windows(self) -> int:
        return int(self.windows.shape[0])

    def side_inputs(self, layer: int) -> list[ir.Value]:
        """The values from outside layer ``layer`` it reads (mask, rotary tables, graph inputs)."""
        return list(self._sides[layer])

    # ------------------------------------------------------------------------- capture

    def start(self) -> None:
        """Run the graph's prefix once per window: ``h_0`` and every layer's side values."""
        from qcompiler.runtime import DecoderRunner

        wanted: dict[str, ir.Value] = {}
        for sides in self._sides:
            for v in sides:
                if not v.is_graph_input():
                    wanted[v.name] = v
        names = [self.layers[0].input.name, *wanted]
        # every graph input is an input of the prefix session, so it can build any feed
        session, _ = self._session(None, names)
        self._feeds = DecoderRunner(session, require_logits=False)
        self.close()
        folder: Path | None = None
        hidden = WindowStore()
        side_values: dict[str, WindowStore] = {}
        for w in self._bar(range(self.num_windows), "layer-wise: capture inputs"):
            outs = session.run(names, self._feeds.feeds(self.windows[w : w + 1]))
            if w == 0:  # one window tells the size of all: spill to disk beyond the memory bound
                total = 2 * outs[0].nbytes * self.num_windows + sum(o.nbytes for o in outs[1:]) * self.num_windows
                folder = self._spill_folder() if total > self.max_memory_bytes else None
                hidden = WindowStore(folder)
                side_values = {n: WindowStore(folder) for n in wanted}
            hidden.append(outs[0])
            for n, arr in zip(wanted, outs[1:]):
                side_values[n].append(arr)
        self._feeds.session = None  # keep only the feed builder
        del session
        _release_memory()
        self.hidden, self._side_values, self.position = hidden, side_values, 0
        log.info("layer-wise: captured %d windows (%.0f MiB of residual stream, %d side values%s)",
                 self.num_windows, hidden.nbytes / 2**20, len(wanted), f", kept in {folder}" if folder else "")

    # ------------------------------------------------------------------------- running

    def run(self, layer: int, outputs: Sequence[str],
            windows: Sequence[int] | None = None) -> Iterator[tuple[int, list[np.ndarray]]]:
        """Yield ``(window, [arrays of outputs])`` of layer ``layer`` (the current one) per window."""
        self._check(layer)
        session, inputs = self._session(layer, list(outputs))
        try:
            for w in range(self.num_windows) if windows is None else windows:
                yield w, session.run(list(outputs), self.layer_feeds(layer, w, inputs))
        finally:
            del session
            _release_memory()

    def layer_feeds(self, layer: int, window: int, inputs: set[str]) -> dict[str, np.ndarray]:
        """The inputs ``inputs`` of layer ``layer``'s subgraph on window ``window``: h_i and side values."""
        feeds = {self.layers[layer].input.name: self.hidden[window]}
        for name in inputs:
            if name in self._side_values:
                feeds[name] = self._side_values[name][window]
        graph_feeds = [v.name for v in self._sides[layer] if v.is_graph_input() and v.name in inputs]
        if graph_feeds:
            all_feeds = self._feeds.feeds(self.windows[window : window + 1])
            feeds.update({n: all_feeds[n] for n in graph_feeds})
        return {n: v for n, v in feeds.items() if n in inputs}

    def layer_graph(self, layer: int, outputs: Sequence[str]) -> tuple[onnx.ModelProto, set[str]]:
        """The subgraph of the current layer computing ``outputs`` (initializers left external) and its inputs."""
        self._check(layer)
        proto, _, inputs = self._subgraph_proto(layer, list(outputs))
        return proto, inputs

    def observe(self, layer: int, requests: Mapping[str, Sequence[str]], config: Any = None) -> dict[str, dict[str, Any]]:
        """Statistics (calibration observers: ``hessian``, ``mean_abs_channel``, ...) of values inside ``layer``."""
        from qcompiler.calibrate.observers import OBSERVERS, BatchView, ObserverConfig, check_observers

        cfg = config or ObserverConfig()
        names = list(requests)
        for n in names:
            check_observers(tuple(requests[n]))
        observers: dict[str, dict[str, Any]] = {}
        with threadpool_limits(1, user_api="blas"):  # BLAS between ORT runs: one thread, no contention
            for w, outs in self._bar(self.run(layer, names), f"layer {layer}: observe", total=self.num_windows):
                for name, arr in zip(names, outs):
                    view = BatchView(arr, w)
                    obs = observers.get(name)
                    if obs is None:
                        obs = observers[name] = {o: OBSERVERS[o](cfg, view.channels) for o in requests[name]}
                    for ob in obs.values():
                        ob.update(view)
        return {n: {o: type(ob).result(ob.state()) for o, ob in obs.items()} for n, obs in observers.items()}

    def advance(self) -> None:
        """Run the current layer with its current weights; its outputs become the next layer's inputs."""
        layer = self.position
        self._check(layer)
        name = self.layers[layer].output.name
        new = WindowStore(self.hidden.folder)
        for _, outs in self._bar(self.run(layer, [name]), f"layer {layer}: advance", total=self.num_windows):
            new.append(outs[0])
        self.hidden.clear()
        self.hidden = new
        self.position += 1

    def close(self) -> None:
        """Drop the captured values (and their spill files)."""
        self.hidden.clear()
        for store in self._side_values.values():
            store.clear()
        self._side_values = {}
        if self._spill is not None:
            self._spill.cleanup()
            self._spill = None

    def _spill_folder(self) -> Path:
        if self._spill is None:
            self._spill = tempfile.TemporaryDirectory(prefix="qc-layerwise-", dir=self._spill_parent)
        return Path(self._spill.name)

    # ------------------------------------------------------------------------- internals

    def _check(self, layer: int) -> None:
        if not len(self.hidden):
            raise QCError("layer-wise runner: call start() first")
        if layer != self.position:
            raise QCError(f"layer-wise runner: inputs are held for layer {self.position}, not layer {layer}")

    def _bar(self, it: Any, desc: str, total: int | None = None) -> Any:
        from tqdm import tqdm

        return tqdm(it, desc=desc, total=total, unit="window", leave=False, disable=not self.progress)

    def _session(self, layer: int | None, outputs: list[str]) -> tuple[ort.InferenceSession, set[str]]:
        """A session computing ``outputs`` of decoder layer ``layer`` (None: of the prefix, from graph inputs)."""
        proto, root, inputs = self._subgraph_proto(layer, outputs)
        from qcompiler.runtime import proto_session, session_options

        so = session_options(self.threads, optimize=True, spin=False)
        so.enable_cpu_mem_arena = False  # freed between sessions: memory stays at one layer's working set
        try:  # a bf16 graph runs computed in float32 (no bf16 MatMul on CPU)
            session = proto_session(proto, so, root)
        except QCError:
            raise
        except Exception as e:  # ORT raises its own exception types
            where = "the graph's prefix" if layer is None else f"decoder layer {layer}"
            raise QCError(f"layer-wise runner: ONNX Runtime cannot run {where}: "
                          f"{str(e).splitlines()[0]}") from None
        return session, inputs

    def _values(self, names: Sequence[str]) -> dict[str, ir.Value]:
        """Node outputs by name (cached; rebuilt when a name is new, e.g. after a pass added nodes)."""
        if any(n not in self._by_name for n in names):
            self._by_name = {o.name: o for n in self.model.graph for o in n.outputs if o.name}
            missing = [n for n in names if n not in self._by_name]
            if missing:
                raise QCError(f"layer-wise runner: no value named {', '.join(missing)} in the graph")
        return self._by_name

    def _in_order(self, nodes: dict[int, ir.Node]) -> list[ir.Node]:
        """``nodes`` in graph order (positions cached; rebuilt when a node is new)."""
        if any(i not in self._order for i in nodes):
            self._order = topo_index(self.model.graph)
        return sorted(nodes.values(), key=lambda n: self._order[id(n)])

    def _subgraph_proto(self, layer: int | None, outputs: list[str]) -> tuple[onnx.ModelProto, Path | None, set[str]]:
        """The nodes ``outputs`` need, inputs = h_i and layer i's side values (prefix: the graph inputs)."""
        if layer is None:
            stops = {id(v): v for v in self.model.graph.inputs}
        else:
            spec = self.layers[layer]
            stops = {id(spec.input): spec.input} | {id(v): v for v in self._sides[layer]}
        values = self._values(outputs)
        keep: dict[int, ir.Node] = {}
        inputs: dict[int, ir.Value] = {}
        inits: dict[int, ir.Value] = {}
        queue: deque[ir.Value] = deque(values[o] for o in outputs)
        while queue:
            v = queue.popleft()
            if id(v) in stops:
                inputs[id(v)] = v
                continue
            if v.const_value is not None and (v.is_initializer() or v.producer() is None):
                inits[id(v)] = v
                continue
            node = v.producer()
            if node is None:
                where = "the graph's prefix" if layer is None else f"decoder layer {layer}"
                raise UnsupportedModelError(
                    f"layer-wise runner: {where} reads '{v.name}' from outside it; the graph cannot be run "
                    "one layer at a time"
                )
            if id(node) in keep:
                continue
            keep[id(node)] = node
            queue.extend(i for i in node.inputs if i is not None)
        # (a walk that left the layer would have reached a graph input that is not a stop: error above)
        if layer is None:
            inputs = {id(v): v for v in self.model.graph.inputs}
        graph = onnx.GraphProto(name="prefix" if layer is None else f"layer{layer}")
        graph.node.extend(ir.serde.serialize_node(n) for n in self._in_order(keep))
        sample = {} if layer is None else {self.layers[layer].input.name: self.hidden[0]}
        sample.update({n: vals[0] for n, vals in self._side_values.items()})
        for v in inputs.values():
            if v.name in sample and not v.is_graph_input():
                graph.input.append(onnx.helper.make_tensor_value_info(v.name, _onnx_type(sample[v.name]), None))
            else:  # a graph input of the model
                graph.input.append(ir.serde.serialize_value(v))
        paths: dict[str, Path] = {}
        for v in inits.values():
            t = v.const_value
            tp = ir.serde.serialize_tensor(t)
            tp.name = v.name
            if isinstance(t, ir.ExternalTensor):
                paths[v.name] = Path(t.path).resolve()
            graph.initializer.append(tp)
        root = Path(os.path.commonpath([str(p.parent) for p in paths.values()])) if paths else None
        if root is not None:
            for tp in graph.initializer:
                if tp.name in paths:
                    for entry in tp.external_data:
                        if entry.key == "location":
                            entry.value = os.path.relpath(paths[tp.name], root)
        for name in outputs:
            v = values[name]
            vi = onnx.ValueInfoProto(name=name)
            if v.dtype is not None:
                vi.type.tensor_type.elem_type = int(v.dtype)
            graph.output.append(vi)
        proto = onnx.helper.make_model(graph, producer_name="qcompiler.layerwise")
        del proto.opset_import[:]
        for domain, version in self.model.opset_imports.items():
            proto.opset_import.append(onnx.helper.make_opsetid(domain, version))
        proto.ir_version = max(self.model.ir_version or 8, 10)  # int4 types need IR 10
        return proto, root, {v.name for v in inputs.values()}
