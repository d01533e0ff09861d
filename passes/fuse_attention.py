"""fuse-attention: a decoder attention block (with or without KV cache) → ``com.microsoft.GroupQueryAttention``.

With the block matched by :func:`qcompiler.models.attention.match_attention`::

    o = softmax(α·q₄·repeat(k₄)ᵀ + bias)·repeat(v₄)   ≡   GroupQueryAttention(q, k, v, past_k, past_v;
                                                             scale=α, causal=0, attention_bias=bias)

    softmax(c·tanh(α'·q₄·repeat(k₄)ᵀ) + bias)   ≡   the same with softcap=c, scale=c·α'   (c > 0)

(soft-capped scores, Gemma 2: GQA computes ``softcap·tanh(scale·q·kᵀ/softcap)`` and adds
``attention_bias`` after it, as the graph does — checked on ONNX Runtime 1.32's CPU kernel).

GQA's head grouping (query head ``n`` reads kv head ``n // R``) is repeat-kv's; it
appends the new k/v to the past along the sequence axis like the graph's Concat and
returns the result as ``present_k/v``, so the model keeps its interface
(``past_key_values.i.*`` in, ``present.i.*`` out, ``[B, KV, T, H]``).  Rotary, when
fused, moves in front of the heads split: ``RotaryEmbedding`` on ``q[B, S, N·H]`` with
``num_heads=N`` is the same rotation.  ``causal=0`` with the graph's own mask as
``attention_bias`` keeps *its* masking exactly (causal, padding, sliding window,
whatever it computes); ``seqlens_k = T − 1`` for every row so the kernel itself masks
nothing.  The mask's ``−∞`` entries become the lowest finite float: for rows with at
least one visible key the probabilities are identical (``exp`` underflows to 0), and a
fully masked row (a padding query) yields a finite average instead of the graph's
``NaN → 0``, which keeps later layers free of NaN.  Known limit of the kernel: a batch
of several sequences with several new tokens each *and* a non-empty cache is refused
by ONNX Runtime (single-sequence prefill, batched prefill and batched decoding work).

Values of the block that the mask computation reads through ``Shape`` (e.g. the key
length) are rebuilt from the block's inputs, so the block can be removed.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from qcompiler.models.attention import AttentionMatch, match_attention

from qcompiler.floattype import float_array, float_type, lowest
from qcompiler.irutil import MS_DOMAIN, const_array, ensure_opset
from qcompiler.pipeline import QCPass, register_pass

from ._fusion import cleanup, const, dims, infer_shapes, new_node, record, replace_value, same_dim

log = logging.getLogger(__name__)


@dataclass
class _Shared:
    """What blocks share: constants, lengths per (batch, sequence, past) symbols, finite masks."""

    consts: dict[tuple, ir.Value] = field(default_factory=dict)
    lengths: dict[object, dict[str, ir.Value]] = field(default_factory=dict)
    masks: dict[int, ir.Value] = field(default_factory=dict)


class _Builder:
    """New nodes for one block, inserted before ``anchor``."""

    def __init__(self, graph: ir.Graph, anchor: ir.Node, prefix: str, consts: dict[tuple, ir.Value]) -> None:
        self.graph, self.anchor, self.prefix, self.consts = graph, anchor, prefix, consts

    def __call__(self, op: str, inputs: list[ir.Value | None], name: str, domain: str = "",
                 n_out: int = 1, out_names: list[str | None] | None = None, **attrs: object) -> ir.Node:
        node = new_node(self.graph, op, inputs, f"{self.prefix}/{name}", attributes=attrs, domain=domain,
                        num_outputs=n_out, output_names=out_names)
        self.graph.insert_before(self.anchor, node)
        return node

    def const(self, name: str, arr: np.ndarray) -> ir.Value:
        """A constant, shared by all blocks."""
        arr = np.asarray(arr)
        key = (name, arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self.consts:
            self.consts[key] = const(self.graph, f"attention_{name}", arr)
        return self.consts[key]


def _lengths(b: _Builder, m: AttentionMatch, shared: _Shared) -> dict[str, ir.Value]:
    """int64 ``[1]`` tensors B, S, T and GQA's int32 seqlens_k ``[B]`` / total ``[]``."""
    qd, pd = dims(m.q) or [None, None], dims(m.past_k) if m.past_k is not None else None
    key: object = (qd[0], qd[1], pd[2] if pd else 0)
    if not all(isinstance(x, (int, str)) for x in key):  # type: ignore[union-attr]
        key = id(m)
    if key in shared.lengths:
        return shared.lengths[key]
    one = b.const("one_i32", np.array(1, np.int32))
    batch = b("Shape", [m.q], "batch", start=0, end=1).outputs[0]
    seq = b("Shape", [m.q], "seq", start=1, end=2).outputs[0]
    total = seq
    if m.past_k is not None:
        past = b("Shape", [m.past_k], "past", start=2, end=3).outputs[0]
        total = b("Add", [past, seq], "total").outputs[0]
    t32 = b("Cast", [total], "total_i32", to=ir.DataType.INT32.value).outputs[0]
    scalar = b("Reshape", [t32, b.const("scalar_shape", np.zeros(0, np.int64))], "total_scalar").outputs[0]
    last = b("Sub", [t32, one], "seqlen_k").outputs[0]
    seqlens = b("Expand", [last, batch], "seqlens_k").outputs[0]
    shared.lengths[key] = {"B": batch, "S": seq, "T": total, "seqlens_k": seqlens, "total": scalar}
    return shared.lengths[key]


def _finite_bias(b: _Builder, m: AttentionMatch, lens: dict[str, ir.Value], shared: _Shared) -> ir.Value | None:
    """The mask with −∞ → lowest finite float, shaped ``[·, ·, S, T]`` as GQA wants."""
    if m.bias is None:
        return None
    if id(m.bias) in shared.masks:
        return shared.masks[id(m.bias)]
    ft = float_type(m.bias)  # the mask's own float type (fp16 in a half graph)
    low = lowest(ft)
    bias = m.bias
    node = bias.producer()
    consts = [const_array(i) for i in node.inputs[1:]] if node is not None and node.op_type == "Where" else []
    if len(consts) == 2 and all(c is not None and c.size == 1 for c in consts):
        vals = [float_array(np.maximum(np.asarray(c, np.float32), low).reshape(np.shape(c)), ft)  # type: ignore[arg-type]
                for c in consts]
        bias = b("Where", [node.inputs[0], b.const("mask_keep", vals[0]), b.const("mask_drop", vals[1])],  # type: ignore[union-attr]
                 "mask_finite").outputs[0]
    else:
        bias = b("Max", [bias, b.const("mask_low", float_array(low, ft))], "mask_finite").outputs[0]
    bd = dims(m.bias)
    qd = dims(m.q) or [None, None]
    pd = dims(m.past_k) if m.past_k is not None else None
    t_known = bd is not None and len(bd) == 4 and pd is None and same_dim(bd[3], qd[1])
    if not (bd is not None and len(bd) == 4 and same_dim(bd[2], qd[1]) and t_known):
        ones = b.const("ones2", np.ones(2, np.int64))
        shape = b("Concat", [ones, lens["S"], lens["T"]], "mask_shape", axis=0).outputs[0]
        bias = b("Expand", [bias, shape], "mask_expanded").outputs[0]
    shared.masks[id(m.bias)] = bias
    return bias


def _shape_of(b: _Builder, m: AttentionMatch, tag: tuple[str, ...], node: ir.Node,
              lens: dict[str, ir.Value]) -> ir.Value:
    """A ``Shape(node.input)`` rebuilt from the symbols of ``tag``."""
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", len(tag))
    sizes = {"N": m.heads, "KV": m.kv_heads, "H": m.head_size, "R": m.heads // m.kv_heads, "1": 1}
    parts = [lens[s] if s in lens else b.const(f"dim_{s}", np.array([sizes[s]], np.int64)) for s in tag[start:end]]
    return b("Concat", parts, "shape", axis=0).outputs[0]


def _closure_hits(start: list[ir.Value | None], interior: set[int], leaves: set[int]) -> bool:
    """Whether the producers upstream of ``start`` include an interior node (stopping at ``leaves``)."""
    seen: set[int] = set()
    queue: deque[ir.Value | None] = deque(start)
    while queue:
        v = queue.popleft()
        node = v.producer() if v is not None else None
        if node is None or id(node) in seen or id(node) in leaves:
            continue
        if id(node) in interior:
            return True
        seen.add(id(node))
        queue.extend(node.inputs)
    return False


def _shape_readers(m: AttentionMatch, interior: set[int]) -> list[tuple[ir.Node, tuple[str, ...]]] | None:
    """``Shape`` nodes outside the block reading its values; None if another outside node reads one."""
    keep = {id(m.output), id(m.present_k), id(m.present_v)}
    readers = []
    for n in m.nodes:
        for o in n.outputs:
            for use in o.uses():
                if id(use.node) in interior:
                    continue
                if use.node.op_type == "Shape" and id(o) in m.tags:
                    readers.append((use.node, m.tags[id(o)]))
                elif id(o) not in keep and use.node.op_type != "Shape":
                    return None
    return readers


def _flat_heads(b: _Builder, v4: ir.Value, heads: int, size: int, tag: str) -> ir.Value:
    """``v4[B, n, S, H]`` → ``[B, S, n·H]`` (Transpose₀₂₁₃, Reshape): the layout GQA reads."""
    t = b("Transpose", [v4], f"{tag}_bsnh", perm=[0, 2, 1, 3]).outputs[0]
    flat = b("Reshape", [t, b.const(f"flat_{heads * size}", np.array([0, 0, heads * size], np.int64))],
             f"{tag}_flat").outputs[0]
    d = dims(v4)
    if d is not None and len(d) == 4:
        flat.shape = ir.Shape([d[0], d[2], heads * size])
    flat.type = v4.type
    return flat


def _head_normed(b: _Builder, x: ir.Value, norm: ir.Node | None, gamma: np.ndarray | None, heads: int, size: int,
                 tag: str) -> ir.Value:
    """``x[B, S, n·H]`` with the block's q/k norm (weight ``gamma``) applied per head (over ``H``), else ``x``."""
    if norm is None or gamma is None:
        return x
    split = b("Reshape", [x, b.const(f"heads_{heads}x{size}", np.array([0, 0, heads, size], np.int64))],
              f"{tag}_norm_heads").outputs[0]
    eps = norm.attributes.get_float("epsilon", 1e-5)
    normed = b("SimplifiedLayerNormalization", [split, b.const(f"{tag}_norm_weight", gamma)], f"{tag}_norm", axis=-1, epsilon=eps,
               stash_type=norm.attributes.get_int("stash_type", 1)).outputs[0]
    return b("Reshape", [normed, b.const(f"flat_{heads * size}", np.array([0, 0, heads * size], np.int64))],
             f"{tag}_norm_flat").outputs[0]


@register_pass
class FuseAttention(QCPass):
    """Decoder attention blocks → com.microsoft.GroupQueryAttention (see module docstring)."""

    name = "fuse-attention"
    needs_canonical = True  # canonicalize must see the unfused decoder (QCPass.needs_canonical)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        infer_shapes(model)
        shared = _Shared()
        count = 0
        for softmax in [n for n in graph if n.op_type == "Softmax"]:
            m, why = match_attention(softmax)
            if m is None:
                log.info("fuse-attention: attention at %s left unfused: %s", softmax.name, why)
                continue
            interior = {id(n) for n in m.nodes}
            readers = _shape_readers(m, interior)
            if readers is None:
                log.info("fuse-attention: attention at %s left unfused: an inner value is used elsewhere", softmax.name)
                continue
            reader_ids = {id(r) for r, _ in readers}
            rot_inputs = [i for r in (m.rotary_q, m.rotary_k) if r is not None for i in r.inputs[1:]]
            if _closure_hits([m.bias, *rot_inputs], interior, reader_ids):
                log.info("fuse-attention: attention at %s left unfused: its mask depends on the block", softmax.name)
                continue
            self._rewrite(graph, m, readers, shared)
            count += 1
        if count:
            ensure_opset(model, MS_DOMAIN, 1)
            cleanup(model)
            # the blocks' mask computations are now alike (same key length): compute each once
            common_passes.CommonSubexpressionEliminationPass()(model)
            cleanup(model)
        record(self.context, self.name, count)
        log.info("fuse-attention: %d attention block(s) → GroupQueryAttention", count)
        return ir.passes.PassResult(model, modified=count > 0)

    def _rewrite(self, graph: ir.Graph, m: AttentionMatch, readers: list[tuple[ir.Node, tuple[str, ...]]],
                 shared: _Shared) -> None:
        anchor = m.output.producer()
        b = _Builder(graph, anchor, f"{anchor.name or 'attention'}_gqa", shared.consts)  # type: ignore[union-attr]
        for side, n in (("q", m.heads), ("k", m.kv_heads), ("v", m.kv_heads)):
            v4 = getattr(m, f"{side}4")
            if v4 is not None:  # the block starts at the 4-D heads: read them back as [B, S, n·H]
                setattr(m, side, _flat_heads(b, v4, n, m.head_size, side))
        lens = _lengths(b, m, shared)
        for reader, tag in readers:
            replace_value(graph, reader.outputs[0], _shape_of(b, m, tag, reader, lens))
        q = _head_normed(b, m.q, m.q_norm, m.q_gamma, m.heads, m.head_size, "q")
        k = _head_normed(b, m.k, m.k_norm, m.k_gamma, m.kv_heads, m.head_size, "k")
        if m.rotary_q is not None and m.rotary_k is not None:
            q = b("RotaryEmbedding", [q, *m.rotary_q.inputs[1:]], "rotary_q", domain=MS_DOMAIN,
                  num_heads=m.heads, interleaved=0).outputs[0]
            k = b("RotaryEmbedding", [k, *m.rotary_k.inputs[1:]], "rotary_k", domain=MS_DOMAIN,
                  num_heads=m.kv_heads, interleaved=0).outputs[0]
        bias = _finite_bias(b, m, lens, shared)
        cached = m.past_k is not None
        capped = {"softcap": float(m.softcap)} if m.softcap else {}
        gqa = b(
            "GroupQueryAttention",
            [q, k, m.v, m.past_k, m.past_v, lens["seqlens_k"], lens["total"], None, None, None, bias],
            "GroupQueryAttention", domain=MS_DOMAIN, n_out=3,
            out_names=["attn", "present_key" if cached else None, "present_value" if cached else None],
            num_heads=m.heads, kv_num_heads=m.kv_heads, scale=float(m.scale), causal=0, **capped,
        )
        # trailing omitted optional inputs are dropped
        while gqa.inputs and gqa.inputs[-1] is None:
            gqa.resize_inputs(len(gqa.inputs) - 1)
        replace_value(graph, m.output, gqa.outputs[0])
        if cached:
            replace_value(graph, m.present_k, gqa.outputs[1])  # type: ignore[arg-type]
            replace_value(graph, m.present_v, gqa.outputs[2])  # type: ignore[arg-type]
