"""fuse-pack-linears: linears reading the same activation → one linear + ``Split`` (q/k/v, gate/up).

    [X·W₁, X·W₂, X·W₃] = Split(X·[W₁ | W₂ | W₃], [n₁, n₂, n₃], axis=−1)

Every output column depends only on its own weight column, so concatenating weights
along N is exact for each form the weight can take, as long as the per-column data
travel with their column:

* float ``MatMul(X, W)``: ``W`` columns;
* ``MatMul(X, DequantizeLinear(q, s, z))`` (weight-only and the canonical W8A8 weight):
  ``q``, and ``s``/``z`` per column (per channel) or per column of each K-block;
* ``com.microsoft.MatMulNBits``: rows of ``B[N, blocks, blob]``, of the scales and
  packed zero points (stored N-major), and the bias;
* ``com.microsoft.MatMulIntegerToFloat`` / ``DynamicQuantizeMatMul``: ``B`` columns, per
  column scales/zero points (a scalar one, equal in every member, stays scalar), bias — the activation side (``A``, its scale and zero
  point) must be the very same values.

Members must agree on everything else (K, bits, block size, accuracy level, types,
which optional inputs exist).  Duplicated activation-quantization chains (one per
W8A8 linear, all over the same ``X``) are merged first by deduplicating small
constants and common-subexpression elimination, so the linears meet on one input.
Bias Adds following every member (q/k/v biases) become one Add on the packed output.
The packed linear gets role ``qkv_proj`` / ``gate_up_proj`` when its members were q/k/v
or gate/up (``canonicalize`` recognizes the ``Split`` form too).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from qcompiler.irutil import MS_DOMAIN, add_initializer, const_array, is_weight
from qcompiler.pipeline import QCPass, register_pass
from qcompiler.quant.emit import QWEIGHT_KEY, WeightDQ
from qcompiler.spec import LinearInfo, Role, linear_info, set_linear_info

from ._fusion import cleanup, new_node, record, replace_value

log = logging.getLogger(__name__)


@dataclass
class _Member:
    node: ir.Node
    key: tuple
    n: int
    pieces: dict[int, tuple[np.ndarray, ir.DataType]] = field(default_factory=dict)  # input slot → N-major rows
    dq: ir.Node | None = None
    native: bool = False  # pieces in the input's own layout, N its last axis (not N-major rows)


def _arr(v: ir.Value | None) -> tuple[np.ndarray, ir.DataType] | None:
    if v is None or v.const_value is None:
        return None
    t = v.const_value
    a = np.asarray(t.numpy())
    if t.dtype in (ir.DataType.INT4, ir.DataType.UINT4):
        a = a.astype(np.int8 if t.dtype == ir.DataType.INT4 else np.uint8, copy=False)
    return a, t.dtype


def _rows(a: np.ndarray, n: int, axis: int) -> np.ndarray | None:
    """``a`` rearranged N-major ``[n, -1]`` (``axis`` is where N lives); scalars broadcast."""
    if a.size == 1:
        return np.full((n, 1), a.reshape(()), dtype=a.dtype)
    if a.ndim == 0 or a.shape[axis] != n:
        return None
    return np.moveaxis(a, axis, 0).reshape(n, -1)


def _optional(node: ir.Node, i: int) -> ir.Value | None:
    return node.inputs[i] if len(node.inputs) > i else None


def _member(node: ir.Node, load: bool = True) -> _Member | None:
    """The linear as a pack member; ``load=False`` only keys it (no weight is read: an unpacked
    float lm_head would otherwise be read and copied whole just to find it has no siblings)."""
    op, dom = node.op_type, node.domain
    if op == "MatMul" and dom == "":
        w = node.inputs[1]
        if is_weight(w):
            if not load:
                t = w.const_value  # type: ignore[union-attr]
                return _Member(node, ("float", t.dtype, t.shape[0]), t.shape[1])  # type: ignore[union-attr]
            a, dt = _arr(w)  # type: ignore[misc]
            return _Member(node, ("float", dt, a.shape[0]), a.shape[1], {1: (a.T.copy(), dt)})
        dq = w.producer() if w is not None else None
        if dq is None or dq.op_type != "DequantizeLinear" or dq.domain != "" or len(w.uses()) != 1:
            return None
        q, s, z = _arr(dq.inputs[0]), _arr(dq.inputs[1]), _arr(_optional(dq, 2))
        if q is None or s is None or (_optional(dq, 2) is not None and z is None) or q[0].ndim != 2:
            return None
        axis, block = dq.attributes.get_int("axis", 1), dq.attributes.get_int("block_size", 0)
        k, n = q[0].shape
        if not ((block and axis == 0) or (not block and axis in (1, -1))):
            return None
        s_axis = 1 if block else 0
        if all(a[0].ndim >= 1 and a[0].shape[-1] == n and a[0].size > 1 for a in (q, s, z) if a is not None):
            # N is every input's last axis: the pieces stay as they are and are concatenated along it
            # (no transposition of the weight there and back)
            native = {0: q, 1: s} | ({2: z} if z is not None else {})
            key = ("dq-native", q[1], s[1], None if z is None else z[1], axis, block, k, s[0].ndim)
            return _Member(node, key, n, native, dq, native=True)  # type: ignore[arg-type]
        pieces = {0: (q[0].T.copy(), q[1]), 1: (_rows(s[0], n, s_axis), s[1])}
        if z is not None:
            pieces[2] = (_rows(z[0], n, s_axis), z[1])
        if any(p[0] is None for p in pieces.values()):
            return None
        key = ("dq", q[1], s[1], None if z is None else z[1], axis, block, k, s[0].ndim, s[0].size == 1)
        return _Member(node, key, n, pieces, dq)  # type: ignore[arg-type]
    if op == "MatMulNBits" and dom == MS_DOMAIN:
        if _optional(node, 4) is not None:  # g_idx
            return None
        n = node.attributes.get_int("N", 0)
        attrs = tuple(node.attributes.get_int(a, d) for a, d in (("K", 0), ("bits", 4), ("block_size", 0),
                                                                 ("accuracy_level", 0)))
        pieces = {}
        for i in (1, 2, 3, 5):
            v = _optional(node, i)
            if v is None:
                continue
            a = _arr(v)  # every MatMulNBits input is stored N-major (flat or not)
            if a is None or a[0].size % n:
                return None
            pieces[i] = (a[0].reshape(n, -1), a[1])
        if 1 not in pieces or 2 not in pieces:
            return None
        key = ("nbits", attrs, tuple(sorted((i, str(p[1])) for i, p in pieces.items())), node.inputs[1].shape[1:])  # type: ignore[union-attr]
        return _Member(node, key, n, pieces)
    if op in ("MatMulIntegerToFloat", "DynamicQuantizeMatMul") and dom == MS_DOMAIN:
        b = _arr(node.inputs[1])
        if b is None or b[0].ndim != 2:
            return None
        k, n = b[0].shape
        # slots: weight, its scale / zero point, bias (per column); the rest must be shared
        col_slots = (1, 3, 5, 6) if op == "MatMulIntegerToFloat" else (1, 2, 3, 4)
        shared = tuple(id(node.inputs[i]) if i < len(node.inputs) and node.inputs[i] is not None else None
                       for i in range(len(node.inputs)) if i not in col_slots)
        pieces = {1: (b[0].T.copy(), b[1])}
        scalars = []  # a scalar (the uint8 weights' zero point 128) stays scalar if all members agree
        for i in col_slots[1:]:
            v = _optional(node, i)
            if v is None:
                continue
            a = _arr(v)
            if a is not None and a[0].size == 1:
                scalars.append((i, a[0].reshape(()).item(), str(a[1])))
                continue
            r = _rows(a[0], n, 0) if a is not None else None
            if r is None:
                return None
            pieces[i] = (r, a[1])  # type: ignore[index]
        key = (op, k, shared, tuple(scalars), tuple(sorted((i, str(p[1])) for i, p in pieces.items())))
        return _Member(node, key, n, pieces)
    return None


def _following_bias(node: ir.Node, n: int) -> tuple[np.ndarray, ir.Node] | None:
    """``(b, add)`` when the linear's only consumer is ``Add(y, b)`` with a constant ``b`` of n elements."""
    y = node.outputs[0]
    uses = y.uses()
    if len(uses) != 1 or y.is_graph_output() or uses[0].node.op_type != "Add" or uses[0].node.domain != "":
        return None
    add = uses[0].node
    b = const_array(add.inputs[1 - uses[0].idx])
    if b is None or b.size != n or b.shape[-1] != n:
        return None
    return b.reshape(n), add


def _packed_role(members: list[_Member]) -> LinearInfo | None:
    infos = [linear_info(m.node) for m in members]
    if any(i is None for i in infos) or len({i.layer for i in infos}) != 1:  # type: ignore[union-attr]
        return None
    roles = [i.role for i in infos]  # type: ignore[union-attr]
    layer = infos[0].layer  # type: ignore[union-attr]
    if roles == [Role.Q, Role.K, Role.V]:
        return LinearInfo(layer, Role.QKV)
    if roles == [Role.GATE, Role.UP]:
        return LinearInfo(layer, Role.GATE_UP)
    return None


@register_pass
class FusePackLinears(QCPass):
    """Sibling linears (same input, same form) → one linear + Split (see module docstring)."""

    name = "fuse-pack-linears"
    needs_canonical = True  # canonicalize must see the unfused decoder (QCPass.needs_canonical)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        common_passes.DeduplicateInitializersPass(size_limit=1024)(model)
        common_passes.CommonSubexpressionEliminationPass()(model)
        groups: dict[tuple, list[_Member]] = defaultdict(list)
        for node in graph:
            m = _member(node, load=False) if node.inputs and node.inputs[0] is not None else None
            if m is not None:
                m.pieces = {}  # re-read per group below: keeping every linear's arrays costs ~a byte per weight
                groups[(id(node.inputs[0]), m.key)].append(m)
        count = 0
        for members in groups.values():
            if len(members) < 2:
                continue
            self._pack(graph, [_member(m.node) for m in members])  # type: ignore[misc]
            count += 1
        if count:
            cleanup(model)
        record(self.context, self.name, count)
        log.info("fuse-pack-linears: %d group(s) of sibling linears packed into one", count)
        return ir.passes.PassResult(model, modified=count > 0)

    def _pack(self, graph: ir.Graph, members: list[_Member]) -> None:
        first = members[0].node
        base = first.name or "linear"
        sizes = [m.n for m in members]
        n = sum(sizes)
        inputs = list(first.inputs)
        for slot, (_rows, dtype) in members[0].pieces.items():
            if members[0].native:
                arr = np.concatenate([m.pieces[slot][0] for m in members], axis=-1)
            else:
                cat = np.concatenate([m.pieces[slot][0] for m in members], axis=0)  # N-major
                ref = (members[0].dq.inputs[slot] if members[0].dq is not None else first.inputs[slot]).const_value  # type: ignore[union-attr]
                arr = _restore(cat, tuple(ref.shape), slot, members[0], n)  # type: ignore[union-attr]
            value = add_initializer(graph, f"{base}_packed_{slot}", ir.Tensor(arr, dtype=dtype))
            if members[0].dq is not None:
                members[0].dq.replace_input_with(slot, value)  # rebuilt below as a new DQ
            else:
                inputs[slot] = value
        nodes: list[ir.Node] = []
        if members[0].dq is not None:
            old = members[0].dq
            dq = new_node(graph, "DequantizeLinear", list(old.inputs), f"{base}_packed_DequantizeLinear",
                          attributes={k: a.value for k, a in old.attributes.items()})
            meta = old.meta.get(QWEIGHT_KEY)
            if isinstance(meta, WeightDQ):
                dq.meta[QWEIGHT_KEY] = WeightDQ(meta.spec, meta.group_size, meta.k, n)
            inputs[1] = dq.outputs[0]
            nodes.append(dq)
        attrs = {k: a.value for k, a in first.attributes.items()}
        if "N" in attrs:
            attrs["N"] = n
        packed = new_node(graph, first.op_type, inputs, f"{base}_packed", attributes=attrs, domain=first.domain)
        packed.outputs[0].type = first.outputs[0].type
        packed.meta.update({k: v for k, v in first.meta.items() if k != "qc.linear"})
        packed.metadata_props.update({k: v for k, v in first.metadata_props.items() if k not in ("qc.layer", "qc.role")})
        info = _packed_role(members)
        if info is not None:
            set_linear_info(packed, info)
        nodes.append(packed)
        y = packed.outputs[0]
        # a bias Add after every member (q/k/v biases) travels along: one Add on the packed output
        biases = [_following_bias(m.node, m.n) for m in members]
        if all(b is not None for b in biases) and len({b[0].dtype for b in biases}) == 1:  # type: ignore[index]
            bias = add_initializer(graph, f"{base}_packed_bias", np.concatenate([b[0] for b in biases]))  # type: ignore[index]
            add = new_node(graph, "Add", [y, bias], f"{base}_packed_bias_Add")
            add.outputs[0].type = y.type
            nodes.append(add)
            y = add.outputs[0]
            outs = [b[1].outputs[0] for b in biases]  # type: ignore[index]
        else:
            outs = [m.node.outputs[0] for m in members]
        split_sizes = add_initializer(graph, f"{base}_packed_split", np.array(sizes, np.int64))
        split = new_node(graph, "Split", [y, split_sizes], f"{base}_packed_Split",
                         attributes={"axis": -1}, num_outputs=len(members))
        nodes.append(split)
        graph.insert_before(first, nodes)
        for old, out in zip(outs, split.outputs):
            replace_value(graph, old, out)


def _restore(rows: np.ndarray, shape: tuple[int, ...], slot: int, m: _Member, n: int) -> np.ndarray:
    """N-major rows back into the layout of input ``slot`` with N columns in total."""
    node = m.node
    if m.dq is not None:  # q/s/z of a DequantizeLinear: N is the last axis (or the only one)
        if slot == 0 or len(shape) == 2:
            return np.ascontiguousarray(rows.T)
        return rows.reshape(-1)
    if node.op_type == "MatMul":
        return np.ascontiguousarray(rows.T)
    if node.op_type == "MatMulNBits":
        return rows.reshape((n, *shape[1:])) if len(shape) > 1 else rows.reshape(-1)
    if slot == 1:  # integer GEMM weight [K, N]
        return np.ascontiguousarray(rows.T)
    return rows.reshape(-1)
