"""Value types and shapes of a decoder graph, for the passes that read them (the fusions).

Shape facts come from ONNX Runtime's symbolic shape inference (it knows the contrib ops and
follows symbolic dims through the exported shape arithmetic), made cheaper on decoders by
giving it ``Constant`` nodes as initializers and merging the repeated shape arithmetic, with
ONNX's own inference as the fallback.  :func:`infer_shapes` runs it only when some node output
lacks a type or shape; :func:`record_shapes` is what the export calls, so that an exported
model carries its shapes (``value_info``) and a quantization of it skips the inference (about
0.6 s of a 4 s SmolLM2 compile).

A value's shape lives on the value object, so it stays valid across passes that keep the value
(rewiring, weight rounding, renames); a pass that makes a value gives it a shape or leaves it
unknown, and an unknown one brings the inference back.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnx_ir.passes.common import _c_api_utils  # pinned onnx-ir: strips weights around an ONNX API call

from qcompiler.models.llama import Dim, dims

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

SHAPES_KEY = "qc.fusion_shapes"


def _fingerprint(graph: ir.Graph) -> int:
    return hash(tuple(id(n) for n in graph))


def infer_shapes(model: ir.Model) -> None:
    """Fill in value types and shapes (best effort), unless done since the graph last changed.

    A graph whose every node output already has a type and a shape (an export with its shapes
    recorded, :func:`record_shapes`, after passes that shape what they make) is not inferred
    again: a local propagation along the main data path fills what a weight quantizer added
    (``DequantizeLinear`` has its input's shape) and the shapes are taken as they are.
    Otherwise ONNX Runtime's symbolic shape inference runs: it knows the contrib ops
    (``MatMulNBits``, fused norms, attention) and propagates symbolic dims through shape
    arithmetic; without it (or if it fails) ONNX shape inference runs after the local
    propagation, since ONNX's own stops at every contrib op.
    """
    if model.graph.meta.get(SHAPES_KEY) == _fingerprint(model.graph):
        return
    _propagate_main_path(model.graph)  # fills only what is still unknown
    if shapes_known(model.graph):
        log.debug("every value has its type and shape: no shape inference")
        shapes_current(model)
        return
    outcome = _ort_symbolic_inference(model)
    if outcome != "complete":
        _propagate_main_path(model.graph)  # fills only what is still unknown
    if outcome == "failed":
        common_passes.ShapeInferencePass(strict_mode=False, data_prop=True)(model)
    shapes_current(model)


def shapes_known(graph: ir.Graph) -> bool:
    """Every named output of ``graph``'s nodes has a type and a shape (its rank; dims may be symbolic)."""
    return all(o.type is not None and o.shape is not None for node in graph for o in node.outputs if o.name)


def record_shapes(model: ir.Model) -> bool:
    """Infer every value's type and shape now, to be saved with the model (``value_info``): a model
    saved so is not inferred again by the passes that read shapes.  True when every value got one."""
    infer_shapes(model)
    known = shapes_known(model.graph)
    if not known:
        missing = sum(1 for node in model.graph for o in node.outputs if o.name and (o.type is None or o.shape is None))
        log.info("shapes recorded, %d value(s) without one (inferred again when a pass needs them)", missing)
    return known


def shapes_current(model: ir.Model) -> None:
    """Declare the inferred shapes valid for the graph as it is now (the fusions keep them so)."""
    model.graph.meta[SHAPES_KEY] = _fingerprint(model.graph)


def _symbolic_shape_inference_class() -> type | None:
    """ORT's ``SymbolicShapeInference``, loaded from its file: ``onnxruntime.tools``' package init imports torch."""
    import importlib.util

    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "tools" / "symbolic_shape_infer.py"
    name = "qcompiler_ort_symbolic_shape_infer"
    module = sys.modules.get(name)
    if module is None:
        file_spec = importlib.util.spec_from_file_location(name, path)
        if file_spec is None or file_spec.loader is None or not path.is_file():
            return None
        module = importlib.util.module_from_spec(file_spec)
        try:
            file_spec.loader.exec_module(module)
        except ImportError:  # sympy missing
            return None
        sys.modules[name] = module
    return getattr(module, "SymbolicShapeInference", None)


#: ops whose output type and shape the symbolic tool's own rule writes (Shape: the input's rank)
_OWN_RULE = frozenset({"Unsqueeze", "Gather", "Concat", "Shape", "Reshape", "MatMul"})


def onnx_helper() -> object:
    import onnx.helper

    return onnx.helper


_REDUCE_AXES_INPUT = ("ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp")


def _contrib_aware(cls: type) -> type:
    """ORT's inference plus the integer linears its dispatcher lacks (it stops at the first unknown op).

    ``MatMulIntegerToFloat(A, B, a_scale, …)`` and ``DynamicQuantizeMatMul(A, B, …)`` have
    MatMul's shape; the output takes ``a_scale``'s float type (resp. ``A``'s).  ``ReduceMax`` /
    ``ReduceMin`` with their axes as an input (opset 18: the per-token activation scales of the
    W8A8 lowering) reduce like ``ReduceMean``, which the tool knows; without them it stopped at
    the first per-token quantizer and every fusion after a W8A8 lowering went without shapes.
    ``GatherBlockQuantized`` over a packed uint8 table (``lower-embeddings``) gathers rows of
    ``8/bits`` values a byte (the tool gave the packed width, and stopped at the next norm).
    """

    class ContribAware(cls):  # type: ignore[misc,valid-type]
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            self.dispatcher_.setdefault("MatMulIntegerToFloat", self._infer_matmul_to_float)
            self.dispatcher_.setdefault("DynamicQuantizeMatMul", self._infer_matmul_to_float)
            for op in _REDUCE_AXES_INPUT:
                self.dispatcher_.setdefault(op, self._infer_ReduceMean)  # opset ≥ 18: axes is input 1
            self.dispatcher_["GatherBlockQuantized"] = self._infer_gather_block_quantized

        def _onnx_infer_single_node(self, node: object) -> None:
            """Skip the one-node ONNX inference where the tool's own rule writes the whole result anyway
            (``Unsqueeze``, ``Gather``, ``Concat``, ``MatMul``, ``Reshape``: their rules set the output's
            shape, and its type: the input's) or where the result is the input's rank (``Shape``): over
            half a decoder's nodes,
            and the ONNX call (a model built, serialized and inferred per node) is most of their cost."""
            op = node.op_type  # type: ignore[attr-defined]
            if node.domain not in ("", "ai.onnx") or op not in _OWN_RULE:  # type: ignore[attr-defined]
                super()._onnx_infer_single_node(node)
                return
            out = node.output[0]  # type: ignore[attr-defined]
            vi = self.out_mp_.graph.value_info.add()
            vi.name = out
            if op == "Shape":
                rank = len(self.known_vi_[node.input[0]].type.tensor_type.shape.dim)  # type: ignore[attr-defined]
                attrs = {a.name: a.i for a in node.attribute}  # type: ignore[attr-defined]
                start, end = attrs.get("start", 0), attrs.get("end", rank)
                vi.CopyFrom(onnx_helper().make_tensor_value_info(out, 7, [len(range(rank)[start:end])]))  # int64
            elif op == "Reshape":  # its rule keeps the output's element type: the input's
                vi.type.tensor_type.elem_type = self.known_vi_[node.input[0]].type.tensor_type.elem_type  # type: ignore[attr-defined]
            self.known_vi_[out] = vi

        def _infer_gather_block_quantized(self, node: object) -> None:
            """The tool reads a uint8 table's packed dims: the rows it gathers hold 8/bits values a byte."""
            self._infer_Gather(node)
            data = self.known_vi_[node.input[0]].type.tensor_type  # type: ignore[attr-defined]
            axis = next((a.i for a in node.attribute if a.name == "gather_axis"), 0)  # type: ignore[attr-defined]
            bits = next((a.i for a in node.attribute if a.name == "bits"), 4)  # type: ignore[attr-defined]
            rank = len(data.shape.dim)
            if data.elem_type != 2 or bits >= 8 or axis in (-1, rank - 1):  # 2: uint8 (packed)
                return
            last = self.known_vi_[node.output[0]].type.tensor_type.shape.dim[-1]  # type: ignore[attr-defined]
            if last.HasField("dim_value"):
                last.dim_value *= 8 // bits

        def _infer_matmul_to_float(self, node: object) -> None:
            typed = node.input[2] if node.op_type == "MatMulIntegerToFloat" else node.input[0]  # type: ignore[attr-defined]
            vi = self.known_vi_.get(typed)
            self._compute_matmul_shape(node, vi.type.tensor_type.elem_type if vi is not None else None)

    return ContribAware


def _constants_as_initializers(graph: object) -> dict[str, tuple[int, list[int]]]:
    """Turn ``Constant(value=t)`` nodes of a GraphProto into initializers (about a third of a decoder's nodes).

    Symbolic inference reads an initializer's value wherever it reads a Constant's, and skips
    the per-node work (a one-node ONNX inference each) it spends on every Constant node.
    Returns each folded output's (element type, dims), which the caller gives that output.
    """
    import onnx

    keep, made = [], []
    for n in graph.node:  # type: ignore[attr-defined]
        if (n.op_type == "Constant" and n.domain == "" and len(n.attribute) == 1 and n.attribute[0].name == "value"
                and n.attribute[0].type == onnx.AttributeProto.TENSOR):
            t = onnx.TensorProto()
            t.CopyFrom(n.attribute[0].t)
            t.name = n.output[0]
            made.append(t)
        else:
            keep.append(n)
    if made:
        del graph.node[:]  # type: ignore[attr-defined]
        graph.node.extend(keep)  # type: ignore[attr-defined]
        graph.initializer.extend(made)  # type: ignore[attr-defined]
    return {t.name: (t.data_type, list(t.dims)) for t in made}


def _merge_repeats(graph: object) -> dict[str, str]:
    """Drop, from a GraphProto given to shape inference, every node that repeats an earlier one (same op,
    attributes and inputs, after earlier merges; small initializers compared by value): an exported
    decoder recomputes the same shape arithmetic for q, k and v.  Returns dropped output → the output
    it repeats (which has the same shape).  Nodes making a graph output stay."""
    keep, aliases, seen = [], {}, {}
    small: dict[tuple, str] = {}
    for t in graph.initializer:  # type: ignore[attr-defined]
        if len(t.raw_data) <= 64 and t.raw_data:
            key = (t.data_type, tuple(t.dims), t.raw_data)
            if key in small:
                aliases[t.name] = small[key]
            else:
                small[key] = t.name
    outputs = {o.name for o in graph.output}  # type: ignore[attr-defined]
    get = aliases.get
    for n in graph.node:  # type: ignore[attr-defined]
        ins = tuple([get(i, i) for i in n.input])
        attrs = n.attribute
        key = (n.domain, n.op_type, ins, tuple([a.SerializeToString() for a in attrs]) if attrs else (), len(n.output))
        rep = seen.get(key)
        if rep is not None and not any(o in outputs for o in n.output) and n.op_type not in ("If", "Loop", "Scan"):
            for o, r in zip(n.output, rep.output):
                if o:
                    aliases[o] = r
            continue
        seen.setdefault(key, n)
        if ins != tuple(n.input):
            del n.input[:]
            n.input.extend(ins)
        keep.append(n)
    if len(keep) < len(graph.node):  # type: ignore[attr-defined]
        del graph.node[:]  # type: ignore[attr-defined]
        graph.node.extend(keep)  # type: ignore[attr-defined]
    return {o: r for o, r in aliases.items() if o not in small.values()}


def _inline_external(proto: onnx.ModelProto, model: ir.Model) -> None:
    """The small initializers ``call_onnx_api`` serializes keep their external-data reference, which the
    symbolic tool resolves against the working directory (not the model's folder) and fails on ("should be
    stored in model.onnx_data, but it is not regular file"): shape inference then fell back to ONNX's,
    and a model quantized from another directory lost its attention and rotary fusions.  They are read
    from the IR model (which knows its folder) into the proto instead."""
    from onnx import TensorProto, numpy_helper

    for t in proto.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            value = model.graph.initializers[t.name].const_value
            if value is not None:
                t.CopyFrom(numpy_helper.from_array(value.numpy(), t.name))


def _ort_symbolic_inference(model: ir.Model) -> str:
    """Symbolic inference: "complete", "partial" (it stopped early; what it found is kept) or "failed"."""
    base = _symbolic_shape_inference_class()
    if base is None:
        return "failed"
    inference = _contrib_aware(base)
    silenced = logging.getLogger("qcompiler_ort_symbolic_shape_infer")  # its module name here
    level = silenced.level
    silenced.setLevel(logging.ERROR)
    complete = [False]
    constants: dict[str, tuple[int, list[int]]] = {}  # Constant output → (element type, dims)

    def infer(proto: onnx.ModelProto) -> onnx.ModelProto:
        # the tool's own infer_shapes, minus the scratch file it saves when incomplete
        _inline_external(proto, model)
        constants.update(_constants_as_initializers(proto.graph))
        aliases = _merge_repeats(proto.graph)
        ssi = inference(2**31 - 1, True, False, 0)
        ssi._preprocess(proto)
        while ssi.run_:
            complete[0] = ssi._infer_impl()
        ssi._update_output_from_vi()
        out = ssi.out_mp_
        found = {v.name: v for v in out.graph.value_info}
        for name, rep in aliases.items():  # a repeated computation has its first occurrence's shape
            if rep in found:
                vi = out.graph.value_info.add()
                vi.CopyFrom(found[rep])
                vi.name = name
        return out

    try:  # weights travel as typed inputs (onnx_ir's helper): no tensor data is serialized or read
        inferred = _c_api_utils.call_onnx_api(infer, model)
    except Exception as e:  # the tool raises bare Exceptions on ops it does not know
        log.info("symbolic shape inference failed (%s); using ONNX shape inference", e)
        return "failed"
    finally:
        silenced.setLevel(level)
    found: dict[str, onnx.ValueInfoProto] = {v.name: v for v in inferred.graph.value_info}
    for node in model.graph:
        const = constants.get(node.outputs[0].name or "") if len(node.outputs) == 1 else None
        if const is not None:  # its tensor says it exactly (it went in as an initializer)
            node.outputs[0].type, node.outputs[0].shape = ir.TensorType(ir.DataType(const[0])), ir.Shape(const[1])
            continue
        for out in node.outputs:
            vi = found.get(out.name or "")
            if vi is None or not vi.type.HasField("tensor_type"):
                continue
            tt = vi.type.tensor_type
            if tt.elem_type:
                out.type = ir.TensorType(ir.DataType(tt.elem_type))
            if tt.HasField("shape"):
                out.shape = ir.Shape([d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                      for d in tt.shape.dim])
    if not complete[0]:
        log.info("symbolic shape inference stopped early; its partial shapes are kept")
        return "partial"
    return "complete"


_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Neg", "Sigmoid", "Tanh", "Relu",
                          "Erf", "Cast", "Identity", "Max", "Min", "Where", "QuickGelu", "Gelu", "FastGelu",
                          "ScaledSiLU", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization",
                          "RotaryEmbedding"})
_LINEARS = frozenset({"MatMul", "MatMulNBits", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"})


def _broadcast(shapes: list[list[Dim]]) -> list[Dim] | None:
    rank = max(len(s) for s in shapes)
    out: list[Dim] = []
    for i in range(rank):
        ds = {s[i - rank + len(s)] for s in shapes if i - rank + len(s) >= 0} - {1}
        if len(ds) > 1 or None in ds:
            return None
        out.append(ds.pop() if ds else 1)
    return out


def _propagate_main_path(graph: ir.Graph) -> None:
    """Shapes/types along the residual stream and linears, for ops ONNX inference cannot see through."""
    for node in graph:
        if all(o.shape is not None and o.type is not None for o in node.outputs[:1]):
            continue
        op, ins = node.op_type, [i for i in node.inputs if i is not None]
        known = [dims(i) for i in ins]
        shape: list[Dim] | None = None
        dtype = None
        if op in ("QuantizeLinear", "DequantizeLinear") and known and known[0] is not None:
            shape = known[0]  # elementwise (blocked scales too): x's shape
            if op == "DequantizeLinear":
                dtype = ins[1].dtype if len(ins) > 1 else ir.DataType.FLOAT
            else:
                dtype = ins[2].dtype if len(ins) > 2 else ir.DataType.UINT8
        elif op == "Gather" and len(ins) == 2 and known[0] is not None and known[1] is not None and len(known[0]) == 2:
            if node.attributes.get_int("axis", 0) == 0:
                shape, dtype = [*known[1], known[0][1]], ins[0].dtype
        elif op in _ELEMENTWISE:
            data = ins[1:] if op == "Where" else ins
            if op in ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "RotaryEmbedding"):
                data = ins[:1]
            ds = [dims(i) for i in data]
            if ds and all(d is not None for d in ds):
                shape = _broadcast(ds)  # type: ignore[arg-type]
            dtype = next((i.dtype for i in data if i.dtype is not None), None)
            if op == "Cast":
                dtype = ir.DataType(node.attributes.get_int("to", 1))
        elif op in _LINEARS and known and known[0] is not None and len(known[0]) >= 2:
            n = node.attributes.get_int("N", 0) if op == "MatMulNBits" else None
            if n is None and len(known) > 1 and known[1] is not None and len(known[1]) == 2:
                n = known[1][1]  # type: ignore[assignment]
            if isinstance(n, int) and n > 0:
                shape = [*known[0][:-1], n]
                dtype = ins[0].dtype if op in ("MatMul", "MatMulNBits", "DynamicQuantizeMatMul") else None
                if op != "MatMul" and dtype is None:
                    dtype = ir.DataType.FLOAT
        if shape is not None and node.outputs[0].shape is None:
            node.outputs[0].shape = ir.Shape(shape)
        if dtype is not None and node.outputs[0].type is None:
            node.outputs[0].type = ir.TensorType(dtype)
        if op == "SkipSimplifiedLayerNormalization" and len(node.outputs) > 3 and node.outputs[3].shape is None:
            node.outputs[3].shape, node.outputs[3].type = node.outputs[0].shape, node.outputs[0].type


def record_shapes_proto(proto: onnx.ModelProto, base_dir: str | Path) -> bool:
    """:func:`record_shapes` for a model held as a proto (its external data in ``base_dir``): the
    shapes found are added to ``proto.graph.value_info``; no weight is read."""
    model = ir.serde.deserialize_model(proto)
    ir.external_data.set_base_dir(model.graph, Path(base_dir))
    known = record_shapes(model)
    have = {v.name for v in proto.graph.value_info}
    for node in model.graph:
        for out in node.outputs:
            if out.name and out.name not in have and (out.type is not None or out.shape is not None):
                proto.graph.value_info.append(ir.serde.serialize_value(out))
    return known
