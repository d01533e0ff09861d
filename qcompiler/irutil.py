"""IR helpers: validated loading, streaming saving and small graph queries over ``onnx_ir``.

Raw protobuf appears only here, at the edge: :func:`load_model` parses the file header
without external data, validates it (opset, external-data locations and sizes) and
hands back an ``onnx_ir.Model`` whose large tensors stay lazily memory-mapped.
:func:`save_model` writes weights to one external-data file, releasing each mapped
input tensor once it has been written so that peak memory stays near one tensor.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Collection, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from qcompiler.errors import InputError, OutputError, UnsupportedModelError

log = logging.getLogger(__name__)

#: Opsets of the default domain that qcompiler reads.  Below 14 the exporters we
#: target never produce LLM graphs; above 23 is newer than our ONNX Runtime.
MIN_OPSET, MAX_OPSET = 14, 23
#: Opset the quantizing passes raise the model to (block-wise DequantizeLinear, int4).
QUANT_OPSET = 21
MS_DOMAIN = "com.microsoft"
QC_DOMAIN = "qcompiler"
#: node metadata of the GGUF offset-correction MatMul (see ``linear_weight``)
GGUF_OFFSET_MARK = "qcompiler.gguf_offset"
#: marks the constant online-rotation MatMuls of passes/rotate.py: an orthogonal transform, not a linear layer
ROTATION_MARK = "qcompiler.rotation"
EXTERNAL_DATA_NAME = "model.onnx_data"


# ----------------------------------------------------------------------------- loading


def _check_external_data(proto: onnx.ModelProto, base_dir: Path) -> None:
    base = base_dir.resolve()
    extents: dict[str, list[tuple[str, int, int]]] = {}  # location → [(tensor, offset, end)]
    for tensor in _iter_graph_tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        if not location:
            raise InputError(f"initializer '{tensor.name}' has external data without a location")
        if os.path.isabs(location) or ".." in Path(location).parts:
            raise InputError(
                f"initializer '{tensor.name}': external-data location '{location}' escapes the "
                f"model folder {base_dir}; refusing to read it"
            )
        path = (base / location).resolve()
        if base not in path.parents and path != base:
            raise InputError(
                f"initializer '{tensor.name}': external-data location '{location}' resolves "
                f"outside the model folder {base_dir}; refusing to read it"
            )
        if not path.is_file():
            raise InputError(
                f"missing external-data file '{location}' (needed by initializer '{tensor.name}') "
                f"next to the model in {base_dir}"
            )
        offset = _external_int(tensor.name, info, "offset", 0)
        length = _external_int(tensor.name, info, "length", None)
        needed = _tensor_nbytes(tensor)
        if needed is not None and length is not None and length < needed:
            raise InputError(
                f"initializer '{tensor.name}': external-data length {length} is smaller than its "
                f"shape {list(tensor.dims)} needs ({needed} bytes); the model file is corrupt"
            )
        end = offset + (length if length is not None else (needed or 0))  # type: ignore[operator]
        extents.setdefault(location, []).append((tensor.name, offset, end))  # type: ignore[arg-type]
    for location, spans in extents.items():  # one stat per file: its links and its size
        st = (base / location).stat()
        if st.st_nlink > 1:  # onnx_ir refuses it at the first read
            raise InputError(
                f"external-data file '{location}' in {base_dir} has {st.st_nlink} hard links; "
                "onnx_ir refuses to read external data through a hard link (a guard against linked-in files): "
                "give the model folder its own copy (cp, not cp -l or ln)"
            )
        _check_extents(location, st.st_size, spans)


def _check_extents(location: str, size: int, spans: list[tuple[str, int, int]]) -> None:
    """Every tensor's bytes lie inside the file; else say whether the file is short or an offset wrong.

    The tensors' byte ranges do not overlap (shared ranges counted once), so a file that
    holds at least their total is complete and a range past its end is a wrong offset; a file
    shorter than the total is truncated.
    """
    bad = [sp for sp in spans if sp[2] > size]
    if not bad:
        return
    name, offset, end = bad[0]
    total = sum(e - o for o, e in {(o, e) for _, o, e in spans})
    if size >= total:
        raise InputError(
            f"initializer '{name}': external-data offset {offset} points past the end of '{location}' "
            f"(bytes {offset}..{end}, the file has {size}, enough for all {len(spans)} tensors' {total} bytes): "
            "the offset in model.onnx is wrong, the data file is complete"
        )
    raise InputError(
        f"external-data file '{location}' is truncated: initializer '{name}' needs bytes {offset}..{end} "
        f"but the file has {size} (the file is shorter than model.onnx's tensor table says: "
        f"{max(e for _, _, e in spans)} bytes)"
    )


def _external_int(name: str, info: dict[str, str], key: str, default: int | None) -> int | None:
    """A non-negative integer field (``offset``/``length``) of an external-data entry."""
    raw = info.get(key)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise InputError(f"initializer '{name}': external-data {key} '{raw}' is not a non-negative integer")
    return value


def _tensor_nbytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes the tensor's raw data takes (sub-byte types packed), or None if unknown."""
    try:
        bits = ir.DataType(tensor.data_type).bitwidth
    except (ValueError, TypeError):
        return None
    count = 1
    for d in tensor.dims:
        count *= int(d)
    return -(-count * bits // 8)


def _iter_graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _iter_graph_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _iter_graph_tensors(g)


def default_opset(model: ir.Model) -> int:
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0)))


def load_proto_header(path: str | os.PathLike) -> onnx.ModelProto:
    """Parse ``path`` without external data, with a clear error for anything but an ONNX model."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"no such file: {p}")
    if p.is_dir():
        raise InputError(f"{p} is a folder, expected an .onnx file")
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as e:
        raise InputError(f"{p} is not a valid ONNX model (truncated or garbled protobuf): {e}") from None
    except Exception as e:  # protobuf raises a variety of internal errors on garbage
        raise InputError(f"{p} is not a valid ONNX model (truncated or garbled protobuf): {e}") from None
    if not proto.graph.node and not proto.graph.initializer:
        raise InputError(f"{p} is not a valid ONNX model: its graph is empty (truncated or garbled file?)")
    return proto


def check_model_file(path: str | os.PathLike) -> onnx.ModelProto:
    """Validate an .onnx file without reading its weights; returns the header proto.

    The checks :func:`load_model` makes (protobuf, opset range, external-data
    locations and sizes), for callers that hand the file to ONNX Runtime directly.
    """
    p = Path(path)
    proto = load_proto_header(p)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise UnsupportedModelError(f"{p}: the model imports no opset of the default ONNX domain")
    if not (MIN_OPSET <= opset <= MAX_OPSET):
        raise UnsupportedModelError(
            f"{p}: opset {opset} of the default ONNX domain is not supported "
            f"(qcompiler reads opsets {MIN_OPSET}-{MAX_OPSET}); re-export with a supported opset"
        )
    _check_external_data(proto, p.parent)
    return proto


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX model into ``onnx_ir`` with lazy, memory-mapped external data.

    Raises :class:`InputError` naming the problem for a missing or malformed file, a
    missing or truncated external-data file, or an external-data path that escapes
    the model's folder; :class:`UnsupportedModelError` for an opset we do not read.
    """
    p = Path(path)
    proto = check_model_file(p)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as e:
        raise InputError(f"{p}: cannot read the graph: {e}") from None
    ir.external_data.set_base_dir(model.graph, p.parent)
    _inline_attribute_tensors(model.graph)
    return model


def _inline_attribute_tensors(graph: ir.Graph) -> None:
    """Read tensors held in node attributes (``Constant`` values) into memory.

    Exporters that save past 2 GB move even these into the external-data file, and
    ``onnx_ir`` saves attribute tensors with their old location: the saved model would
    point into the *source* folder's data file.  They are small (shapes, rotary tables),
    so they are simply inlined.
    """
    for node in ir.traversal.RecursiveGraphIterator(graph):
        if not node.attributes:
            continue
        for name, attr in list(node.attributes.items()):
            if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor):
                t = attr.value
                node.attributes[name] = ir.AttrTensor(name, ir.Tensor(t.numpy().copy(), name=t.name))
            elif attr.type == ir.AttributeType.TENSORS and any(
                isinstance(t, ir.ExternalTensor) for t in attr.value
            ):
                node.attributes[name] = ir.AttrTensors(
                    name, [ir.Tensor(t.numpy().copy(), name=t.name) for t in attr.value]
                )


# ----------------------------------------------------------------------------- saving


def save_model(model: ir.Model, path: str | os.PathLike, external_data: str = EXTERNAL_DATA_NAME) -> None:
    """Save ``model`` to ``path`` with all weights in one external-data file beside it.

    Each memory-mapped source tensor is released right after it is written, so saving
    a model whose weights are lazily mapped costs about one tensor of memory.
    """
    p = Path(path)
    pending: list[ir.ExternalTensor] = []

    def release_pending() -> None:
        while pending:
            done = pending.pop()
            try:
                done.release()
            except BufferError:  # a numpy view of the mapping is still alive; it is unmapped when that goes
                log.debug("save_model: %s is still referenced; not unmapped early", done.name)

    def _release_written(tensor: ir.TensorProtocol, _info: object) -> None:
        release_pending()  # the tensors handed over before this one are written by now
        if isinstance(tensor, ir.ExternalTensor):
            pending.append(tensor)

    try:
        ir.save(model, p, external_data=external_data, callback=_release_written)
    except OSError as e:
        raise OutputError(f"cannot write {p}: {e.strerror or e}") from None
    finally:
        release_pending()


# ----------------------------------------------------------------------------- spilling


SPILL_KEY = "qc.spill"
#: Tensors smaller than this stay in memory (scales, biases, shapes).
SPILL_MIN_BYTES = 1 << 20
_SPILL_ALIGN = 4096


class SpillStore:
    """An append-only scratch file for the large tensors passes create while compiling.

    Without it every quantized weight of a model sits in memory from the pass that makes
    it until the model is saved (int4 values take a byte each before packing).  With it
    (``attach_spill``), :func:`add_initializer` writes each large tensor here at once and
    registers an ``ir.ExternalTensor`` over it: a later pass maps a tensor only while it
    reads it and ``save_model`` copies it into ``model.onnx_data``, so peak memory is a
    few tensors, not the model.  Arrays read back are read-only, like the input's weights.
    """

    FILE = "spill.bin"

    def __init__(self, folder: Path, min_bytes: int | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.min_bytes = SPILL_MIN_BYTES if min_bytes is None else min_bytes
        self.bytes_spilled = 0
        self._file = open(folder / self.FILE, "wb")  # noqa: SIM115 (kept open for the store's life)

    def spill(self, tensor: ir.TensorProtocol, name: str) -> ir.TensorProtocol:
        # (empty tensors stay: onnx_ir cannot read back a zero-length external tensor's bytes)
        if self._file.closed or tensor.nbytes < max(self.min_bytes, 1) or isinstance(tensor, ir.ExternalTensor):
            return tensor
        data = _bytes_of(tensor)
        offset = -(-self._file.tell() // _SPILL_ALIGN) * _SPILL_ALIGN
        try:
            self._file.seek(offset)
            self._file.write(data)
            self._file.flush()
        except OSError as e:
            raise OutputError(f"cannot write scratch data to {self.folder}: {e.strerror or e}") from None
        size = data.nbytes if isinstance(data, memoryview) else len(data)
        self.bytes_spilled += size
        return _SpilledTensor(self.FILE, offset, size, tensor.dtype, shape=ir.Shape(tensor.shape),
                              name=name, base_dir=self.folder)

    def close(self) -> None:
        self._file.close()


def _bytes_of(tensor: ir.TensorProtocol) -> bytes | memoryview:
    """The tensor's serialized bytes; a 4-bit numpy tensor packed here in two passes (element ``2i`` in the
    low nibble, ``2i+1`` in the high one, as ``onnx_ir``'s own packing) and handed over without a copy."""
    raw = getattr(tensor, "raw", None)
    if tensor.dtype.bitwidth != 4 or not isinstance(raw, np.ndarray) or raw.dtype.itemsize != 1:
        return tensor.tobytes()
    flat = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    packed = flat[1::2] << 4
    packed |= flat[0::2] & 0x0F
    return memoryview(packed)


class _SpilledTensor(ir.ExternalTensor):
    """A spilled tensor that keeps nothing in memory between reads.

    ``ExternalTensor`` keeps the file mapped (and an int4 tensor's unpacked copy, a byte per
    value) once read, so a pass that merely looks at every weight would make all of them
    resident for the rest of the run.  Each read here returns an array of its own and
    unmaps the file: what stays in memory is what the caller keeps.
    """

    def numpy(self) -> np.ndarray:
        view = super().numpy()
        array = view if self.dtype.bitwidth < 8 else np.array(view, copy=True)  # sub-byte: already unpacked
        del view
        with contextlib.suppress(BufferError):
            self.release()
        return array

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        array = self.numpy()
        return array if dtype is None else array.astype(dtype)


def attach_spill(graph: ir.Graph, store: SpillStore | None) -> None:
    """Make :func:`add_initializer` on ``graph`` spill large tensors to ``store`` (None: stop)."""
    if store is None:
        graph.meta.pop(SPILL_KEY, None)
    else:
        graph.meta[SPILL_KEY] = store


# ----------------------------------------------------------------------------- graph queries


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant behind ``value`` (initializer or Constant node), else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is not None and node.op_type == "Constant" and node.domain == "":
        attr = node.attributes.get("value")
        if attr is not None and attr.type == ir.AttributeType.TENSOR:
            return attr.value.numpy()  # (not as_tensor(): its Protocol isinstance costs 0.3 ms a call)
        for key in ("value_float", "value_int"):
            if key in node.attributes:
                return np.array(node.attributes[key].value)
        for key in ("value_floats", "value_ints"):
            if key in node.attributes:
                return np.array(list(node.attributes[key].value))
    return None


def scalar_const(value: ir.Value | None) -> float | None:
    arr = const_array(value)
    if arr is None or arr.size != 1:
        return None
    return float(arr.reshape(()))


def is_weight(value: ir.Value | None) -> bool:
    """A constant 2-D floating-point tensor large enough to be a linear layer's weight."""
    if value is None or value.const_value is None:
        return False
    t = value.const_value
    return len(t.shape) == 2 and t.dtype.is_floating_point() and t.shape.numpy()[0] > 1


def linear_weight(node: ir.Node) -> tuple[ir.Value, bool] | None:
    """The constant weight of a linear node and whether it enters through ``Transpose``.

    ``MatMul(X, W)`` gives ``(W, False)``; ``MatMul(X, Transpose(E))`` — how exporters
    write an lm_head tied to the embedding ``E[vocab, hidden]`` — gives ``(E, True)``.
    A MatMul marked ``qcompiler.gguf_offset`` (the exact per-block offset correction of a
    GGUF-transcoded linear, ``qcompiler.gguf_transcode``) is part of that linear, not one.
    """
    if node.domain != "" or len(node.inputs) < 2 or GGUF_OFFSET_MARK in node.metadata_props \
            or ROTATION_MARK in node.metadata_props:
        return None
    if node.op_type == "Gemm" and (node.attributes.get_int("transA", 0) != 0):
        return None
    if node.op_type not in ("MatMul", "Gemm"):
        return None
    w = node.inputs[1]
    if is_weight(w):
        transposed = node.op_type == "Gemm" and node.attributes.get_int("transB", 0) == 1
        return w, transposed
    prod = w.producer() if w is not None else None
    if prod is not None and prod.op_type == "Transpose" and is_weight(prod.inputs[0]):
        perm = prod.attributes.get_ints("perm", None)
        if perm is None or list(perm) == [1, 0]:
            return prod.inputs[0], True
    return None


def is_linear(node: ir.Node) -> bool:
    """A ``MatMul``/``Gemm`` whose second input is a constant weight (possibly transposed)."""
    return linear_weight(node) is not None


def ensure_opset(model: ir.Model, domain: str, version: int) -> None:
    """Import ``domain`` at least at ``version`` (raising, never lowering, the default opset)."""
    current = model.opset_imports.get(domain)
    if current is None or current < version:
        model.opset_imports[domain] = version
        if domain == "":
            model.graph.opset_imports[""] = version


def unique_name(graph: ir.Graph, base: str) -> str:
    """A value/initializer name not yet used in ``graph`` (names handed out are remembered)."""
    used: set[str] = graph.meta.setdefault("qc.used_names", set())
    if not used:
        used.update(v.name for v in graph.initializers.values() if v.name)
        for node in graph:
            used.update(o.name for o in node.outputs if o.name)
        used.update(v.name for v in graph.inputs if v.name)
    name, i = base, 0
    while name in used or name in graph.initializers:
        i += 1
        name = f"{base}_{i}"
    used.add(name)
    return name


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray | ir.TensorProtocol) -> ir.Value:
    """Register a new initializer under a fresh name derived from ``name``.

    With a :class:`SpillStore` attached to ``graph`` (``attach_spill``), a large tensor is
    written to the store at once and registered as a lazily mapped ``ExternalTensor``.
    """
    name = unique_name(graph, name)
    # (np.ndarray first: an isinstance against the runtime-checkable TensorProtocol costs 0.3 ms)
    tensor = ir.Tensor(array, name=name) if isinstance(array, np.ndarray) else array  # what ir.tensor makes of one
    store: SpillStore | None = graph.meta.get(SPILL_KEY)
    if store is not None:
        tensor = store.spill(tensor, name)
    tensor.name = name
    value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype))
    value.const_value = tensor
    graph.register_initializer(value)
    return value


def gather_channels(graph: ir.Graph, x: ir.Value, idx: np.ndarray, name: str, idx_name: str) -> ir.Node:
    """``Gather(x, idx, axis=-1)`` (not inserted): channels ``idx`` of ``x``'s last axis, the indices an initializer
    named from ``idx_name``; its output typed and shaped ``[..., len(idx)]`` when ``x``'s shape is known."""
    node = ir.node("Gather", [x, add_initializer(graph, idx_name, np.asarray(idx, np.int64))], {"axis": -1}, name=name)
    if x.shape is not None and len(x.shape):
        node.outputs[0].type, node.outputs[0].shape = x.type, ir.Shape([*list(x.shape)[:-1], len(idx)])
    return node


def constants_to_initializers(graph: ir.Graph) -> int:
    """Replace every ``Constant(value=t)`` node of ``graph`` (not its subgraphs) by an initializer of the same name
    and tensor; returns how many.  Exporters write a third of a decoder's nodes as Constants (shape
    arithmetic, scalars); as initializers they cost no node to load, match or run.  Same values, same
    names: every pass reads a constant input alike either way (``const_value``/``get_const_tensor``)."""
    count = 0
    for node in list(graph):
        if (node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.attributes) != 1
                or "value" not in node.attributes or node.attributes["value"].type != ir.AttributeType.TENSOR):
            continue
        out = node.outputs[0]
        if out.is_graph_output() or not out.name or out.name in graph.initializers:
            continue
        tensor = node.attributes["value"].value
        init = ir.Value(shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
        out.replace_all_uses_with(init)
        graph.remove(node, safe=True)
        init.name, out.name = out.name, None
        tensor.name = init.name
        graph.register_initializer(init)
        count += 1
    return count


def remove_unused_initializers(graph: ir.Graph) -> int:
    unused = [n for n, v in graph.initializers.items() if not v.uses() and v not in graph.outputs]
    for n in unused:
        del graph.initializers[n]
    return len(unused)


def op_types(model: ir.Model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.all_nodes():
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def topo_index(graph: ir.Graph) -> dict[int, int]:
    """Position of each node (by id) in the graph's (topological) order."""
    return {id(n): i for i, n in enumerate(graph)}


@functools.cache
def _known_schemas() -> frozenset[tuple[str, str]]:
    """(domain, op_type) of every op ONNX Runtime's schema registry defines (ONNX + contrib)."""
    try:
        from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema

        schemas = get_all_operator_schema()
    except (ImportError, AttributeError, RuntimeError):  # fall back to ONNX's own registry
        schemas = onnx.defs.get_all_schemas_with_history()
    return frozenset(((s.domain or ""), s.name) for s in schemas)


def unknown_ops(model: ir.Model) -> dict[str, int]:
    """Nodes whose op neither ONNX, ONNX Runtime nor qcompiler defines: ``{"domain.Op": count}``.

    Such nodes (custom ops, model-local functions) are loaded, left alone by every
    pass and reported; the model still runs wherever the op is available (a function
    the model carries, or a custom-op library registered with the session).
    """
    counts: dict[str, int] = {}
    for node in model.graph.all_nodes():
        domain = "" if node.domain == "ai.onnx" else node.domain
        if domain == QC_DOMAIN or onnx.defs.has(node.op_type, domain):  # ONNX's own: no ONNX Runtime import
            continue
        if (domain, node.op_type) in _known_schemas():
            continue
        key = f"{domain}.{node.op_type}" if domain else node.op_type
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


# ----------------------------------------------------------------------------- sessions over in-memory models

#: In-memory initializers at least this large go to a session's scratch data file (smaller ones stay inline).
SESSION_INLINE_LIMIT = 1 << 16


def external_weights_proto(model: ir.Model, scratch: Path, data_name: str, read: Collection[str] | None = None,
                           inline_limit: int = SESSION_INLINE_LIMIT) -> tuple[onnx.ModelProto, dict[str, Path]]:
    """``model`` serialized with its large weights as external-data references, so that a session over
    it (``runtime.proto_session``) holds no second copy of them in the proto.

    A weight already in a file stays there; an in-memory one of ``inline_limit`` bytes or more is
    written to ``scratch/data_name`` (4 KiB aligned), only when ``read`` is None or names it (the
    others get a reference nothing reads: the caller drops them from the graph).  ``model`` is as
    it was on return.  Returns the proto and the file of each external weight, for
    :func:`relocate_external_data`.
    """
    paths: dict[str, Path] = {}
    swapped: list[tuple[ir.Value, ir.TensorProtocol]] = []
    data_file = scratch / data_name
    try:
        with open(data_file, "wb") as f:
            for name, value in model.graph.initializers.items():
                t = value.const_value
                if t is None:
                    continue
                if isinstance(t, ir.ExternalTensor):
                    paths[name] = Path(t.path).resolve()
                    continue
                if t.nbytes < inline_limit:
                    continue
                offset = -(-f.tell() // _SPILL_ALIGN) * _SPILL_ALIGN
                if read is None or name in read:
                    f.seek(offset)
                    f.write(t.tobytes())
                    paths[name] = data_file.resolve()
                swapped.append((value, t))
                value.const_value = ir.ExternalTensor(data_name, offset, t.nbytes, t.dtype, shape=t.shape,
                                                      name=t.name or name, base_dir=scratch)
        proto = ir.serde.serialize_model(model)
    finally:
        for value, t in swapped:
            value.const_value = t
    return proto, paths


def relocate_external_data(proto: onnx.ModelProto, paths: dict[str, Path], scratch: Path) -> Path:
    """Point the external initializers ``proto`` still holds at their files (``paths``), relative to
    the deepest folder holding all of them (``scratch`` when there are none), which it returns: the
    session's ``model_external_initializers_file_folder_path``."""
    used = {t.name: paths[t.name] for t in proto.graph.initializer
            if t.data_location == onnx.TensorProto.EXTERNAL and t.name in paths}
    root = Path(os.path.commonpath([str(p.parent) for p in used.values()])) if used else scratch.resolve()
    for t in proto.graph.initializer:
        if t.name in used:
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = os.path.relpath(used[t.name], root)
    return root
