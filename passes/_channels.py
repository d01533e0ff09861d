"""Per-input-channel rescaling of linear groups, shared by smooth-scale and split-outliers.

Linears that read one activation ``X`` form a *group* (q/k/v, gate/up, o, down).  For a
diagonal ``D = diag(d)`` on X's channels, ``X·W = (X·D)·(D⁻¹·W)``: the factor ``D`` is
applied *upstream* of X, where it costs nothing, and ``D⁻¹`` folds into W's rows.

Where ``D`` goes (:func:`find_upstream`, first that applies):

* **norm** — ``X = γ ⊙ x̂`` (RMSNorm, canonicalize's ``RMSNormMatch``): ``γ ← γ ⊙ d``.
  Needs γ used by this norm only and X read by nothing but the group's linears
  (shape ops aside).
* **linear** — X is a per-channel linear image of a previous linear's output ``P = Z·W_p``
  (``X_c = f(P_{m(c)})`` with ``f`` linear and channel-preserving), so
  ``W_p[:, m(c)] ← W_p[:, m(c)]·d_c`` (and its bias): ``d`` must be constant on each
  tie set ``{c : m(c) = j}``.

  - v → o: ``X_o[t, h·hd + e] = Σ_t' P_h[t, t'] V[t', g(h)·hd + e]`` with ``g(h) = h // n_rep``
    (GQA: kv head ``g`` serves query heads ``g·n_rep … g·n_rep + n_rep − 1``), through
    Reshape/Transpose/KV-cache Concat/Unsqueeze/Expand/Reshape and the ``probs·V`` MatMul
    (which mixes rows, never channels), so ``m(c) = (c // hd // n_rep)·hd + c mod hd``.
  - up → down: ``X_d = act(Z·W_g) ⊙ (Z·W_u)`` is linear in each column of ``Z·W_u``: ``m(c) = c``.
* **mul** — otherwise an explicit ``Mul(X, d)`` is inserted before the group (logged).

Folding into v_proj rescales the V half of the KV cache (``present.*.value`` holds
``V·D``): the graph stays self-consistent (the cache it reads is the cache it wrote),
and the logits are unchanged.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from qcompiler.models.llama import FUSED_ATTENTION, SHAPE_OPS, RMSNormMatch, int_value, is_pv_matmul

from qcompiler.irutil import add_initializer, const_array, is_linear, linear_weight
from qcompiler.spec import DECODER_ROLES, Role, linear_info

log = logging.getLogger(__name__)

_GROUP_NAMES = {
    frozenset({Role.Q, Role.K, Role.V}): "qkv",
    frozenset({Role.GATE, Role.UP}): "gate_up",
    frozenset({Role.O}): "o_proj",
    frozenset({Role.DOWN}): "down_proj",
}
_PASS_THROUGH = frozenset({"Reshape", "Transpose", "Unsqueeze", "Expand", "Cast", "Identity", "Squeeze"})


@dataclass
class LinearGroup:
    """Decoder linears reading the same activation ``x``."""

    x: ir.Value
    linears: list[ir.Node]
    layer: int
    roles: tuple[Role, ...]

    @property
    def key(self) -> str:
        name = _GROUP_NAMES.get(frozenset(self.roles), "+".join(r.value for r in self.roles))
        return f"layers.{self.layer}.{name}"

    @property
    def channels(self) -> int:
        return int(self.weight(self.linears[0]).shape[0])

    @staticmethod
    def weight(node: ir.Node) -> np.ndarray:
        w, _ = linear_weight(node)  # type: ignore[misc]
        return w.const_value.numpy()  # type: ignore[union-attr]

    def weights(self) -> list[np.ndarray]:
        return [self.weight(n) for n in self.linears]


@dataclass
class Upstream:
    """Where a channel scaling of a group's input is applied (see module docstring)."""

    kind: str  # "norm" | "linear" | "mul"
    reason: str = ""
    norm: RMSNormMatch | None = None
    prev: ir.Node | None = None  # the previous linear (kind == "linear")
    prev_bias: ir.Value | None = None  # a constant bias added to its output
    colmap: np.ndarray | None = None  # input channel c of the group ← column colmap[c] of prev
    ties: dict[int, list[int]] = field(default_factory=dict)

    @property
    def where(self) -> str:
        if self.kind == "linear" and self.prev is not None:
            info = linear_info(self.prev)
            return info.role.value if info is not None else "linear"
        return self.kind


def linear_groups(model: ir.Model, roles: tuple[Role, ...] = DECODER_ROLES) -> list[LinearGroup]:
    """Groups of annotated decoder linears with a float (untransposed) weight, by shared input, in graph order."""
    wanted = set(roles)
    by_input: dict[int, LinearGroup] = {}
    order: list[int] = []
    for node in model.graph:
        info = linear_info(node)
        if info is None or info.role not in wanted or node.op_type != "MatMul" or node.inputs[0] is None:
            continue
        found = linear_weight(node)
        if found is None or found[1] or not found[0].const_value.dtype.is_floating_point():  # type: ignore[union-attr]
            continue
        x = node.inputs[0]
        g = by_input.get(id(x))
        if g is None:
            g = by_input[id(x)] = LinearGroup(x, [], info.layer, ())
            order.append(id(x))
        g.linears.append(node)
        g.roles = (*g.roles, info.role)
    return [by_input[i] for i in order]


def data_consumers(value: ir.Value) -> list[ir.Node]:
    """Consumers that read ``value``'s data (not only its shape)."""
    return [u for u in value.consumers() if u.op_type not in SHAPE_OPS]


def channel_absmax(w: np.ndarray) -> np.ndarray:
    """``max_n |W[k, n]|`` per input channel (row) of ``W[K, N]``."""
    return np.abs(w).max(axis=1)


# ----------------------------------------------------------------------------- finding the upstream


def find_upstream(group: LinearGroup, norm: RMSNormMatch | None) -> Upstream:
    """Where a scaling of ``group.x``'s channels can be folded (``norm``: canonicalize's match, if any)."""
    members = {id(n) for n in group.linears}
    readers = data_consumers(group.x)
    others = [u for u in readers if id(u) not in members]
    if group.x.is_graph_output():
        return Upstream("mul", "the input is also a graph output")
    if norm is not None and norm.output is group.x:
        if norm.gamma is None or norm.gamma.const_value is None:
            return Upstream("mul", "the norm has no constant weight")
        if len(norm.gamma.uses()) != 1 or norm.gamma.is_graph_input() or norm.gamma.is_graph_output():
            return Upstream("mul", f"the norm weight '{norm.gamma.name}' is shared by {len(norm.gamma.uses())} consumers")
        if others:
            return Upstream("mul", f"the norm output also feeds {', '.join(sorted({u.op_type for u in others}))}")
        return Upstream("norm", norm=norm)
    if others:
        return Upstream("mul", f"the input also feeds {', '.join(sorted({u.op_type for u in others}))}")
    roles = set(group.roles)
    if roles == {Role.O}:
        return _v_to_o(group)
    if roles == {Role.DOWN}:
        return _up_to_down(group)
    return Upstream("mul", "no norm or previous linear to fold into")


def _skip_bias(value: ir.Value) -> tuple[ir.Value, ir.Value | None, ir.Node | None]:
    """If ``value = Add(y, b)`` with a constant ``b``, return ``(y, b, add)``; else ``(value, None, None)``."""
    node = value.producer()
    if node is not None and node.op_type == "Add" and node.domain == "":
        for i in (0, 1):
            b, y = node.inputs[1 - i], node.inputs[i]
            prod = y.producer() if y is not None else None
            if b is not None and b.const_value is not None and prod is not None and is_linear(prod):
                return y, b, node  # type: ignore[return-value]
    return value, None, None


def _only_feeds(value: ir.Value, node: ir.Node) -> bool:
    """``node`` is the only data consumer of ``value`` (graph outputs such as the KV cache allowed)."""
    readers = data_consumers(value)
    return len(readers) == 1 and readers[0] is node


def _prev_linear(value: ir.Value, role: Role) -> tuple[ir.Node, ir.Value | None] | None:
    y, bias, add = _skip_bias(value)
    prev = y.producer()
    info = linear_info(prev) if prev is not None else None
    if prev is None or info is None or info.role != role or prev.op_type != "MatMul":
        return None
    found = linear_weight(prev)
    if found is None or found[1]:
        return None
    if add is not None and not _only_feeds(y, add):
        return None
    if bias is not None and (len(bias.uses()) != 1 or bias.const_value.size != found[0].shape[1]):  # type: ignore[union-attr]
        return None  # a shared or broadcast bias cannot take per-column factors
    if len(found[0].uses()) != 1:
        return None
    return prev, bias


def _up_to_down(group: LinearGroup) -> Upstream:
    prod = group.x.producer()
    if prod is None or prod.op_type != "Mul" or len(prod.inputs) != 2:
        return Upstream("mul", "the down_proj input is not a gate ⊙ up product")
    for i in (0, 1):
        src = prod.inputs[i]
        if src is None:
            continue
        found = _prev_linear(src, Role.UP)
        if found is None:
            continue
        up, bias = found
        out = bias.uses()[0].node.outputs[0] if bias is not None else up.outputs[0]
        if not _only_feeds(out, prod) or prod.inputs[1 - i] is src:
            continue
        k = group.channels
        return Upstream("linear", prev=up, prev_bias=bias, colmap=np.arange(k))
    return Upstream("mul", "the down_proj input is not act(gate) ⊙ up with up_proj feeding only the product")


def _reshape_last_dim(node: ir.Node) -> int | None:
    if node.op_type != "Reshape" or len(node.inputs) < 2:
        return None
    shape = int_value(node.inputs[1])
    if shape is not None and shape and shape[-1] > 0:
        return shape[-1]
    cat = node.inputs[1].producer() if node.inputs[1] is not None else None
    if cat is not None and cat.op_type == "Concat" and cat.inputs:
        last = const_array(cat.inputs[-1])
        if last is not None and last.size == 1 and int(last.reshape(())) > 0:
            return int(last.reshape(()))
    return None


def _v_to_o(group: LinearGroup) -> Upstream:
    """Walk back from o_proj's input to v_proj through channel-preserving ops (module docstring)."""
    value = group.x
    head_dim: int | None = None
    num_heads: int | None = None
    nxt: ir.Node = group.linears[0]
    for _ in range(32):
        if not _only_feeds(value, nxt):
            return Upstream("mul", f"an attention value between v_proj and o_proj also feeds another op ({value.name})")
        node = value.producer()
        if node is None:
            break
        found = _prev_linear(value, Role.V)
        if found is not None:
            v, bias = found
            if head_dim is None and num_heads is None:
                return Upstream("mul", "head size between v_proj and o_proj not found")
            k_o = group.channels
            n_v = int(LinearGroup.weight(v).shape[1])
            hd = head_dim if head_dim is not None else k_o // int(num_heads)  # type: ignore[arg-type]
            if hd <= 0 or k_o % hd or n_v % hd or (k_o // hd) % (n_v // hd):
                return Upstream("mul", f"inconsistent head layout (o in {k_o}, v out {n_v}, head size {hd})")
            n_rep = (k_o // hd) // (n_v // hd)
            c = np.arange(k_o)
            colmap = (c // hd // n_rep) * hd + c % hd
            ties: dict[int, list[int]] = defaultdict(list)
            for ch, col in enumerate(colmap.tolist()):
                ties[col].append(ch)
            return Upstream("linear", prev=v, prev_bias=bias, colmap=colmap, ties=dict(ties))
        op = node.op_type
        if node.domain not in ("", "ai.onnx") and op not in FUSED_ATTENTION:
            break
        if op in FUSED_ATTENTION:
            heads = node.attributes.get_int("num_heads", 0)
            if not heads or len(node.inputs) < 3 or node.inputs[2] is None:
                break
            num_heads = heads
            nxt, value = node, node.inputs[2]
            continue
        if op == "MatMul":
            if not is_pv_matmul(node) or value is not node.outputs[0]:
                break
            nxt, value = node, node.inputs[1]  # probs · V mixes rows, never channels
            continue
        if op == "Transpose" and list(node.attributes.get_ints("perm", [])) not in ([0, 2, 1, 3],):
            break
        if op == "Unsqueeze":
            axes = int_value(node.inputs[1]) if len(node.inputs) > 1 else list(node.attributes.get_ints("axes", []))
            if axes != [2]:  # repeat-kv: a new axis after the kv-head axis of [B, kv, S, hd]
                break
        if op == "Concat":  # KV cache: past (a graph input) ++ new, along the sequence axis
            rest = [i for i in node.inputs if i is not None and not i.is_graph_input()]
            if len(rest) != 1 or node.attributes.get_int("axis", 0) not in (-2, 2):
                break
            nxt, value = node, rest[0]
            continue
        if op not in _PASS_THROUGH:
            break
        if op == "Reshape":
            last = _reshape_last_dim(node)
            if last is not None and last != group.channels:
                head_dim = last
        nxt, value = node, node.inputs[0]  # type: ignore[assignment]
    return Upstream("mul", "the path from v_proj to o_proj is not a per-channel linear map qcompiler knows")


# ----------------------------------------------------------------------------- applying


def tie(values: np.ndarray, up: Upstream, reduce: str = "max") -> np.ndarray:
    """Make per-channel ``values`` constant on each tie set of ``up`` (max or min over the set)."""
    if not up.ties:
        return values
    out = values.copy()
    fn = np.max if reduce == "max" else np.min
    for members in up.ties.values():
        out[members] = fn(values[members])
    return out


def set_weight(graph: ir.Graph, node: ir.Node, w: np.ndarray) -> None:
    """Give linear ``node`` the float weight ``w`` (in place when the initializer is its own)."""
    old, _ = linear_weight(node)  # type: ignore[misc]
    w = np.ascontiguousarray(w, dtype=old.const_value.numpy().dtype)  # type: ignore[union-attr]
    if len(old.uses()) == 1 and not old.is_graph_output():
        old.const_value = ir.tensor(w, name=old.name)
        old.shape = ir.Shape(w.shape)
        return
    new = add_initializer(graph, f"{old.name}_scaled", w)
    node.replace_input_with(1, new)


def _set_const(value: ir.Value, arr: np.ndarray) -> None:
    arr = np.ascontiguousarray(arr, dtype=value.const_value.numpy().dtype)  # type: ignore[union-attr]
    value.const_value = ir.tensor(arr, name=value.name)


def apply_input_scale(graph: ir.Graph, group: LinearGroup, up: Upstream, d: np.ndarray, tag: str) -> None:
    """Multiply ``group.x``'s channels by ``d`` upstream (the group's weights are not touched)."""
    d = np.asarray(d, np.float64)
    if up.kind == "norm":
        gamma = up.norm.gamma  # type: ignore[union-attr]
        g = gamma.const_value.numpy().astype(np.float64)  # type: ignore[union-attr]
        _set_const(gamma, g * d)  # type: ignore[arg-type]
        return
    if up.kind == "linear":
        cols = np.ones(LinearGroup.weight(up.prev).shape[1], np.float64)  # type: ignore[arg-type]
        cols[up.colmap] = d  # tied channels carry equal factors
        if up.ties and not all(np.all(d[m] == d[m[0]]) for m in up.ties.values()):
            raise ValueError("channel factors differ inside a tie set")
        set_weight(graph, up.prev, LinearGroup.weight(up.prev) * cols[None, :])  # type: ignore[arg-type]
        if up.prev_bias is not None:
            b = up.prev_bias.const_value.numpy().astype(np.float64)  # type: ignore[union-attr]
            _set_const(up.prev_bias, b * cols.reshape(b.shape))
        return
    dv = add_initializer(graph, f"{tag}_channel_scale", d.astype(np.float32))
    mul = ir.node("Mul", [group.x, dv], name=f"{tag}_channel_scale_Mul")
    mul.outputs[0].name = f"{tag}_scaled_input"
    mul.outputs[0].shape, mul.outputs[0].type = group.x.shape, group.x.type
    graph.insert_before(group.linears[0], mul)  # the group's linears are in graph order
    for n in group.linears:
        n.replace_input_with(0, mul.outputs[0])
    group.x = mul.outputs[0]
