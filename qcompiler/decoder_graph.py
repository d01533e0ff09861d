"""One Llama-family decoder graph in ONNX, written op by op: ``qc export --stream`` and the test models.

The op pattern is optimum's Llama export, which every pass reads: RMSNorm as
``Pow/ReduceMean/Add/Sqrt/Div/Mul``, rotary ``x·cos + rotate_half(x)·sin``, GQA repeat-kv
(``Unsqueeze/Expand/Reshape``), causal + padding mask from ``position_ids``/``attention_mask``,
SiLU as ``x·σ(x)``, and with a KV cache ``past_key_values.i.*`` → ``present.i.*``
(``Concat`` on the sequence axis).  One decoder layer (``T`` the graph's float type, norms and
rotary tables in fp32 as transformers computes them)::

    h   = x + o_proj(attn(rope(q_proj(n1)), rope(k_proj(n1)), v_proj(n1)))     n1 = rms(x)·γ1
    out = h + down_proj(silu(gate_proj(n2)) ⊙ up_proj(n2))                     n2 = rms(h)·γ2
    rms(x) = T(x₃₂ / sqrt(mean(x₃₂²) + ε)),   attn = softmax(q·kᵀ/√d + mask)·v

with ``q·kᵀ/√d`` computed as ``(q·d^-¼)·(kᵀ·d^-¼)`` and the mask ``0`` or the lowest finite
value of ``T``.

Where the weights come from is the builder's business (:class:`GraphBuilder`): the streaming
export copies them from a checkpoint (``qcompiler.export_stream``), the synthetic test models
draw them from a seeded generator with outliers injected (``qcompiler.models.synthetic``).  A
builder is asked for each weight by its Hugging Face name, in the order of the forward pass,
and returns the initializer's name; a linear weight is wanted as the graph's ``MatMul`` reads
it, ``W^T[in, out]`` (``transpose=True``: the checkpoint stores ``W[out, in]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from qcompiler.floattype import bf16_bits, lowest

F = TensorProto.FLOAT
I64 = TensorProto.INT64


@dataclass(frozen=True)
class LlamaShape:
    """What the graph needs from ``config.json``."""

    model_type: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    eps: float
    tie: bool
    inv_freq: tuple[float, ...] = field(repr=False)


class GraphBuilder:
    """Nodes and initializers of a graph under construction in float type ``T``.

    Subclasses say where the weights come from (:meth:`has`, :meth:`weight`) and may name
    nodes their own way (:meth:`op`), change how a tensor is stored (:meth:`tensor`, e.g.
    straight to an external-data file) or add to the embedding's output (:meth:`after_embed`).
    ``linears`` maps each linear's Hugging Face name (``model.layers.0.self_attn.q_proj``,
    ``lm_head``) to its ``MatMul`` node.
    """

    def __init__(self, T: int = F) -> None:
        self.T = T
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.linears: dict[str, str] = {}
        self._n = 0

    # -- what subclasses provide
    def has(self, name: str) -> bool:
        """Whether the model has the weight ``name`` (optional ones: biases, an untied ``lm_head``)."""
        raise NotImplementedError

    def weight(self, name: str, transpose: bool = False) -> str:
        """Add the weight ``name`` (as the graph reads it) and return its initializer's name."""
        raise NotImplementedError

    def after_embed(self, x: str) -> str:
        """The residual stream after the embedding (a hook: the synthetic models inject here)."""
        return x

    # -- building blocks
    def op(self, op: str, inputs: list[str], name: str, **attrs: object) -> str:
        self._n += 1
        out = f"{name}_output_0"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def tensor(self, arr: np.ndarray, name: str) -> TensorProto:
        return numpy_helper.from_array(arr, name)

    def init(self, arr: np.ndarray, name: str) -> str:
        self.inits.append(self.tensor(np.asarray(arr), name))
        return name

    def const(self, arr: np.ndarray | float | int, dtype: int | None = None, base: str = "const") -> str:
        """A constant initializer, stored in ``dtype`` (default: ``arr``'s own)."""
        self._n += 1
        name = f"{base}_{self._n}"
        arr = np.asarray(arr)
        if dtype is None or dtype == helper.np_dtype_to_tensor_dtype(arr.dtype):
            self.inits.append(self.tensor(arr, name))
        elif dtype == TensorProto.BFLOAT16:
            bits = bf16_bits(np.ascontiguousarray(arr, dtype=np.float32))
            self.inits.append(helper.make_tensor(name, dtype, list(arr.shape), bits.tobytes(), raw=True))
        else:
            self.inits.append(self.tensor(arr.astype(helper.tensor_dtype_to_np_dtype(dtype)), name))
        return name

    def to_t(self, x: str, name: str) -> str:
        return x if self.T == F else self.op("Cast", [x], name, to=self.T)


def _rms_norm(g: GraphBuilder, x: str, gamma: str, eps: float, p: str) -> str:
    xc = g.op("Cast", [x], f"{p}/Cast", to=F)
    sq = g.op("Pow", [xc, g.const(np.float32(2.0))], f"{p}/Pow")
    mean = g.op("ReduceMean", [sq, g.const(np.array([-1], np.int64))], f"{p}/ReduceMean", keepdims=1)
    add = g.op("Add", [mean, g.const(np.float32(eps))], f"{p}/Add")
    inv = g.op("Div", [g.const(np.float32(1.0)), g.op("Sqrt", [add], f"{p}/Sqrt")], f"{p}/Div")
    normed = g.to_t(g.op("Mul", [xc, inv], f"{p}/Mul"), f"{p}/Cast_1")
    return g.op("Mul", [g.weight(gamma), normed], f"{p}/Mul_1")


def _linear(g: GraphBuilder, x: str, hf: str, p: str) -> str:
    y = g.op("MatMul", [x, g.weight(f"{hf}.weight", transpose=True)], f"{p}/MatMul")
    g.linears[hf] = g.nodes[-1].name
    if g.has(f"{hf}.bias"):
        y = g.op("Add", [g.weight(f"{hf}.bias"), y], f"{p}/Add")
    return y


def _rotate(g: GraphBuilder, x: str, cos: str, sin: str, half: int, p: str) -> str:
    """``x·cos + rotate_half(x)·sin`` with ``rotate_half(x) = [−x2, x1]``."""
    i64 = np.int64
    x1 = g.op("Slice", [x, g.const(np.array([0], i64)), g.const(np.array([half], i64)), g.const(np.array([-1], i64))],
              f"{p}/Slice")
    x2 = g.op("Slice", [x, g.const(np.array([half], i64)), g.const(np.array([2**62], i64)),
                        g.const(np.array([-1], i64))], f"{p}/Slice_1")
    rot = g.op("Concat", [g.op("Neg", [x2], f"{p}/Neg"), x1], f"{p}/Concat", axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos], f"{p}/Mul"), g.op("Mul", [rot, sin], f"{p}/Mul_1")], f"{p}/Add")


def build_decoder(s: LlamaShape, g: GraphBuilder, kv_cache: bool, graph_name: str = "main_graph",
                  producer: str = "qcompiler") -> onnx.ModelProto:
    """The decoder graph of ``s``, its weights from ``g`` (see the module docstring)."""
    T, i64 = g.T, np.int64
    hd, nh, nkv = s.head_dim, s.heads, s.kv_heads
    n_rep = nh // nkv
    inputs = [
        helper.make_tensor_value_info("input_ids", I64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", I64, ["batch_size", "total_sequence_length"]),
        helper.make_tensor_value_info("position_ids", I64, ["batch_size", "sequence_length"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", T, ["batch_size", "sequence_length", s.vocab])]
    x = g.op("Gather", [g.weight("model.embed_tokens.weight"), "input_ids"], "/model/embed_tokens/Gather")
    x = g.after_embed(x)

    pos = g.op("Cast", [g.op("Unsqueeze", ["position_ids", g.const(np.array([-1], i64))], "/model/rotary_emb/Unsqueeze")],
               "/model/rotary_emb/Cast", to=F)
    freqs = g.op("Mul", [pos, g.const(np.asarray(s.inv_freq, np.float32))], "/model/rotary_emb/Mul")
    emb = g.op("Concat", [freqs, freqs], "/model/rotary_emb/Concat", axis=-1)
    cos = g.to_t(g.op("Cos", [emb], "/model/rotary_emb/Cos"), "/model/rotary_emb/Cast_1")
    sin = g.to_t(g.op("Sin", [emb], "/model/rotary_emb/Sin"), "/model/rotary_emb/Cast_2")
    cos = g.op("Unsqueeze", [cos, g.const(np.array([1], i64))], "/model/rotary_emb/Unsqueeze_1")
    sin = g.op("Unsqueeze", [sin, g.const(np.array([1], i64))], "/model/rotary_emb/Unsqueeze_2")

    # key j is visible to the query at absolute position p iff j <= p and attention_mask[j]
    total = g.op("Gather", [g.op("Shape", ["attention_mask"], "/model/mask/Shape"), g.const(np.array(1, i64))],
                 "/model/mask/Gather", axis=0)
    kpos = g.op("Range", [g.const(np.array(0, i64)), total, g.const(np.array(1, i64))], "/model/mask/Range")
    kpos4 = g.op("Reshape", [kpos, g.const(np.array([1, 1, 1, -1], i64))], "/model/mask/Reshape")
    qpos4 = g.op("Unsqueeze", ["position_ids", g.const(np.array([1, 3], i64))], "/model/mask/Unsqueeze")
    causal = g.op("LessOrEqual", [kpos4, qpos4], "/model/mask/LessOrEqual")
    pad = g.op("Cast", [g.op("Unsqueeze", ["attention_mask", g.const(np.array([1, 2], i64))], "/model/mask/Unsqueeze_1")],
               "/model/mask/Cast", to=TensorProto.BOOL)
    allowed = g.op("And", [causal, pad], "/model/mask/And")
    # the mask in the graph's type (its lowest finite value, as transformers' eager attention):
    # scores, mask and Softmax stay in T, the form the attention fusion reads (GroupQueryAttention
    # accumulates its softmax in float32 whatever T)
    low = lowest(ir.DataType(T))
    mask_bias = g.op("Where", [allowed, g.const(np.float32(0.0), T), g.const(np.float32(low), T)],
                     "/model/mask/Where")

    scale = 1.0 / math.sqrt(math.sqrt(hd))  # applied to q and to kᵀ: q·kᵀ/√d
    for i in range(s.layers):
        p, hf = f"/model/layers.{i}", f"model.layers.{i}"
        res = x
        xn = _rms_norm(g, x, f"{hf}.input_layernorm.weight", s.eps, f"{p}/input_layernorm")
        q = _linear(g, xn, f"{hf}.self_attn.q_proj", f"{p}/self_attn/q_proj")
        k = _linear(g, xn, f"{hf}.self_attn.k_proj", f"{p}/self_attn/k_proj")
        v = _linear(g, xn, f"{hf}.self_attn.v_proj", f"{p}/self_attn/v_proj")
        heads = []
        for t, n, tag in ((q, nh, ""), (k, nkv, "_1"), (v, nkv, "_2")):
            r = g.op("Reshape", [t, g.const(np.array([0, 0, n, hd], i64))], f"{p}/self_attn/Reshape{tag}")
            heads.append(g.op("Transpose", [r], f"{p}/self_attn/Transpose{tag}", perm=[0, 2, 1, 3]))
        q, k, v = heads
        q = _rotate(g, q, cos, sin, hd // 2, f"{p}/self_attn/rotary_q")
        k = _rotate(g, k, cos, sin, hd // 2, f"{p}/self_attn/rotary_k")
        if kv_cache:
            for kind, t in (("key", k), ("value", v)):
                inputs.append(helper.make_tensor_value_info(
                    f"past_key_values.{i}.{kind}", T, ["batch_size", nkv, "past_sequence_length", hd]))
                outputs.append(helper.make_tensor_value_info(
                    f"present.{i}.{kind}", T, ["batch_size", nkv, "total_sequence_length", hd]))
                g.nodes.append(helper.make_node("Concat", [f"past_key_values.{i}.{kind}", t], [f"present.{i}.{kind}"],
                                                name=f"{p}/self_attn/Concat_{kind}", axis=-2))
            k, v = f"present.{i}.key", f"present.{i}.value"
        if n_rep > 1:
            rep = []
            for t, tag in ((k, "k"), (v, "v")):
                u = g.op("Unsqueeze", [t, g.const(np.array([2], i64))], f"{p}/self_attn/repeat_{tag}/Unsqueeze")
                e = g.op("Expand", [u, g.const(np.array([1, 1, n_rep, 1, 1], i64))], f"{p}/self_attn/repeat_{tag}/Expand")
                rep.append(g.op("Reshape", [e, g.const(np.array([0, nh, -1, hd], i64))],
                                f"{p}/self_attn/repeat_{tag}/Reshape"))
            k, v = rep
        qs = g.op("Mul", [q, g.const(np.float32(scale), T)], f"{p}/self_attn/Mul_q")
        kt = g.op("Mul", [g.op("Transpose", [k], f"{p}/self_attn/Transpose_k", perm=[0, 1, 3, 2]),
                          g.const(np.float32(scale), T)], f"{p}/self_attn/Mul_k")
        scores = g.op("MatMul", [qs, kt], f"{p}/self_attn/MatMul")
        probs = g.op("Softmax", [g.op("Add", [scores, mask_bias], f"{p}/self_attn/Add_mask")],
                     f"{p}/self_attn/Softmax", axis=-1)
        attn = g.op("MatMul", [probs, v], f"{p}/self_attn/MatMul_1")
        attn = g.op("Reshape", [g.op("Transpose", [attn], f"{p}/self_attn/Transpose_o", perm=[0, 2, 1, 3]),
                                g.const(np.array([0, 0, nh * hd], i64))], f"{p}/self_attn/Reshape_o")
        o = _linear(g, attn, f"{hf}.self_attn.o_proj", f"{p}/self_attn/o_proj")
        x = g.op("Add", [res, o], f"{p}/Add")
        res = x
        xn = _rms_norm(g, x, f"{hf}.post_attention_layernorm.weight", s.eps, f"{p}/post_attention_layernorm")
        gate = _linear(g, xn, f"{hf}.mlp.gate_proj", f"{p}/mlp/gate_proj")
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{p}/mlp/act_fn/Sigmoid")], f"{p}/mlp/act_fn/Mul")
        up = _linear(g, xn, f"{hf}.mlp.up_proj", f"{p}/mlp/up_proj")
        down = _linear(g, g.op("Mul", [act, up], f"{p}/mlp/Mul"), f"{hf}.mlp.down_proj", f"{p}/mlp/down_proj")
        x = g.op("Add", [res, down], f"{p}/Add_1")

    xn = _rms_norm(g, x, "model.norm.weight", s.eps, "/model/norm")
    if s.tie or not g.has("lm_head.weight"):
        wt = g.op("Transpose", ["model.embed_tokens.weight"], "/lm_head/Transpose", perm=[1, 0])
    else:
        wt = g.weight("lm_head.weight", transpose=True)
    g.nodes.append(helper.make_node("MatMul", [xn, wt], ["logits"], name="/lm_head/MatMul"))
    g.linears["lm_head"] = "/lm_head/MatMul"
    graph = helper.make_graph(g.nodes, graph_name, inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name=producer)
    model.ir_version = 8
    return model
