"""Structural match of one decoder attention block, as exported for Llama-family models.

From the q/k/v linears' outputs ``q[B, S, N·H]``, ``k, v[B, S, KV·H]`` to the input of
o_proj ``o[B, S, N·H]``::

    q₄ = rot(Transpose₀₂₁₃(Reshape(q, [B, S, N, H])))          (rot: fused RotaryEmbedding, optional)
    k₄ = Concat(past_k, rot(Transpose₀₂₁₃(Reshape(k, [B, S, KV, H]))), axis=2)   (no Concat without cache)
    v₄ = Concat(past_v, Transpose₀₂₁₃(Reshape(v, [B, S, KV, H])), axis=2)
    P  = softmax(α_q q₄ · (α_k repeat(k₄))ᵀ · α_s + bias)      [NaN → 0 optional]
    o  = Reshape(Transpose₀₂₁₃(P · repeat(v₄)), [B, S, N·H])

Soft-capped scores (Gemma 2's ``attn_logit_softcapping``), before the mask::

    P  = softmax(c · tanh(α_t · α_q q₄ · (α_k repeat(k₄))ᵀ) + bias)

in whatever order the scalars are written (eager attention: ``Mul(Tanh(Div(Mul(q·kᵀ, α), c)), c)``)
is GroupQueryAttention's ``softcap·tanh(scale·q·kᵀ/softcap)`` with ``softcap = c`` (the
product of the scalars outside the ``tanh``, > 0) and ``scale = c·α_t·α_q·α_k`` (those inside,
times ``c``): any ``c`` outside and ``α`` inside are this form, equal or not.  ONNX Runtime
1.32's CPU kernel caps before it adds ``attention_bias``, as the graph does.  A ``tanh`` of
anything but scalars times ``q·kᵀ`` (an offset, the mask, a tensor factor inside) is no match.

q/k norms (Qwen3, OLMo2's per-projection norm is outside the block, Gemma3) — an RMSNorm
over ``H`` on ``q₄``/``k₄`` before or after the transpose, identity casts around it —
are part of the match (``q_norm``/``k_norm``): the fused form applies them to
``Reshape(q, [B, S, N, H])`` before the rotary.  ``repeat`` is repeat-kv (``Unsqueeze(·, 2) → Expand → Reshape``: kv head ``j`` serves
query heads ``j·R … j·R+R−1``, ``R = N/KV``), the identity when ``N = KV``.  The
scalars ``α`` multiply into one softmax scale.  Every shape fact (heads, head size,
that reshapes keep batch and sequence) is checked from ONNX shape inference; the
caller runs it first.  ``tags`` give, for the block's interior values, their shape
in the symbols B, S, T (= past + S), N, KV, H, R, so that a ``Shape`` of an interior
value can be rebuilt from the block's inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from qcompiler.models.llama import dims, int_value, same_dim

from qcompiler.irutil import const_array, scalar_const

MS = "com.microsoft"


@dataclass
class AttentionMatch:
    softmax: ir.Node
    output: ir.Value  # o_proj input [B, S, N·H]
    q: ir.Value
    k: ir.Value
    v: ir.Value
    heads: int
    kv_heads: int
    head_size: int
    scale: float
    bias: ir.Value | None  # additive mask, broadcast to [B, N, S, T]
    softcap: float = 0.0  # c of c·tanh(scale·q·kᵀ/c) before the mask; 0: none
    past_k: ir.Value | None = None
    past_v: ir.Value | None = None
    present_k: ir.Value | None = None
    present_v: ir.Value | None = None
    rotary_q: ir.Node | None = None  # fused 4-D RotaryEmbedding on q₄ / k₄
    rotary_k: ir.Node | None = None
    q_norm: ir.Node | None = None  # per-head RMSNorm over H (SimplifiedLayerNormalization), before rotary
    k_norm: ir.Node | None = None
    q_gamma: np.ndarray | None = None  # the norms' weights, with a trailing constant scale folded in
    k_gamma: np.ndarray | None = None
    # the 4-D heads ``[B, n, S, H]`` where their split from ``[B, S, n·H]`` is not the plain
    # Reshape → Transpose (fused linears, partial or unfused rotary, scaled projections): the
    # fused form reads them back through Transpose₀₂₁₃ → Reshape (``q``/``k``/``v`` then None)
    q4: ir.Value | None = None
    k4: ir.Value | None = None
    v4: ir.Value | None = None
    nodes: list[ir.Node] = field(default_factory=list)
    tags: dict[int, tuple[str, ...]] = field(default_factory=dict)


class _NoMatch(Exception):
    pass


def _need(cond: object, why: str) -> None:
    if not cond:
        raise _NoMatch(why)


def _prod(v: ir.Value | None, *ops: str, domain: str = "") -> ir.Node:
    node = v.producer() if v is not None else None
    _need(node is not None and node.op_type in ops and node.domain == domain, f"expected {'/'.join(ops)}")
    return node  # type: ignore[return-value]


def _only_user(v: ir.Value, op: str) -> ir.Node:
    """The one reader of ``v`` besides ``Shape`` nodes (those are rebuilt from the block's tags)."""
    users = [u.node for u in v.uses() if not (u.node.op_type == "Shape" and u.node.domain == "")]
    _need(len(users) == 1 and users[0].op_type == op and users[0].domain == "", f"expected one {op} user")
    return users[0]


def _perm(node: ir.Node) -> list[int]:
    return list(node.attributes.get_ints("perm", []))


_FLOAT_TYPES = (1, 10, 11, 16)


def scalar_value(v: ir.Value | None, depth: int = 0) -> float | None:
    """A scalar the graph computes from constants and static dims, e.g. GPT-2's
    ``√(1/√Cast(Shape(q)[-1]))`` (the scale torch's SDPA decomposition splits over q and k)."""
    c = scalar_const(v)
    if c is not None or v is None or depth > 8:
        return c
    node = v.producer()
    if node is None or node.domain != "" or len(node.outputs) != 1:
        return None
    op, ins = node.op_type, node.inputs
    if op == "Cast" and node.attributes.get_int("to", 0) in _FLOAT_TYPES:
        inner = scalar_value(ins[0], depth + 1)
        if inner is None:
            ints = int_value(ins[0])
            inner = float(ints[0]) if ints is not None and len(ints) == 1 else None
        return inner
    if op in ("Identity", "Squeeze", "Unsqueeze", "Reshape"):
        return scalar_value(ins[0], depth + 1)
    if op in ("Sqrt", "Reciprocal", "Neg"):
        x = scalar_value(ins[0], depth + 1)
        if x is None or (op == "Sqrt" and x < 0) or (op == "Reciprocal" and x == 0):
            return None
        return {"Sqrt": lambda: float(np.sqrt(x)), "Reciprocal": lambda: 1.0 / x, "Neg": lambda: -x}[op]()
    if op in ("Mul", "Div", "Add", "Sub") and len(ins) == 2:
        a, b = scalar_value(ins[0], depth + 1), scalar_value(ins[1], depth + 1)
        if a is None or b is None or (op == "Div" and b == 0):
            return None
        return {"Mul": a * b, "Div": a / b if b else 0.0, "Add": a + b, "Sub": a - b}[op]
    return None


def _peel_scale(v: ir.Value, m: AttentionMatch) -> tuple[ir.Value, float]:
    """Strip ``Mul/Div`` by scalars (constants or static-dim arithmetic): return (inner value, product of factors)."""
    factor = 1.0
    for _ in range(4):
        node = v.producer()
        if node is None or node.domain != "" or node.op_type not in ("Mul", "Div"):
            break
        c1 = scalar_value(node.inputs[1])
        c0 = scalar_value(node.inputs[0]) if node.op_type == "Mul" else None
        if c1 is not None and c1 != 0:
            factor *= c1 if node.op_type == "Mul" else 1.0 / c1
            v = node.inputs[0]
        elif c0 is not None:
            factor *= c0
            v = node.inputs[1]
        else:
            break
        m.nodes.append(node)
    return v, factor


def _peel_scores(v: ir.Value, m: AttentionMatch) -> tuple[ir.Value, float]:
    """Strip the scalars and an optional soft-cap ``c·tanh(α·x)`` from the scores: (x, scale);
    a soft-cap sets ``m.softcap = c`` and its scale is ``c·α`` (GQA's ``softcap``/``scale``)."""
    v, outer = _peel_scale(v, m)
    tanh = v.producer()
    if tanh is None or tanh.op_type != "Tanh" or tanh.domain != "":
        return v, outer
    _need(outer > 0, "soft-cap factor outside tanh is positive")
    m.nodes.append(tanh)
    m.tags[id(v)] = ("B", "N", "S", "T")
    inner, alpha = _peel_scale(tanh.inputs[0], m)  # type: ignore[arg-type]
    p = inner.producer()
    _need(p is not None and p.op_type == "MatMul" and p.domain == "", "soft-cap: tanh of scalars times q·kᵀ")
    m.softcap = outer
    return inner, outer * alpha


def _last_dim(v: ir.Value) -> int | None:
    d = dims(v)
    if d and isinstance(d[-1], int):
        return d[-1]
    node = v.producer()
    if node is not None and node.op_type == "MatMulNBits" and node.domain == MS:
        return node.attributes.get_int("N", 0) or None
    return None


def _identity_cast(node: ir.Node | None) -> bool:
    if node is None or node.domain != "" or node.op_type not in ("Cast", "Identity"):
        return False
    src = node.inputs[0].dtype if node.inputs[0] is not None else None
    return node.op_type == "Identity" or (src is not None and node.attributes.get_int("to", -1) == src.value)


def _through_casts(v: ir.Value, m: AttentionMatch, tag: tuple[str, ...]) -> ir.Value:
    """Step back over identity ``Cast``/``Identity`` nodes (torch's float32 round trips)."""
    while _identity_cast(v.producer()):
        node = v.producer()
        m.nodes.append(node)  # type: ignore[arg-type]
        m.tags[id(v)] = tag
        v = node.inputs[0]  # type: ignore[union-attr,assignment]
    return v


def _const_vector(v: ir.Value | None) -> np.ndarray | None:
    """A constant 1-D tensor, also behind an ``Identity`` (tied weights shared by the exporter)."""
    node = v.producer() if v is not None else None
    if node is not None and node.op_type == "Identity" and node.domain == "":
        v = node.inputs[0]
    arr = const_array(v) if v is not None else None
    return arr if arr is not None and arr.ndim == 1 else None


def _head_norm(v: ir.Value, m: AttentionMatch,
               tag: tuple[str, ...]) -> tuple[ir.Value, ir.Node | None, np.ndarray | None]:
    """``v == c ⊙ RMSNorm_γ(u)`` over the head axis (a q/k norm; ``c`` optional, casts looked
    through): (u, norm, c·γ), else (v, None, None).  ``c`` is how a norm whose weight the
    exporter shares through an ``Identity`` (Qwen3), or Gemma's ``1 + w``, reaches the graph."""
    u = _through_casts(v, m, tag)
    node = u.producer()
    scale, mul, other = None, None, None
    if node is not None and node.op_type == "Mul" and node.domain == "":
        for i in (0, 1):
            c = _const_vector(node.inputs[i])
            inner = node.inputs[1 - i]
            if c is None or inner is None:
                continue
            p = inner.producer()
            while _identity_cast(p):
                inner = p.inputs[0]  # type: ignore[union-attr]
                p = inner.producer() if inner is not None else None
            if p is not None and p.op_type == "SimplifiedLayerNormalization" and p.domain == "":
                scale, mul, other = c, node, node.inputs[1 - i]
                break
    if mul is not None:
        m.nodes.append(mul)
        m.tags[id(u)] = tag
        u = _through_casts(other, m, tag)  # type: ignore[arg-type]
    node = u.producer()
    if node is None or node.op_type != "SimplifiedLayerNormalization" or node.domain != "":
        _need(mul is None, "q/k norm scale without its norm")
        return u, None, None
    _need(node.attributes.get_int("axis", -1) in (-1, 3), "q/k norm over the head axis")
    _need(not any(o.uses() for o in node.outputs[1:]), "q/k norm statistics unused")
    gamma = const_array(node.inputs[1])
    _need(gamma is not None and gamma.ndim == 1, "q/k norm weight constant")
    if scale is not None:
        _need(scale.shape == gamma.shape, "q/k norm scale per head channel")  # type: ignore[union-attr]
        gamma = (gamma.astype(np.float64) * scale).astype(gamma.dtype)  # type: ignore[union-attr]
    m.nodes.append(node)
    m.tags[id(u)] = tag
    return _through_casts(node.inputs[0], m, tag), node, gamma  # type: ignore[arg-type]


def _split_heads(v: ir.Value, m: AttentionMatch, tag: str) -> tuple[ir.Value, int, int, ir.Node | None]:
    """``v == Transpose₀₂₁₃(Reshape(x, [B, S, n, H]))``, a per-head norm before or after the
    transpose allowed: return (x, n, H, norm); the norm's weight goes to ``m.q_gamma/k_gamma``."""
    v, norm, gamma = _head_norm(v, m, ("B", tag, "S", "H"))
    tr = _prod(v, "Transpose")
    _need(_perm(tr) == [0, 2, 1, 3], "heads transpose perm")
    inner = tr.inputs[0]
    if norm is None:
        inner, norm, gamma = _head_norm(inner, m, ("B", "S", tag, "H"))  # type: ignore[arg-type]
    if norm is not None:  # v never has one (checked by the caller)
        if tag == "N":
            m.q_gamma = gamma
        else:
            m.k_gamma = gamma
    rs = _prod(inner, "Reshape")
    x = rs.inputs[0]
    od, xd = dims(rs.outputs[0]), dims(x)
    _need(od is not None and xd is not None and len(od) == 4 and len(xd) == 3, "heads reshape rank")
    _need(same_dim(od[0], xd[0]) and same_dim(od[1], xd[1]), "heads reshape keeps batch and sequence")  # type: ignore[index]
    width = _last_dim(x)
    head = od[3]  # type: ignore[index]
    _need(isinstance(head, int) and width is not None and width % head == 0, "head size")
    n = width // head  # type: ignore[operator]
    _need(od[2] in (None, n), "head count")  # type: ignore[index]
    m.nodes += [tr, rs]
    m.tags[id(rs.outputs[0])] = ("B", "S", tag, "H")
    m.tags[id(tr.outputs[0])] = ("B", tag, "S", "H")
    return x, n, head, norm  # type: ignore[return-value]


def _heads_input(v4: ir.Value, m: AttentionMatch, tag: str, rotary: bool = True
                 ) -> tuple[ir.Value | None, int, int, ir.Node | None, ir.Node | None, ir.Value | None]:
    """The heads ``v4[B, n, S, H]`` as (x[B, S, n·H], n, H, norm, rotary, None) when they are
    the plain split of a 3-D value (rotary and a q/k norm taken in), else (None, n, H, None,
    None, v4): the block then starts at ``v4`` itself (whatever computed it stays)."""
    mark = (len(m.nodes), dict(m.tags), m.q_gamma, m.k_gamma)
    try:
        vr, rot = _rotary(v4, m, tag) if rotary else (v4, None)
        x, n, h, norm = _split_heads(vr, m, tag)
        return x, n, h, norm, rot, None
    except _NoMatch as e:
        del m.nodes[mark[0]:]
        m.tags, m.q_gamma, m.k_gamma = mark[1], mark[2], mark[3]
        d = dims(v4)
        _need(d is None or len(d) == 4, f"{e}; the {tag} heads are not 4-D")
        n, h = (d[1], d[3]) if d is not None else (None, None)
        return None, n if isinstance(n, int) else 0, h if isinstance(h, int) else 0, None, None, v4


def _rotary(v: ir.Value, m: AttentionMatch, tag: str) -> tuple[ir.Value, ir.Node | None]:
    v = _through_casts(v, m, ("B", tag, "S", "H"))
    node = v.producer()
    if node is None or node.op_type != "RotaryEmbedding" or node.domain != MS:
        return v, None
    m.nodes.append(node)
    m.tags[id(v)] = ("B", tag, "S", "H")
    return node.inputs[0], node  # type: ignore[return-value]


def _cache_concat(v: ir.Value, m: AttentionMatch) -> tuple[ir.Value, ir.Value | None, ir.Value]:
    """``v == Concat(past, new, axis=2)`` with ``past`` a graph input: (new, past, v); else (v, None, v)."""
    node = v.producer()
    if node is None or node.op_type != "Concat" or node.domain != "":
        return v, None, v
    _need(len(node.inputs) == 2 and node.attributes.get_int("axis", 0) in (2, -2), "cache concat axis")
    past = node.inputs[0]
    _need(past is not None and past.is_graph_input(), "past is a graph input")
    m.nodes.append(node)
    m.tags[id(v)] = ("B", "KV", "T", "H")
    return node.inputs[1], past, v  # type: ignore[return-value]


def _repeat_kv(v: ir.Value, m: AttentionMatch, n: int) -> ir.Value:
    """Undo ``repeat_kv`` (to ``n`` heads) if present: return the ``[B, KV, T, H]`` source."""
    node = v.producer()
    if node is None or node.op_type != "Reshape":
        return v
    ex = _prod(node.inputs[0], "Expand")
    un = _prod(ex.inputs[0], "Unsqueeze")
    axes = int_value(un.inputs[1]) if len(un.inputs) > 1 else list(un.attributes.get_ints("axes", []))
    _need(axes == [2], "repeat-kv unsqueezes axis 2")
    src = un.inputs[0]
    od, sd, ed = dims(node.outputs[0]), dims(src), dims(ex.outputs[0])
    _need(od is not None and sd is not None and len(od) == 4 and len(sd) == 4, "repeat-kv ranks")
    target = int_value(node.inputs[1])
    if not n:  # the query heads are matched at their 4-D form and their count unknown so far
        n = od[1] if isinstance(od[1], int) else (target[1] if target is not None and len(target) == 4 else 0)
        m.heads = n
    _need(od[1] == n or (target is not None and len(target) == 4 and target[1] == n), "repeat-kv head count")  # type: ignore[index]
    kv = sd[1] if isinstance(sd[1], int) else None  # type: ignore[index]
    reps_ok = ed is not None and len(ed) == 5 and kv is not None and ed[2] == n // kv
    _need(reps_ok or same_dim(od[2], sd[2]), "repeat-kv repeats heads only")  # type: ignore[index]
    _need(same_dim(od[0], sd[0]) or (target is not None and target[0] == 0), "repeat-kv keeps batch")  # type: ignore[index]
    m.nodes += [node, ex, un]
    m.tags[id(node.outputs[0])] = ("B", "N", "T", "H")
    m.tags[id(un.outputs[0])] = ("B", "KV", "1", "T", "H")
    m.tags[id(ex.outputs[0])] = ("B", "KV", "R", "T", "H")
    return src  # type: ignore[return-value]


def _output_reshape(pv: ir.Node, m: AttentionMatch) -> ir.Value:
    first = pv.outputs[0]
    users = [u.node for u in first.uses() if u.node.op_type != "Shape"]
    if len(users) == 1 and users[0].op_type == "Reshape" and users[0].domain == "":  # Falcon: view(B, N, S, H)
        same, pd = dims(users[0].outputs[0]), dims(first)
        _need(same is not None and pd is not None and len(same) == len(pd) == 4
              and all(isinstance(same[i], int) and same[i] == pd[i] for i in (1, 3)), "heads view keeps [B, N, S, H]")
        m.nodes.append(users[0])
        m.tags[id(users[0].outputs[0])] = ("B", "N", "S", "H")
        first = users[0].outputs[0]
    tr = _only_user(first, "Transpose")
    _need(_perm(tr) == [0, 2, 1, 3], "output transpose perm")
    rs = _only_user(tr.outputs[0], "Reshape")
    od, qd = dims(rs.outputs[0]), dims(m.q) if m.q is not None else dims(m.q4)
    if m.q is None and qd is not None and len(qd) == 4:
        qd = [qd[0], qd[2]]  # [B, N, S, H] → B, S
    _need(od is not None and qd is not None and len(od) == 3, "output reshape rank")
    # heads matched at their 4-D form may carry no batch/sequence symbols (a reshape to [B, -1, n, H]):
    # then the reshape of [B, S, N, H] to a last axis of N·H (checked below) keeps them
    _need((same_dim(od[0], qd[0]) and same_dim(od[1], qd[1])) or (m.q is None and not all(qd)),  # type: ignore[index]
          "output reshape keeps batch and sequence")
    width = m.heads * m.head_size
    if od[2] != width:  # type: ignore[index]
        target = rs.inputs[1]
        prod = target.producer() if target is not None else None
        last = const_array(target)
        if last is None and prod is not None and prod.op_type == "Concat":
            tail = int_value(prod.inputs[-1])
            last = np.array(tail) if tail is not None else None
        _need(last is not None and int(np.asarray(last).reshape(-1)[-1]) in (-1, width), "output reshape width")
    m.nodes += [tr, rs]
    m.tags[id(pv.outputs[0])] = ("B", "N", "S", "H")
    m.tags[id(tr.outputs[0])] = ("B", "S", "N", "H")
    return rs.outputs[0]


def _resolve_layout(m: AttentionMatch, pv: ir.Node, hk: int, hv: int, kv_v: int) -> None:
    """Head count and size (0 = unknown) of sides matched at their 4-D heads, from the others,
    the cache inputs ``[B, KV, past, H]`` or the probabilities · V product ``[B, N, S, H]``."""
    past = dims(m.past_k) if m.past_k is not None else None
    out = dims(pv.outputs[0])
    sizes = [x for x in (m.head_size, hk, hv, past[3] if past else None, out[3] if out else None)
             if isinstance(x, int) and x > 0]
    kvs = [x for x in (m.kv_heads, kv_v, past[1] if past else None) if isinstance(x, int) and x > 0]
    heads = [x for x in (m.heads, out[1] if out else None) if isinstance(x, int) and x > 0]
    _need(sizes and len(set(sizes)) == 1, "head size known and the same for q, k and v")
    _need(kvs and len(set(kvs)) == 1, "kv head count known and the same for k and v")
    _need(heads and len(set(heads)) == 1, "query head count known")
    m.head_size, m.kv_heads, m.heads = sizes[0], kvs[0], heads[0]


def _match(softmax: ir.Node) -> AttentionMatch:
    _need(softmax.op_type == "Softmax" and softmax.domain == "", "softmax")
    _need(softmax.attributes.get_int("axis", -1) in (-1, 3), "softmax over keys")
    m = AttentionMatch(softmax, softmax.outputs[0], *(None,) * 3, 0, 0, 0, 1.0, None)  # type: ignore[arg-type]
    m.nodes.append(softmax)
    probs = softmax.outputs[0]
    m.tags[id(probs)] = ("B", "N", "S", "T")
    while len(probs.uses()) == 1 and _identity_cast(next(iter(probs.uses())).node):  # eager fp32: softmax(·, dtype)
        cast = next(iter(probs.uses())).node
        m.nodes.append(cast)
        probs = cast.outputs[0]
        m.tags[id(probs)] = ("B", "N", "S", "T")
    users = [u.node for u in probs.uses()]
    isnan = next((u for u in users if u.op_type == "IsNaN"), None)
    if isnan is not None:  # softmax of a fully masked row is NaN → 0
        where = _only_user(isnan.outputs[0], "Where")
        _need(where.inputs[2] is probs and scalar_const(where.inputs[1]) == 0.0, "NaN guard")
        _need(len(users) == 2 and where in users, "NaN guard users")
        m.nodes += [isnan, where]
        probs = where.outputs[0]
    pv = _only_user(probs, "MatMul")
    _need(pv.inputs[0] is probs, "probabilities · V")
    # scores = (scale·q·kᵀ) + bias
    scores = softmax.inputs[0]
    bias = None
    add = scores.producer() if scores is not None else None
    if add is not None and add.op_type == "Add" and add.domain == "":
        why = "scores + mask"
        for i in (0, 1):
            scratch = AttentionMatch(softmax, probs, *(None,) * 3, 0, 0, 0, 1.0, None)  # type: ignore[arg-type]
            try:
                inner, _ = _peel_scores(add.inputs[i], scratch)  # type: ignore[arg-type]
            except _NoMatch as e:  # a tanh that is no soft-cap: say so
                why = f"scores + mask: {e}"
                continue
            p = inner.producer()
            if p is not None and p.op_type == "MatMul" and p.domain == "":
                bias, scores = add.inputs[1 - i], add.inputs[i]
                m.nodes.append(add)
                break
        _need(bias is not None, why)
    scores, s_factor = _peel_scores(scores, m)  # type: ignore[arg-type]
    qk = _prod(scores, "MatMul")
    m.nodes.append(qk)
    m.tags[id(qk.outputs[0])] = ("B", "N", "S", "T")
    q4, q_factor = _peel_scale(qk.inputs[0], m)  # type: ignore[arg-type]
    kt, k_factor = _peel_scale(qk.inputs[1], m)  # type: ignore[arg-type]
    tr_k = _prod(kt, "Transpose")
    _need(_perm(tr_k) == [0, 1, 3, 2], "kᵀ perm")
    m.nodes.append(tr_k)
    m.tags[id(kt)] = ("B", "N", "H", "T")
    k_rep, k_factor2 = _peel_scale(tr_k.inputs[0], m)  # type: ignore[arg-type]
    m.scale = s_factor * q_factor * k_factor * k_factor2
    m.q, m.heads, m.head_size, m.q_norm, m.rotary_q, m.q4 = _heads_input(q4, m, "N")
    k_all = _repeat_kv(k_rep, m, m.heads)
    k_new, m.past_k, present_k = _cache_concat(k_all, m)
    m.k, m.kv_heads, hk, m.k_norm, m.rotary_k, m.k4 = _heads_input(k_new, m, "KV")
    v_all = _repeat_kv(pv.inputs[1], m, m.heads)  # type: ignore[arg-type]
    v_new, m.past_v, present_v = _cache_concat(v_all, m)
    m.v, kv_v, hv, v_norm, _, m.v4 = _heads_input(v_new, m, "KV", rotary=False)
    _need(v_norm is None, "no norm on v")
    _resolve_layout(m, pv, hk, hv, kv_v)
    hk = hv = m.head_size
    kv_v = m.kv_heads
    _need(hk == hv == m.head_size and kv_v == m.kv_heads and m.heads % m.kv_heads == 0, "head layout")
    _need((m.past_k is None) == (m.past_v is None), "both or neither of k/v cached")
    if m.past_k is not None:
        m.present_k, m.present_v = present_k, present_v
        for past in (m.past_k, m.past_v):
            pd = dims(past)
            _need(pd is not None and len(pd) == 4 and pd[1] in (None, m.kv_heads) and pd[3] in (None, m.head_size),
                  "past layout")
    m.nodes.append(pv)
    m.output = _output_reshape(pv, m)
    m.bias = bias
    return m


def match_attention(softmax: ir.Node) -> tuple[AttentionMatch | None, str]:
    """Match the attention block around ``softmax``: (match, "") or (None, why not)."""
    try:
        return _match(softmax), ""
    except _NoMatch as e:
        return None, str(e)
