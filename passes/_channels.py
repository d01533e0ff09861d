"""Per-input-channel rescaling of linear groups, shared by smooth-scale and split-outliers.

Linears that read one activation ``X`` form a *group* (q/k/v, gate/up, o, down).  For a
diagonal ``D = diag(d)`` on X's channels, ``X·W = (X·D)·(D⁻¹·W)``: the factor ``D`` is
applied *upstream* of X, where it costs nothing, and ``D⁻¹`` folds into W's rows.

Where ``D`` goes (:func:`find_upstream`, first that applies):

* **norm** — X is a per-channel affine image of something else, ``X = γ ⊙ z (+ β)`` with
  constant per-channel ``γ`` (and ``β``), through float Casts/Identities:

  - RMSNorm ``γ ⊙ x/rms(x)`` and any ``Mul(z, γ)`` (Cohere's hand-written LayerNorm):  ``γ ← γ ⊙ d``;
  - LayerNorm ``γ ⊙ x̂ + β`` (``LayerNormalization`` or ``Add(Mul(z, γ), β)``): ``γ ← γ ⊙ d``, ``β ← β ⊙ d``;
  - Gemma's ``(1 + w) ⊙ x̂`` when ``1 + w`` is still an ``Add`` in the graph: ``w ← (1 + w) ⊙ d − 1``
    (exporters usually fold ``1 + w`` into one constant, which is the RMSNorm case).

  Needs X read by nothing but the group's linears (shape ops aside); Casts between float
  types and Reshapes keeping the last axis (GPT-2's ``[B·T, K]`` view) are looked through.  A parallel block
  (one norm feeding attention and MLP: cohere, falcon, phi) is one group — its linears
  read the same X — so the scale is shared by all consumers of the norm.  A ``γ``/``β``
  shared with other nodes (an exporter deduplicates equal initializers, e.g. every
  freshly initialised norm's ones) gets a private rescaled copy.
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

from qcompiler.floattype import float_array, float_type, graph_float_type
from qcompiler.irutil import add_initializer, const_array, is_linear, linear_weight
from qcompiler.spec import DECODER_ROLES, Role, linear_info

log = logging.getLogger(__name__)

_ATTN_IN = frozenset({Role.Q, Role.K, Role.V, Role.QKV})
_MLP_IN = frozenset({Role.GATE, Role.UP, Role.GATE_UP})


def group_name(roles: tuple[Role, ...]) -> str:
    """``qkv``, ``gate_up`` (``up`` for a plain MLP), ``qkv+gate_up`` / ``qkv+up`` (a parallel
    block's shared norm), ``o_proj``, ``down_proj``; else the roles joined by ``+``."""
    r = set(roles)
    if r in ({Role.O}, {Role.DOWN}):
        return next(iter(r)).value
    parts = []
    if r & _ATTN_IN:
        parts.append("qkv")
    if r & _MLP_IN:
        parts.append("gate_up" if r & {Role.GATE, Role.GATE_UP} else "up")
    if not parts or r - _ATTN_IN - _MLP_IN:
        return "+".join(x.value for x in roles)
    return "+".join(parts)


def group_kinds(roles: tuple[Role, ...]) -> set[str]:
    """The smoothing group kinds (``qkv``, ``gate_up``, ``o_proj``, ``down_proj``) a group belongs to."""
    r = set(roles)
    kinds = {k for k, members in (("qkv", _ATTN_IN), ("gate_up", _MLP_IN)) if r & members}
    kinds |= {role.value for role in r & {Role.O, Role.DOWN}}
    return kinds
_PASS_THROUGH = frozenset({"Reshape", "Transpose", "Unsqueeze", "Expand", "Cast", "Identity", "Squeeze"})


@dataclass
class LinearGroup:
    """Decoder linears reading the same activation ``x``."""

    x: ir.Value
    linears: list[ir.Node]
    layer: int
    roles: tuple[Role, ...]
    expert: int | None = None

    @property
    def key(self) -> str:
        where = f"layers.{self.layer}." + (f"experts.{self.expert}." if self.expert is not None else "")
        return where + group_name(self.roles)

    @property
    def channels(self) -> int:
        return int(self.weight(self.linears[0]).shape[0])

    @staticmethod
    def weight(node: ir.Node) -> np.ndarray:
        w, _ = linear_weight(node)  # type: ignore[misc]
        return w.const_value.numpy()  # type: ignore[union-attr]

    def weights(self) -> list[np.ndarray]:
        return [self.weight(n) for n in self.linears]


@dataclass(frozen=True)
class AffineSite:
    """``X = γ ⊙ z (+ β)``: ``node`` reads ``γ`` at input ``scale_slot`` (and ``β`` at ``shift_slot``).

    ``one_plus``: ``γ = Add(1, w)`` and ``scale_slot`` indexes ``w`` in ``node`` (that Add).
    ``form`` names it for the report: ``rmsnorm`` | ``layernorm`` | ``(1 + w)`` | ``mul``.
    """

    node: ir.Node
    scale_slot: int
    shift_node: ir.Node | None = None
    shift_slot: int = -1
    one_plus: bool = False
    form: str = "mul"


@dataclass
class Upstream:
    """Where a channel scaling of a group's input is applied (see module docstring)."""

    kind: str  # "norm" | "linear" | "mul"
    reason: str = ""
    norm: AffineSite | None = None
    prev: ir.Node | None = None  # the previous linear (kind == "linear")
    prev_bias: ir.Node | None = None  # the Add of a constant bias to its output
    colmap: np.ndarray | None = None  # input channel c of the group ← column colmap[c] of prev
    ties: dict[int, list[int]] = field(default_factory=dict)

    @property
    def where(self) -> str:
        if self.kind == "linear" and self.prev is not None:
            info = linear_info(self.prev)
            return info.role.value if info is not None else "linear"
        return self.kind


#: decoder roles that can be rescaled per input channel: the separate ones and fused qkv / gate_up
GROUP_ROLES = (*DECODER_ROLES, Role.QKV, Role.GATE_UP)


def linear_groups(model: ir.Model, roles: tuple[Role, ...] = GROUP_ROLES) -> list[LinearGroup]:
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
            g = by_input[id(x)] = LinearGroup(x, [], info.layer, (), info.expert)
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


def find_upstream(group: LinearGroup, norm: RMSNormMatch | None = None) -> Upstream:
    """Where a scaling of ``group.x``'s channels can be folded (``norm``: canonicalize's RMSNorm
    match, if any, names the form in the report; the fold itself is found structurally)."""
    members = {id(n) for n in group.linears}
    readers = data_consumers(group.x)
    others = [u for u in readers if id(u) not in members]
    if group.x.is_graph_output():
        return Upstream("mul", "the input is also a graph output")
    if others:
        return Upstream("mul", f"the input also feeds {', '.join(sorted({u.op_type for u in others}))}")
    site = affine_site(group.x, group.channels)
    if site is not None:
        if norm is not None and norm.output is group.x and site.form == "mul":
            site = AffineSite(site.node, site.scale_slot, form="rmsnorm")
        return Upstream("norm", norm=site)
    roles = set(group.roles)
    if roles == {Role.O}:
        return _v_to_o(group)
    if roles == {Role.DOWN}:
        return _up_to_down(group)
    return Upstream("mul", "no norm or previous linear to fold into")


_NORM_OPS = {  # op → (γ slot, β slot or -1)
    "LayerNormalization": (1, 2),
    "SimplifiedLayerNormalization": (1, -1),
    "SkipLayerNormalization": (2, 3),
    "SkipSimplifiedLayerNormalization": (2, -1),
}


def _const(value: ir.Value | None) -> np.ndarray | None:
    """A constant's array, through ``Identity`` (deduplicated initializers); None if not constant."""
    while value is not None and value.const_value is None:
        node = value.producer()
        if node is None or node.op_type != "Identity":
            return None
        value = node.inputs[0]
    return None if value is None else value.const_value.numpy()  # type: ignore[union-attr]


def _channel_vector(value: ir.Value | None, k: int) -> bool:
    arr = _const(value)
    return arr is not None and arr.dtype.kind == "f" and arr.size == k and arr.shape[-1] == k


def affine_site(x: ir.Value, k: int) -> AffineSite | None:
    """``x = γ ⊙ z (+ β)`` with constant per-channel ``γ``/``β`` of size ``k`` (module docstring), else None."""
    v = x
    while (p := v.producer()) is not None and p.op_type in ("Cast", "Identity", "Reshape") and p.domain == "":
        if p.op_type == "Cast" and p.attributes.get_int("to", 0) not in _FLOAT_TYPES:
            return None
        if p.op_type == "Reshape" and not _keeps_last_dim(p, k):  # [B, T, K] → [B·T, K] keeps the channels
            return None
        if not _only_feeds(p.inputs[0], p):  # type: ignore[arg-type]
            return None
        v = p.inputs[0]  # type: ignore[assignment]
    p = v.producer()
    if p is None or v is not p.outputs[0]:
        return None
    if p.op_type in _NORM_OPS and p.domain in ("", "com.microsoft"):
        gi, bi = _NORM_OPS[p.op_type]
        axis = p.attributes.get_int("axis", -1)
        if axis != -1 or len(p.inputs) <= gi or not _channel_vector(p.inputs[gi], k):
            return None
        has_beta = 0 <= bi < len(p.inputs) and p.inputs[bi] is not None
        if has_beta and not _channel_vector(p.inputs[bi], k):
            return None
        form = "rmsnorm" if "Simplified" in p.op_type else "layernorm"
        return AffineSite(p, gi, p if has_beta else None, bi if has_beta else -1, form=form)
    shift_node, shift_slot = None, -1
    if p.op_type == "Add" and p.domain == "":
        for i in (0, 1):
            inner = p.inputs[1 - i]
            if _channel_vector(p.inputs[i], k) and inner is not None and inner.producer() is not None \
                    and inner.producer().op_type == "Mul" and _only_feeds(inner, p):
                shift_node, shift_slot, p = p, i, inner.producer()
                break
        else:
            return None
    if p.op_type != "Mul" or p.domain != "":
        return None
    for i in (0, 1):
        g = p.inputs[i]
        if _const(p.inputs[1 - i]) is not None:
            continue  # γ times a constant: not an activation
        if _channel_vector(g, k):
            return AffineSite(p, i, shift_node, shift_slot, form="layernorm" if shift_node else "mul")
        add = g.producer() if g is not None else None
        if add is not None and add.op_type == "Add" and _only_feeds(g, p):  # type: ignore[arg-type]
            for j in (0, 1):
                one = _const(add.inputs[1 - j])
                if one is not None and one.size == 1 and float(one.reshape(())) == 1.0 and _channel_vector(add.inputs[j], k):
                    if shift_node is not None:
                        return None
                    return AffineSite(add, j, one_plus=True, form="(1 + w)")
    return None


_FLOAT_TYPES = frozenset({1, 10, 11, 16})  # FLOAT, FLOAT16, DOUBLE, BFLOAT16


def _skip_bias(value: ir.Value) -> tuple[ir.Value, ir.Value | None, ir.Node | None]:
    """If ``value = Add(y, b)`` with a constant ``b``, return ``(y, b, add)``; else ``(value, None, None)``."""
    node = value.producer()
    if node is not None and node.op_type == "Add" and node.domain == "":
        for i in (0, 1):
            b, y = node.inputs[1 - i], node.inputs[i]
            prod = y.producer() if y is not None else None
            if b is not None and _const(b) is not None and prod is not None and is_linear(prod):
                return y, b, node  # type: ignore[return-value]
    return value, None, None


def _only_feeds(value: ir.Value, node: ir.Node) -> bool:
    """``node`` is the only data consumer of ``value`` (graph outputs such as the KV cache allowed)."""
    readers = data_consumers(value)
    return len(readers) == 1 and readers[0] is node


def _prev_linear(value: ir.Value, role: Role) -> tuple[ir.Node, ir.Node | None] | None:
    """The ``role`` linear producing ``value`` (through a constant bias ``Add``, returned too)."""
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
    if bias is not None and _const(bias).size != found[0].shape[1]:  # type: ignore[union-attr]
        return None  # a broadcast bias cannot take per-column factors (a shared one gets a private copy)
    if len(found[0].uses()) != 1:
        return None
    return prev, add


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
        up, add = found
        out = add.outputs[0] if add is not None else up.outputs[0]
        if not _only_feeds(out, prod) or prod.inputs[1 - i] is src:
            continue
        k = group.channels
        return Upstream("linear", prev=up, prev_bias=add, colmap=np.arange(k))
    return Upstream("mul", "the down_proj input is not act(gate) ⊙ up with up_proj feeding only the product")


def _keeps_last_dim(reshape: ir.Node, k: int) -> bool:
    """``reshape`` maps ``[..., k]`` to ``[..., k]`` (from its shape input, else from the values' static shapes)."""
    if _reshape_last_dim(reshape) == k:
        return True
    dims = [v.shape[-1] if v is not None and v.shape is not None and v.shape.rank() else None
            for v in (reshape.inputs[0], reshape.outputs[0])]
    return all(isinstance(d, int) and d == k for d in dims)


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
            k_o = group.channels
            n_v = int(LinearGroup.weight(v).shape[1])
            if head_dim is None and num_heads is None:
                if n_v != k_o:
                    return Upstream("mul", "head size between v_proj and o_proj not found")
                head_dim = k_o  # as many kv heads as heads (one head, say): m(c) = c whatever the head size
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


def _set_private(graph: ir.Graph, node: ir.Node, slot: int, arr: np.ndarray, tag: str) -> None:
    """Give ``node``'s constant input ``slot`` the values ``arr``: in place when the initializer is
    read by this node only, else as a new initializer of its own (the others keep the old values)."""
    value = node.inputs[slot]
    old = _const(value)
    arr = np.ascontiguousarray(np.reshape(arr, old.shape), dtype=old.dtype)  # type: ignore[union-attr]
    if value.const_value is not None and len(value.uses()) == 1 and not value.is_graph_output():  # type: ignore[union-attr]
        value.const_value = ir.tensor(arr, name=value.name)  # type: ignore[union-attr]
        return
    node.replace_input_with(slot, add_initializer(graph, f"{tag}_{value.name}", arr))  # type: ignore[union-attr]


def scale_affine(graph: ir.Graph, site: AffineSite, d: np.ndarray, tag: str) -> None:
    """``X = γ ⊙ z (+ β)`` → ``X ⊙ d``: ``γ ← γ ⊙ d`` (``w ← (1 + w) ⊙ d − 1``), ``β ← β ⊙ d``."""
    d = np.asarray(d, np.float64)
    scale = _const(site.node.inputs[site.scale_slot]).astype(np.float64)  # type: ignore[union-attr]
    _set_private(graph, site.node, site.scale_slot, (1.0 + scale) * d - 1.0 if site.one_plus else scale * d, tag)
    if site.shift_node is not None:
        shift = _const(site.shift_node.inputs[site.shift_slot]).astype(np.float64)  # type: ignore[union-attr]
        _set_private(graph, site.shift_node, site.shift_slot, shift * d, tag)


def apply_input_scale(graph: ir.Graph, group: LinearGroup, up: Upstream, d: np.ndarray, tag: str) -> None:
    """Multiply ``group.x``'s channels by ``d`` upstream (the group's weights are not touched)."""
    d = np.asarray(d, np.float64)
    if up.kind == "norm":
        scale_affine(graph, up.norm, d, tag)  # type: ignore[arg-type]
        return
    if up.kind == "linear":
        cols = np.ones(LinearGroup.weight(up.prev).shape[1], np.float64)  # type: ignore[arg-type]
        cols[up.colmap] = d  # tied channels carry equal factors
        if up.ties and not all(np.all(d[m] == d[m[0]]) for m in up.ties.values()):
            raise ValueError("channel factors differ inside a tie set")
        set_weight(graph, up.prev, LinearGroup.weight(up.prev) * cols[None, :])  # type: ignore[arg-type]
        if up.prev_bias is not None:
            add = up.prev_bias
            slot = next(i for i in (0, 1) if add.inputs[i] is not None and _const(add.inputs[i]) is not None)
            b = _const(add.inputs[slot]).astype(np.float64)  # type: ignore[union-attr]
            _set_private(graph, add, slot, b * cols.reshape(b.shape), f"{tag}_bias")
        return
    dv = add_initializer(graph, f"{tag}_channel_scale", float_array(d, float_type(group.x, default=graph_float_type(graph))))
    mul = ir.node("Mul", [group.x, dv], name=f"{tag}_channel_scale_Mul")
    mul.outputs[0].name = f"{tag}_scaled_input"
    mul.outputs[0].shape, mul.outputs[0].type = group.x.shape, group.x.type
    graph.insert_before(group.linears[0], mul)  # the group's linears are in graph order
    for n in group.linears:
        n.replace_input_with(0, mul.outputs[0])
    group.x = mul.outputs[0]
