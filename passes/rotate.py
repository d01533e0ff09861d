"""rotate: an orthogonal rotation of the residual stream folded into the weights (QuaRot-style).

For an orthogonal ``Q`` (``QᵀQ = I``, ``D × D``) write the residual stream as ``h' = h·Q``.
Everything that touches the stream is linear in it except the RMSNorms, and those commute
with ``Q`` once their weight ``γ`` is folded away::

    rms(h·Q) = ‖h·Q‖/√D = ‖h‖/√D = rms(h)        so   (h·Q)/rms(h·Q) = (h/rms(h))·Q

1. **Fold the norm weights** into the linears reading each norm (q/k/v, gate/up, lm_head):
   ``(γ ⊙ z)·W = z·(diag(γ)·W)``, then ``γ ← 1`` (Gemma's ``(1 + w)``: ``w ← 0``).
2. **Rotate**: the token embedding ``E ← E·Q`` (the stream starts as ``h_0·Q``), every reader
   ``W ← Qᵀ·W`` (``z·Q·Qᵀ·W = z·W``), every writer into the stream (o_proj, down_proj) ``W ← W·Q``
   and its bias ``b ← b·Q``, so that each residual ``Add`` adds rotated terms.  A tied lm_head
   (``MatMul(x, Transpose(E))``) keeps its tie by default: the stream is rotated by a constant
   ``D × D`` MatMul after the embedding ``Gather`` and rotated back (``·Qᵀ``) before the final
   norm, whose weight then stays in place (2·D² multiply-adds per token, 0.5% of SmolLM2's);
   ``untie=true`` gives lm_head its own ``Qᵀ·diag(γ)·Eᵀ`` instead (the table stored twice).
3. **Online Hadamard** (``online_down=true``): ``x_d·W_d = (x_d·H)·(Hᵀ·W_d)`` with an
   orthogonal ``H`` on down_proj's input, written as a constant ``MatMul`` before down_proj
   (marked ``qcompiler.rotation``: not a linear to quantize).  It spreads the massive
   activations of the MLP's product over all channels — for static int8 activations — at the
   cost of one ``F × F`` float GEMM per layer.
4. **Per-head transform on o_proj's input** (``v_o=true``, free): ``V·H`` on each kv head's
   columns of v_proj (and bias) and ``Hᵀ`` on each head's rows of o_proj; attention mixes
   tokens within a head, never channels, so the product is unchanged, and the outlier channels
   of the attention output are spread within each head.  The head size is read from the
   v→o channel map (``passes/_channels.py``); a model with as many kv heads as heads, where
   that map is the identity, is skipped (reported).

5. **Inside the blocks only** (``residual=false``): steps 3 and 4 do not touch the residual
   stream, so they hold for any norm (LayerNorm, post-norms, parallel blocks: nothing is checked
   but the down_proj / v→o roles); with smoothing on the other inputs this is the static recipe
   for the families where step 2 is refused (``w8a8-static-smooth``).

6. **Online transform on a norm's readers** (``online_in=gate_up`` and/or ``qkv``, for
   ``residual=false``): ``z·W = (z·H)·(Hᵀ·W)`` on the normalized input itself, a constant ``D × D``
   ``MatMul`` after the norm (``D²`` multiply-adds per token and layer: 12% of SmolLM2's MLP).  What
   the residual rotation does for these readers, where it is refused or unwanted: the norm output's
   outlier channels — those that move between text domains — are spread over all channels before a
   static per-tensor range is set.

``Q`` is a randomized Hadamard matrix, ``Q = diag(±1)·(H_{2^a} ⊗ R_m)/√(2^a)`` for
``D = 2^a·m``: Sylvester's Hadamard on the power-of-two factor and a seeded random orthogonal
``R_m`` (QR of a Gaussian) on the odd rest (``m = 9`` for SmolLM2's 576), random signs seeded
by ``seed``.  Every entry has magnitude about ``1/√D``: one outlier channel of ``h`` becomes a
spread of ``D`` channels of size ``|h_j|/√D``, which is what per-tensor activation ranges and
per-group weight grids need.  The model is unchanged in exact arithmetic; in float32 the
logits move by rounding only (≤ 1e-4 relative, tests).

Valid when (checked, else ``UnsupportedModelError`` naming the place): the stream starts at
a ``Gather`` of a constant embedding table (a scalar ``Mul`` after it — Gemma's √D — is
allowed); every data consumer of the stream is an RMSNorm (reduce over the last axis, no
mean subtraction) whose output feeds only linears, a residual ``Add`` of a writer linear's
output (through a constant bias and a scalar ``Mul``) or of a constant direction ``a ⊙ c`` (``c ← c·Q``), a float
``Cast`` or a scalar ``Mul``; the last stream
value feeds the final norm and lm_head.  Refused: LayerNorm (mean subtraction is not
rotation-invariant unless the stream is centred: gpt2, phi, falcon, gpt_neox, opt, …),
post-norms between a writer and the residual Add (Gemma 2/3, OLMo 2: the norm of a branch
is not a norm of the stream), parallel blocks sharing one norm are handled like any reader.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
from qcompiler.models.llama import SHAPE_OPS, RMSNormMatch, match_rmsnorm
from qcompiler.passes._channels import _const, _set_private, set_weight

from qcompiler.errors import UnsupportedModelError
from qcompiler.irutil import ROTATION_MARK, add_initializer, linear_weight, scalar_const
from qcompiler.pipeline import QCPass, register_pass
from qcompiler.spec import Role, linear_info

log = logging.getLogger(__name__)

_WRITERS = frozenset({Role.O, Role.DOWN})
_ONLINE_IN = {"qkv": frozenset({Role.Q, Role.K, Role.V, Role.QKV}),
              "gate_up": frozenset({Role.GATE, Role.UP, Role.GATE_UP})}
_FLOAT_TYPES = frozenset({1, 10, 11, 16})


@dataclass(frozen=True)
class RotateConfig:
    seed: int = 0
    online_down: bool = False  # an online orthogonal transform on down_proj's input
    v_o: bool = False  # a per-head orthogonal transform folded into v_proj's columns and o_proj's rows
    untie: bool = False  # a tied lm_head: untie it (E stored twice) instead of two online D×D transforms
    random: bool = True  # random signs (and the random odd factor); false: plain Sylvester × identity
    residual: bool = True  # rotate the residual stream; false: only the transforms inside a block (5.)
    online_in: str = ""  # ':'-separated norm-fed inputs (qkv, gate_up) given an online D×D transform (6.)

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative, got {self.seed}")
        unknown = set(self.online_groups()) - set(_ONLINE_IN)
        if unknown:
            raise ValueError(f"online_in: unknown input(s) {', '.join(sorted(unknown))}; choose from qkv, gate_up")
        if not self.residual and not (self.online_down or self.v_o or self.online_in):
            raise ValueError("residual=false leaves only online_down, online_in and v_o: enable at least one")

    def online_groups(self) -> tuple[str, ...]:
        return tuple(filter(None, self.online_in.split(":")))


def hadamard(n: int) -> np.ndarray:
    """Sylvester's Hadamard matrix of order ``n`` (a power of two), entries ±1."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester's Hadamard needs a power of two, got {n}")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def random_orthogonal(n: int, seed: int = 0, random: bool = True) -> np.ndarray:
    """``diag(±1)·(H_{2^a} ⊗ R_m)/√(2^a)``, ``n = 2^a·m`` with ``m`` odd (module docstring), float64."""
    a = n & -n  # largest power-of-two factor
    m = n // a
    rng = np.random.default_rng(seed)
    if m == 1:
        r = np.ones((1, 1))
    elif random:
        qm, rm = np.linalg.qr(rng.standard_normal((m, m)))
        r = qm * np.sign(np.diag(rm))[None, :]
    else:
        r = np.eye(m)
    q = np.kron(hadamard(a), r) / np.sqrt(a)
    if random:
        q = rng.choice([-1.0, 1.0], size=n)[:, None] * q
    return q


def _skip(value: ir.Value) -> ir.Value:
    """Through float Casts / Identities."""
    node = value.producer()
    while node is not None and node.op_type in ("Cast", "Identity") and node.domain == "":
        if node.op_type == "Cast" and node.attributes.get_int("to", 0) not in _FLOAT_TYPES:
            break
        value = node.inputs[0]  # type: ignore[assignment]
        node = value.producer()
    return value


def _nodes_between(start: ir.Value, end: ir.Value) -> set[int]:
    """Ids of the nodes on some path from ``start`` to ``end``."""
    fwd: set[int] = set()
    stack = [start]
    while stack:
        for user in stack.pop().consumers():
            if id(user) not in fwd:
                fwd.add(id(user))
                stack.extend(user.outputs)
    out: set[int] = set()
    stack = [end]
    while stack:
        node = stack.pop().producer()
        if node is None or id(node) in out or id(node) not in fwd:
            continue
        out.add(id(node))
        stack.extend(i for i in node.inputs if i is not None)
    return out


@dataclass
class _Plan:
    embeddings: list[tuple[ir.Node, int]]  # (Gather, table slot)
    readers: list[tuple[RMSNormMatch, list[ir.Node]]]  # a norm of the stream and the linears reading it
    writers: list[tuple[ir.Node, ir.Node | None]]  # (linear, its bias Add)
    dim: int
    directions: list[tuple[ir.Node, int]]  # (node, slot) of constant D-vectors added to the stream


def _last_axis_one(a: ir.Value) -> bool:
    """``a``'s last axis has size 1 (from its shape, or an ``Unsqueeze`` on axis −1)."""
    if a.shape is not None and a.shape.rank() and a.shape[-1] == 1:
        return True
    node = a.producer()
    if node is not None and node.op_type == "Unsqueeze" and len(node.inputs) > 1:
        axes = _const(node.inputs[1])
        return axes is not None and axes.size == 1 and int(axes.reshape(-1)[0]) == -1
    return False


def _constant_direction(value: ir.Value, dim: int) -> tuple[ir.Node, int] | None:
    """``value = c`` or ``a ⊙ c`` (``a`` without a channel axis) with a constant ``c[..., D]``: (node, slot of c)."""
    node = value.producer()
    if node is None or node.domain != "":
        return None
    if node.op_type == "Mul":
        for i in (0, 1):
            c, a = _const(node.inputs[i]), node.inputs[1 - i]
            if c is not None and c.ndim >= 1 and c.shape[-1] == dim and c.size == dim and a is not None \
                    and _last_axis_one(a):
                return node, i
    return None


def _where(node: ir.Node) -> str:
    info = linear_info(node)
    return info.key if info is not None else (node.name or node.op_type)


def plan(model: ir.Model) -> _Plan:
    """Walk the residual stream from the embedding; everything it meets must be a known kind."""
    graph = model.graph
    linears = [n for n in graph if linear_info(n) is not None and linear_weight(n) is not None]
    if not linears:
        raise UnsupportedModelError("rotate: no annotated linear (run canonicalize first)")
    # the readers: each annotated non-writer linear's input must be an RMSNorm's output
    norm_of: dict[int, tuple[RMSNormMatch, list[ir.Node]]] = {}
    for node in linears:
        info = linear_info(node)
        if info.role in _WRITERS:  # type: ignore[union-attr]
            continue
        if info.role == Role.ROUTER:  # type: ignore[union-attr]
            raise UnsupportedModelError(f"rotate: {info.key}: mixture-of-experts routers are not supported")  # type: ignore[union-attr]
        norm = _match_norm(node.inputs[0])
        if norm is None:
            raise UnsupportedModelError(
                f"rotate: {info.key} does not read an RMSNorm (LayerNorm's mean subtraction, or no norm, "  # type: ignore[union-attr]
                "is not invariant under a rotation of the residual stream)")
        if norm.gamma is not None and _const(norm.gamma) is None:
            raise UnsupportedModelError(f"rotate: {info.key}: the norm weight is not a constant")  # type: ignore[union-attr]
        entry = norm_of.setdefault(id(norm.mul), (norm, []))
        entry[1].append(node)
    by_input: dict[int, tuple[RMSNormMatch, list[ir.Node]]] = {id(n.input): (n, ls) for n, ls in norm_of.values()}
    norm_nodes = {id(n): set() for n in by_input}  # stream value id → nodes inside its norm
    for key, (norm, _) in by_input.items():
        norm_nodes[key] = _nodes_between(norm.input, norm.output) | {id(norm.mul)}
    # the readers' norm outputs must feed only those linears (the fold of γ changes that value)
    for norm, ls in by_input.values():
        mine = {id(n) for n in ls}
        for user in _data_users(norm.output):
            if id(user) not in mine:
                raise UnsupportedModelError(
                    f"rotate: the RMSNorm feeding {_where(ls[0])} also feeds {user.op_type} {user.name}")

    start = _stream_start(model)
    embeddings = [start]
    stream = start[0].outputs[0]
    writers: list[tuple[ir.Node, ir.Node | None]] = []
    readers: list[tuple[RMSNormMatch, list[ir.Node]]] = []
    directions: list[tuple[ir.Node, int]] = []
    seen: set[int] = set()
    todo = [stream]
    dim = int(_const(start[0].inputs[start[1]]).shape[-1])  # type: ignore[union-attr]
    while todo:
        v = todo.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if v.is_graph_output():
            raise UnsupportedModelError(f"rotate: the residual stream value {v.name} is a graph output")
        inside = norm_nodes.get(id(v), set())
        if id(v) in by_input:
            readers.append(by_input[id(v)])
        for user in _data_users(v):
            if id(user) in inside:
                continue
            if user.op_type == "Cast" and user.domain == "" and user.attributes.get_int("to", 0) in _FLOAT_TYPES:
                todo.append(user.outputs[0])
                continue
            if user.op_type == "Mul" and user.domain == "" and any(
                    scalar_const(i) is not None for i in user.inputs if i is not v):
                todo.append(user.outputs[0])
                continue
            if user.op_type == "Add" and user.domain == "":
                other = user.inputs[1] if user.inputs[0] is v else user.inputs[0]
                w = _writer(other) if other is not None else None
                c = _constant_direction(other, dim) if w is None and other is not None else None
                if c is not None:  # h + a·c with a constant direction c: c ← c·Q
                    directions.append(c)
                    todo.append(user.outputs[0])
                    continue
                if w is None:
                    if other is not None and id(_skip(other)) in seen:  # h + h: not a residual block
                        raise UnsupportedModelError(f"rotate: {user.name}: the stream is added to itself")
                    raise UnsupportedModelError(
                        f"rotate: the residual Add {user.name} adds something that is not an o_proj/down_proj "
                        "output (a post-norm between the block and the residual, as in Gemma 2/3 or OLMo 2, "
                        "is not rotation-invariant)")
                writers.append(w)
                todo.append(user.outputs[0])
                continue
            raise UnsupportedModelError(
                f"rotate: the residual stream value {v.name} feeds {user.op_type} {user.name}, which is not an "
                "RMSNorm, a residual Add, a float Cast or a scalar Mul (LayerNorm? rotation would change it)")
    missing = [ls for key, (_, ls) in by_input.items() if key not in seen]
    if missing:
        raise UnsupportedModelError(f"rotate: {_where(missing[0][0])} reads a norm of something that is not the "
                                    "residual stream (a q/k-norm before the projection?)")
    writer_ids = {id(w) for w, _ in writers}
    strays = [n for n in linears if linear_info(n).role in _WRITERS and id(n) not in writer_ids]  # type: ignore[union-attr]
    if strays:
        raise UnsupportedModelError(f"rotate: {_where(strays[0])} does not write into the residual stream directly")
    return _Plan(embeddings, readers, writers, dim, directions)


def _match_norm(value: ir.Value | None) -> RMSNormMatch | None:
    """An RMSNorm producing ``value``; also with ``γ`` behind an ``Identity`` (an exporter's deduplicated
    initializer), which :func:`match_rmsnorm` does not take."""
    found = match_rmsnorm(value)
    if found is not None or value is None:
        return found
    node = value.producer()
    if node is None or node.op_type != "Mul" or node.domain != "" or len(node.inputs) != 2:
        return None
    for gi in (0, 1):
        gamma, normed = node.inputs[gi], node.inputs[1 - gi]
        g = _const(gamma)
        if g is None or g.ndim != 1 or normed is None:
            continue
        inner = match_rmsnorm(_skip(normed))
        if inner is not None and inner.gamma is None:
            return RMSNormMatch(value, inner.input, gamma, node, inner.eps, False)
    return None


def _data_users(v: ir.Value) -> list[ir.Node]:
    return [u for u in v.consumers() if u.op_type not in SHAPE_OPS]


def _stream_start(model: ir.Model) -> tuple[ir.Node, int]:
    """The ``Gather(E, ids)`` that starts the stream (the graph's only Gather of a 2-D float table read by a decoder)."""
    found = []
    for node in model.graph:
        if node.op_type == "Gather" and node.domain == "" and node.attributes.get_int("axis", 0) == 0:
            table = _const(node.inputs[0])
            ids = node.inputs[1]
            if table is not None and table.ndim == 2 and table.dtype.kind == "f" and ids is not None \
                    and ids.is_graph_input():
                found.append((node, 0))
    if len(found) != 1:
        raise UnsupportedModelError(
            f"rotate: expected one token-embedding Gather reading input_ids, found {len(found)} "
            "(position embeddings or an already lowered embedding are not supported)")
    return found[0]


def _writer(value: ir.Value) -> tuple[ir.Node, ir.Node | None] | None:
    """``value`` = an o_proj / down_proj output (``+ constant bias``), through float Casts and scalar
    ``Mul`` (Granite's residual multiplier)."""
    value = _skip(value)
    node = value.producer()
    while node is not None and node.op_type == "Mul" and node.domain == "" and len(node.inputs) == 2:
        scalars = [i for i in (0, 1) if scalar_const(node.inputs[i]) is not None]
        if len(scalars) != 1:
            break
        value = _skip(node.inputs[1 - scalars[0]])  # type: ignore[arg-type]
        node = value.producer()
    bias = None
    if node is not None and node.op_type == "Add" and node.domain == "":
        for i in (0, 1):
            b, y = node.inputs[1 - i], node.inputs[i]
            if b is not None and _const(b) is not None and y is not None:
                bias, node = node, _skip(y).producer()
                break
    if node is None or linear_weight(node) is None:
        return None
    info = linear_info(node)
    if info is None or info.role not in _WRITERS:
        return None
    return node, bias


def _weight64(node: ir.Node) -> tuple[np.ndarray, bool]:
    w, transposed = linear_weight(node)  # type: ignore[misc]
    arr = w.const_value.numpy().astype(np.float64)  # type: ignore[union-attr]
    return (arr.T if transposed else arr), transposed


def _insert_online(graph: ir.Graph, nodes: list[ir.Node], make_h: Callable[[int], np.ndarray],
                   shared: dict[tuple[int, Any], ir.Value], kind: str) -> None:
    """An online transform in front of ``nodes`` (linears reading the same ``x``): ``x·H`` as a constant MatMul
    marked :data:`ROTATION_MARK`, and ``Hᵀ`` folded into each weight, ``(x·H)·(Hᵀ·W) = x·W``.  ``H =
    make_h(K)``; one initializer ``rotate_{kind}_hadamard_{K}`` per size and dtype, kept in ``shared``."""
    first = _weight64(nodes[0])
    d = first[0].shape[0]
    h = make_h(d)
    x = nodes[0].inputs[0]
    dtype = linear_weight(nodes[0])[0].const_value.numpy().dtype  # type: ignore[index,union-attr]
    key = (d, np.dtype(dtype).str)
    if key not in shared:
        shared[key] = add_initializer(graph, f"rotate_{kind}_hadamard_{d}", h.astype(dtype))
    mm = ir.node("MatMul", [x, shared[key]], name=f"{nodes[0].name}_{kind}_rotation")
    mm.metadata_props[ROTATION_MARK] = "online"
    mm.outputs[0].name = f"{nodes[0].name}_rotated_input"
    mm.outputs[0].shape, mm.outputs[0].type = x.shape, x.type  # type: ignore[union-attr]
    graph.insert_before(nodes[0], mm)
    for i, node in enumerate(nodes):
        w, transposed = first if i == 0 else _weight64(node)  # each read after the previous reader's fold
        node.replace_input_with(0, mm.outputs[0])
        _set_linear(graph, node, h.T @ w, transposed, f"rotate_{kind}_{_where(node).replace('.', '_')}")


def _set_linear(graph: ir.Graph, node: ir.Node, w: np.ndarray, transposed: bool, tag: str) -> None:
    """``node``'s weight ← ``w`` [K, N]; a transposed (tied) weight is untied into its own initializer."""
    old, _ = linear_weight(node)  # type: ignore[misc]
    dtype = old.const_value.numpy().dtype  # type: ignore[union-attr]
    if not transposed:
        set_weight(graph, node, w.astype(dtype))
        return
    if node.op_type == "Gemm":
        new = add_initializer(graph, f"{tag}_weight", np.ascontiguousarray(w.T, dtype=dtype))
        node.replace_input_with(1, new)
        return
    new = add_initializer(graph, f"{tag}_weight", np.ascontiguousarray(w, dtype=dtype))
    node.replace_input_with(1, new)


def _online(graph: ir.Graph, value: ir.Value, m: np.ndarray, name: str, after: ir.Node | None) -> None:
    """Every reader of ``value`` reads ``value·m`` instead (a constant MatMul marked :data:`ROTATION_MARK`)."""
    uses = list(value.uses())
    dtype = value.dtype.numpy() if value.dtype is not None else np.float32
    mm = ir.node("MatMul", [value, add_initializer(graph, name, m.astype(dtype))], name=f"{name}_MatMul")
    mm.metadata_props[ROTATION_MARK] = "tied"
    mm.outputs[0].name = f"{name}_output"
    mm.outputs[0].shape, mm.outputs[0].type = value.shape, value.type
    if after is not None:
        graph.insert_after(after, mm)
    else:
        graph.insert_before(uses[0][0], mm)
    for node, idx in uses:
        node.replace_input_with(idx, mm.outputs[0])


def fold_norm(graph: ir.Graph, norm: RMSNormMatch, readers: list[ir.Node], q: np.ndarray | None,
              tag: str) -> None:
    """``W ← Qᵀ·diag(γ)·W`` for each reader, then ``γ ← 1`` (a private copy if shared)."""
    gamma = None
    if norm.gamma is not None:
        gamma = _const(norm.gamma).astype(np.float64).reshape(-1)  # type: ignore[union-attr]
    for node in readers:
        w, transposed = _weight64(node)
        if gamma is not None:
            w = gamma[:, None] * w
        if q is not None:
            w = q.T @ w
        _set_linear(graph, node, w, transposed, f"{tag}_{_where(node).replace('.', '_')}")
    if gamma is not None:
        slot = next(i for i, x in enumerate(norm.mul.inputs) if x is norm.gamma)
        _set_private(graph, norm.mul, slot, np.ones_like(gamma), f"{tag}_norm")


@register_pass
class Rotate(QCPass):
    """Fold RMSNorm weights, then rotate the residual stream by a randomized Hadamard (module docstring)."""

    name = "rotate"
    Config = RotateConfig
    needs_canonical = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cfg: RotateConfig = self.config
        t0 = time.perf_counter()
        if not cfg.residual:
            return self._inside_blocks(model, cfg, t0)
        p = plan(model)
        graph = model.graph
        q = random_orthogonal(p.dim, cfg.seed, cfg.random)
        tied = [(norm, ls) for norm, ls in p.readers if any(linear_weight(n)[1] for n in ls)]  # type: ignore[index]
        keep_tied = bool(tied) and not cfg.untie
        if keep_tied:  # E and lm_head stay as they are: h_0·Q after the Gather, h_L·Qᵀ before the final norm
            for node, _ in p.embeddings:
                _online(graph, node.outputs[0], q, "rotate_embedding_Q", after=node)
            for norm, _ in tied:
                _online(graph, norm.input, q.T, "rotate_final_Qt", after=norm.input.producer())
        else:
            for node, slot in p.embeddings:
                table = _const(node.inputs[slot])
                _set_private(graph, node, slot, table.astype(np.float64) @ q, "rotate_embedding")  # type: ignore[union-attr]
        untied = [] if keep_tied else [_where(n) for _, ls in tied for n in ls]
        folded = 0
        for i, (norm, readers) in enumerate(p.readers):
            if keep_tied and any(norm is t for t, _ in tied):
                continue
            fold_norm(graph, norm, readers, q, f"rotate_{i}")
            folded += 1
        for node, bias in p.writers:
            w, transposed = _weight64(node)
            _set_linear(graph, node, w @ q, transposed, f"rotate_{_where(node).replace('.', '_')}")
            if bias is not None:
                slot = next(i for i in (0, 1) if bias.inputs[i] is not None and _const(bias.inputs[i]) is not None)
                b = _const(bias.inputs[slot]).astype(np.float64)  # type: ignore[union-attr]
                _set_private(graph, bias, slot, (b.reshape(-1) @ q).reshape(b.shape), "rotate_bias")
        for node, slot in p.directions:
            c = _const(node.inputs[slot]).astype(np.float64)  # type: ignore[union-attr]
            _set_private(graph, node, slot, (c.reshape(-1) @ q).reshape(c.shape), "rotate_direction")
        online = self._online_down(model, cfg) if cfg.online_down else 0
        v_o = self._v_o(model, cfg) if cfg.v_o else {}
        self.context.report[self.name] = {
            "dim": p.dim,
            "rotation": "randomized Hadamard" if cfg.random else "Hadamard",
            "factor": f"H_{p.dim & -p.dim} ⊗ R_{p.dim // (p.dim & -p.dim)}",
            "seed": cfg.seed,
            "norms_folded": folded,
            "readers": sum(len(ls) for _, ls in p.readers),
            "writers": len(p.writers),
            "untied": untied,
            "tied_kept": keep_tied,
            "online_down": online,
            "v_o": v_o,
        }
        log.info("rotate: %d norms folded, %d readers, %d writers rotated (D=%d) in %.1fs",
                 len(p.readers), sum(len(ls) for _, ls in p.readers), len(p.writers), p.dim,
                 time.perf_counter() - t0)
        return ir.passes.PassResult(model, modified=True)

    def _inside_blocks(self, model: ir.Model, cfg: RotateConfig, t0: float) -> ir.passes.PassResult:
        """``residual=false``: the online down_proj transform and the per-head v→o transform only."""
        online = self._online_down(model, cfg) if cfg.online_down else 0
        v_o = self._v_o(model, cfg) if cfg.v_o else {}
        online_in = self._online_in(model, cfg) if cfg.online_in else 0
        self.context.report[self.name] = {"residual": False, "seed": cfg.seed, "online_down": online, "v_o": v_o,
                                          "online_in": {"groups": list(cfg.online_groups()), "inputs": online_in}}
        log.info("rotate: residual stream left as is; %d online down_proj transforms, %d on norm outputs, v→o in "
                 "%d layers (%.1fs)", online, online_in, v_o.get("layers", 0), time.perf_counter() - t0)
        return ir.passes.PassResult(model, modified=bool(online or online_in or v_o.get("layers")))

    def _online_in(self, model: ir.Model, cfg: RotateConfig) -> int:
        """``z·W = (z·H)·(Hᵀ·W)`` for the chosen readers of each normalized input (one MatMul per input)."""
        graph = model.graph
        roles = frozenset().union(*(_ONLINE_IN[g] for g in cfg.online_groups()))
        readers: dict[int, list[ir.Node]] = {}
        for n in list(graph):
            info = linear_info(n)
            if info is not None and info.role in roles and linear_weight(n) is not None and n.inputs[0] is not None:
                readers.setdefault(id(n.inputs[0]), []).append(n)
        shared: dict[tuple[int, Any], ir.Value] = {}
        for nodes in readers.values():
            _insert_online(graph, nodes, lambda d: random_orthogonal(d, cfg.seed + 3, cfg.random), shared, "online_in")
        return len(readers)

    def _v_o(self, model: ir.Model, cfg: RotateConfig) -> dict[str, Any]:
        """Per head: ``V ← V·H`` (v_proj's columns of each kv head, and its bias), ``W_o ← Hᵀ·W_o`` (o_proj's
        rows of each head).  Attention mixes rows (tokens) of each head, never channels, so
        ``x_o·W_o`` is unchanged; the V half of the KV cache then holds ``V·H`` (self-consistent)."""
        from qcompiler.passes._channels import find_upstream, linear_groups

        graph = model.graph
        done, skipped = 0, []
        for g in linear_groups(model, (Role.O,)):
            up = find_upstream(g)
            where = _where(g.linears[0])
            if up.kind != "linear" or up.prev is None or up.colmap is None or linear_weight(up.prev)[1]:  # type: ignore[index]
                skipped.append(f"{where}: {up.reason or 'no v_proj found'}")
                continue
            jumps = np.nonzero(np.diff(up.colmap) != 1)[0]
            if not len(jumps):  # as many kv heads as heads: the head size is not visible in the map
                skipped.append(f"{where}: head size not found")
                continue
            hd = int(jumps[0]) + 1
            k_o = len(up.colmap)
            h = random_orthogonal(hd, cfg.seed + 2, cfg.random)
            wv, tv = _weight64(up.prev)
            nv = wv.shape[1]
            if k_o % hd or nv % hd:
                skipped.append(f"{where}: head size {hd} does not divide o_proj's input {k_o} / v_proj's output {nv}")
                continue
            bv = np.kron(np.eye(nv // hd), h)
            bo = np.kron(np.eye(k_o // hd), h)
            _set_linear(graph, up.prev, wv @ bv, tv, f"rotate_vo_{_where(up.prev).replace('.', '_')}")
            if up.prev_bias is not None:
                add = up.prev_bias
                slot = next(i for i in (0, 1) if add.inputs[i] is not None and _const(add.inputs[i]) is not None)
                b = _const(add.inputs[slot]).astype(np.float64)  # type: ignore[union-attr]
                _set_private(graph, add, slot, (b.reshape(-1) @ bv).reshape(b.shape), "rotate_vo_bias")
            for node in g.linears:
                wo, to = _weight64(node)
                _set_linear(graph, node, bo.T @ wo, to, f"rotate_vo_{_where(node).replace('.', '_')}")
            done += 1
        if skipped:
            log.info("rotate: v→o transform skipped for %d layer(s): %s", len(skipped), "; ".join(skipped[:4]))
        return {"layers": done, "skipped": skipped}

    def _online_down(self, model: ir.Model, cfg: RotateConfig) -> int:
        graph = model.graph
        downs = [n for n in graph if (i := linear_info(n)) is not None and i.role == Role.DOWN
                 and linear_weight(n) is not None]
        shared: dict[tuple[int, Any], ir.Value] = {}
        for node in downs:
            _insert_online(graph, [node], lambda f: random_orthogonal(f, cfg.seed + 1, cfg.random), shared, "online")
        return len(downs)
