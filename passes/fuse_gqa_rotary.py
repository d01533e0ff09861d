"""fuse-gqa-rotary: rotary and the q/k/v Split folded into GroupQueryAttention (packed QKV, ``do_rotary=1``).

After ``fuse-attention``, ``fuse-rotary`` and ``fuse-pack-linears`` a decoder layer's attention reads::

    P = linear(X)                                    # one packed q|k|v linear, P[B, S, (H + 2·Hkv)·D]
    q, k, v = Split(P, [H·D, Hkv·D, Hkv·D], axis=-1)
    GQA(RotaryEmbedding(q, pos, cos, sin), RotaryEmbedding(k, pos, cos, sin), v, past_k, past_v, …)

ONNX Runtime's GroupQueryAttention takes the packed ``P`` as its query (key and value absent)
and applies the same rotary itself with ``do_rotary=1``, from the same ``cos``/``sin`` caches::

    GQA(P, ∅, ∅, past_k, past_v, seqlens_k, total_len, cos, sin; do_rotary=1, rotary_interleaved=interleaved)

Same arithmetic — ``rot(x)_i = x_i·cos θ_{p,i} − x_{i±D/2}·sin θ_{p,i}`` on each head of q and k,
then attention — minus 3 nodes per layer (the Split, 2 RotaryEmbedding) and their intermediate
tensors: this is the form onnxruntime-genai's builder writes.  Matched only exactly: the Split's
three outputs read by nothing else (but Shape), both rotaries on the same positions and caches with the same
``interleaved`` and no partial rotary (``rotary_embedding_dim``) or ``scale``, a GQA without
rotary, cos/sin or position inputs of its own and without a quantized cache; anything else
(q/k norms between the Split and the rotary, separate q/k/v linears) is left as it is.

**Positions.**  The kernel rotates the token in cache slot ``j`` by ``θ(j)``: a prompt from 0, a decode
step by its slot (``seqlens_k``; our graphs pass ``total − 1`` for every row, the mask does the
padding).  The unfolded graph rotates by ``position_ids``.  The two agree up to a constant per row
whenever a row's positions run with its cache slots — no padding (``position_ids = j``, or
``j + offset``) and left padding (``j − pads``, the ``cumsum(mask) − 1`` that transformers and optimum
feed) — and RoPE's scores depend only on the difference of the positions::

    ⟨R(θ(m + c))q, R(θ(n + c))k⟩ = ⟨R(θ(m))q, R(θ(n))k⟩     (θ(p) = p·ω, R a rotation)

so the attention is the same (float rounding of the angles aside: 5e-7 relative on a left-padded
batch).  It is not for positions that do not run with the slots: a right-padded batch decoding
after its padding (its new tokens are ``pads`` slots further than their positions) or arbitrary
``position_ids``; those the graph reads but this form does not (``tests/passes/test_fuse_gqa_rotary.py``
shows both).  GQA is therefore fed no ``position_ids`` (input 9): with it, ONNX Runtime takes
``position_ids[b, 0]`` as the base of a prompt (1 on a left-padded row: the padding's fill) and
the slot at decode, which agrees with neither.

The caches: ``fuse-rotary`` feeds RotaryEmbedding the graph's own per-token tables
(``cos_cache[b·S + t] = cos θ(position_ids[b, t])``, positions ``arange(B·S)``), while
GroupQueryAttention indexes its caches by slot, ``cos_cache[p]`` for ``p <
total_sequence_length``.  When those tables are a function of the ``position_ids`` graph
input alone (constants aside), the pass re-feeds their subgraph with the positions
``arange(T)[None]``, ``T`` = GQA's ``total_sequence_length``: row ``p`` is then ``cos θ(p)`` —
the same table whatever the RoPE variant with angles linear in the position, computed for ``T``
positions per run.  Graphs whose tables depend on anything else are left alone.

Not in the cpu target's default pipeline, for the right-padded batches above: opt-in with
``qc quantize … --rotary-in-attention`` (the cpu lowering then ends with it) or ``--passes "…,fuse-gqa-rotary"``
after the lowering.  SmolLM2 ``w4a16-fast`` decode: +1–2 % on 1 and 2 threads, with or without spinning
thread pools (docs/fusion.md: paired, interleaved, the session creation order rotated).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qcompiler.irutil import MS_DOMAIN, add_initializer, const_array
from qcompiler.pipeline import QCPass, register_pass

from ._fusion import cleanup, record

log = logging.getLogger(__name__)

#: GroupQueryAttention input slots
QUERY, KEY, VALUE, TOTAL, COS, SIN, POSITIONS = 0, 1, 2, 6, 7, 8, 9


def _ancestors(values: list[ir.Value]) -> tuple[list[ir.Node], set[ir.Value]]:
    """Nodes computing ``values`` and the graph inputs they read (initializers and constants aside)."""
    nodes: dict[int, ir.Node] = {}
    inputs: set[ir.Value] = set()
    stack = list(values)
    while stack:
        v = stack.pop()
        node = v.producer()
        if node is None:
            if not v.is_initializer() and v.const_value is None:
                inputs.add(v)
            continue
        if id(node) in nodes:
            continue
        nodes[id(node)] = node
        stack.extend(x for x in node.inputs if x is not None)
    return list(nodes.values()), inputs


def _positional_caches(graph: ir.Graph, cos: ir.Value, sin: ir.Value, total: ir.Value) -> bool:
    """Re-feed the tables' subgraph with ``arange(total)[None]`` in place of ``position_ids``; False (and nothing
    changed) when the tables read any other input."""
    nodes, inputs = _ancestors([cos, sin])
    if len(inputs) != 1:
        return False
    (pos,) = inputs
    if pos not in graph.inputs or pos.dtype != ir.DataType.INT64:
        return False
    first = min(graph.num_nodes(), *(i for i, n in enumerate(graph) if any(x is pos for x in n.inputs)))
    anchor = list(graph)[first]
    zero, one = (add_initializer(graph, f"gqa_rotary_{n}", np.array(v, np.int64)) for n, v in (("zero", 0),
                                                                                                 ("one", 1)))
    axes = add_initializer(graph, "gqa_rotary_axes", np.array([0], np.int64))
    made = [ir.node("Cast", [total], attributes={"to": ir.DataType.INT64}, name="gqa_rotary/total")]
    made.append(ir.node("Range", [zero, made[-1].outputs[0], one], name="gqa_rotary/range"))
    made.append(ir.node("Unsqueeze", [made[-1].outputs[0], axes], name="gqa_rotary/positions"))
    for node in made:
        graph.insert_before(anchor, node)
    arange = made[-1].outputs[0]
    arange.name = "gqa_rotary/positions_out"
    for node in nodes:
        for i, x in enumerate(node.inputs):
            if x is pos:
                node.replace_input_with(i, arange)
    return True


def _input(node: ir.Node, i: int) -> ir.Value | None:
    return node.inputs[i] if len(node.inputs) > i else None


def _rotary(v: ir.Value | None) -> ir.Node | None:
    node = v.producer() if v is not None else None
    if node is None or node.op_type != "RotaryEmbedding" or node.domain != MS_DOMAIN or len(v.uses()) != 1:
        return None
    if node.attributes.get_int("rotary_embedding_dim", 0) or node.attributes.get_float("scale", 1.0) != 1.0:
        return None
    if node.attributes.get_int("is_packed_batching", 0) or len(node.inputs) != 4:
        return None
    return node


def _packed_split(q: ir.Node, k: ir.Node, v: ir.Value | None, heads: int, kv_heads: int) -> ir.Node | None:
    """The Split feeding q's and k's rotaries and v, exactly [H·D, Hkv·D, Hkv·D] on the last axis."""
    split = q.inputs[0].producer() if q.inputs[0] is not None else None
    if split is None or split.op_type != "Split" or split.domain != "" or len(split.outputs) != 3:
        return None
    if [q.inputs[0], k.inputs[0], v] != list(split.outputs):
        return None
    # besides q's and k's rotary and GQA's value, only Shape reads (fuse-rotary's positions take their shape
    # from q: that subgraph feeds only the rotaries, and goes with them)
    if any(sum(u.node.op_type != "Shape" for u in o.uses()) != 1 for o in split.outputs):
        return None
    if split.attributes.get_int("axis", 0) not in (-1, 2):
        return None
    sizes = const_array(split.inputs[1]) if len(split.inputs) > 1 and split.inputs[1] is not None else None
    if sizes is None or sizes.size != 3 or sizes[0] % heads:
        return None
    d = int(sizes[0]) // heads
    if [int(s) for s in sizes] != [heads * d, kv_heads * d, kv_heads * d]:
        return None
    return split


@register_pass
class FuseGQARotary(QCPass):
    """Packed q|k|v straight into GroupQueryAttention, rotary applied by the kernel (``do_rotary=1``)."""

    name = "fuse-gqa-rotary"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        count = 0
        caches: dict[tuple[int, int], bool] = {}  # (cos, sin) → re-fed by slot (False: not positional)
        for gqa in list(model.graph):
            if gqa.op_type != "GroupQueryAttention" or gqa.domain != MS_DOMAIN:
                continue
            attrs = gqa.attributes
            if attrs.get_int("do_rotary", 0) or "k_quant_type" in attrs or "v_quant_type" in attrs:
                continue
            if any(_input(gqa, i) is not None for i in (COS, SIN, POSITIONS)):
                continue
            q, k = _rotary(_input(gqa, QUERY)), _rotary(_input(gqa, KEY))
            if q is None or k is None or q.inputs[1:] != k.inputs[1:]:
                continue
            if q.attributes.get_int("interleaved", 0) != k.attributes.get_int("interleaved", 0):
                continue
            heads, kv_heads = attrs.get_int("num_heads", 0), attrs.get_int("kv_num_heads", 0)
            if not heads or not kv_heads or q.attributes.get_int("num_heads", heads) != heads \
                    or k.attributes.get_int("num_heads", kv_heads) != kv_heads:
                continue
            split = _packed_split(q, k, _input(gqa, VALUE), heads, kv_heads)
            if split is None:
                continue
            cos, sin, total = q.inputs[2], q.inputs[3], _input(gqa, TOTAL)
            key = (id(cos), id(sin))
            if key not in caches:
                caches[key] = total is not None and _positional_caches(model.graph, cos, sin, total)
            if not caches[key]:
                continue
            for o in split.outputs:  # Shape of the leading dims (batch, sequence) of q: the same as P's
                for use in list(o.uses()):
                    if use.node.op_type == "Shape" and 0 < use.node.attributes.get_int("end", 0) <= 2:
                        use.node.replace_input_with(use.idx, split.inputs[0])
            for slot, value in ((QUERY, split.inputs[0]), (KEY, None), (VALUE, None), (COS, cos), (SIN, sin)):
                gqa.replace_input_with(slot, value)
            attrs["do_rotary"] = ir.AttrInt64("do_rotary", 1)
            attrs["rotary_interleaved"] = ir.AttrInt64("rotary_interleaved", q.attributes.get_int("interleaved", 0))
            count += 1
        if count:
            cleanup(model)
        record(self.context, self.name, count)
        log.info("fuse-gqa-rotary: %d attention(s) read packed q|k|v and apply the rotary themselves", count)
        return ir.passes.PassResult(model, modified=count > 0)
