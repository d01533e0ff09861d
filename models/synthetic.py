"""Seeded tiny Llama-like ONNX decoders with the hard cases injected, for unit tests.

The graph mirrors what optimum exports for Llama (RMSNorm as Pow/ReduceMean/Add/
Sqrt/Div/Mul/Mul, rotary embedding with Slice/Neg/Concat, GQA repeat-kv with
Unsqueeze/Expand/Reshape, causal mask from ``position_ids`` and ``attention_mask``,
SiLU as ``x·sigmoid(x)``, KV cache as ``past_key_values.i.*`` → ``present.i.*``), at
2–4 layers and hidden 64–256, so every pass meets it in milliseconds.

Injected, and returned as :class:`GroundTruth`:

* **outlier channels**: the RMSNorm weights γ are large on ``outlier_dims``, so every
  linear input has ``|x| ≥ 6`` on those dims for most tokens in every layer (LLM.int8);
* **massive activation**: the residual stream of the token at position 0 gets
  ``massive_value`` added on ``massive_dim`` (≈1000× the median magnitude);
* **super weight**: one entry of one ``down_proj`` weight is ``super_weight_value``,
  and its input channel (the MLP product) is made to spike by scaling the matching
  gate/up columns.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT
I64 = TensorProto.INT64


@dataclass(frozen=True)
class SyntheticConfig:
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 160
    vocab: int = 256
    seed: int = 0
    kv_cache: bool = True
    tie_embeddings: bool = False
    eps: float = 1e-5
    rope_theta: float = 10000.0
    outlier_dims: tuple[int, ...] = (3, 17)
    outlier_gamma: float = 12.0
    massive_dim: int | None = 5
    massive_value: float = 800.0
    super_weight: tuple[int, int, int] | None = (1, 7, 9)  # (layer, row = input channel, col = output)
    super_weight_value: float = 4.0
    weight_std: float = 1.0  # multiplies 1/sqrt(fan_in)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass(frozen=True)
class GroundTruth:
    outlier_dims: tuple[int, ...]
    massive_dim: int | None
    massive_position: int
    super_weight: tuple[int, int, int] | None  # (layer, row, col) of down_proj's W[K, N]
    linear_names: dict[str, str] = field(default_factory=dict)  # "layers.0.q_proj" → MatMul node name


class _G:
    """Tiny graph-building helper with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self._n = 0

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def const(self, arr: np.ndarray, base: str = "const") -> str:
        n = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), n))
        return n

    def init(self, arr: np.ndarray, name: str) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def op(self, op: str, inputs: list[str], base: str | None = None, n_out: int = 1, **attrs: object) -> str | list[str]:
        node_name = self.name(base or op)
        outs = [f"{node_name}_out{i}" if n_out > 1 else f"{node_name}_out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=node_name, **attrs))
        return outs if n_out > 1 else outs[0]


def _rms_norm(g: _G, x: str, gamma: np.ndarray, eps: float, base: str) -> str:
    xc = g.op("Cast", [x], f"{base}/Cast", to=F)
    sq = g.op("Pow", [xc, g.const(np.array(2.0, np.float32))], f"{base}/Pow")
    mean = g.op("ReduceMean", [sq, g.const(np.array([-1], np.int64))], f"{base}/ReduceMean", keepdims=1)
    add = g.op("Add", [mean, g.const(np.array(eps, np.float32))], f"{base}/Add")
    sqrt = g.op("Sqrt", [add], f"{base}/Sqrt")
    inv = g.op("Div", [g.const(np.array(1.0, np.float32)), sqrt], f"{base}/Div")
    normed = g.op("Mul", [xc, inv], f"{base}/Mul")
    return g.op("Mul", [g.init(gamma.astype(np.float32), f"{base}.weight"), normed], f"{base}/Mul_1")


def _linear(g: _G, x: str, w: np.ndarray, name: str, names: dict[str, str], key: str) -> str:
    out = g.op("MatMul", [x, g.init(w.astype(np.float32), f"{name}.weight")], f"{name}/MatMul")
    names[key] = g.nodes[-1].name
    return out


def _rotate(g: _G, x: str, cos: str, sin: str, half: int, base: str) -> str:
    """x·cos + rotate_half(x)·sin with rotate_half(x) = [−x2, x1]."""
    x1 = g.op("Slice", [x, g.const(np.array([0], np.int64)), g.const(np.array([half], np.int64)),
                        g.const(np.array([-1], np.int64))], f"{base}/Slice")
    x2 = g.op("Slice", [x, g.const(np.array([half], np.int64)), g.const(np.array([2**62], np.int64)),
                        g.const(np.array([-1], np.int64))], f"{base}/Slice_1")
    rot = g.op("Concat", [g.op("Neg", [x2], f"{base}/Neg"), x1], f"{base}/Concat", axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos], f"{base}/Mul"), g.op("Mul", [rot, sin], f"{base}/Mul_1")], f"{base}/Add")


def build_llama(cfg: SyntheticConfig = SyntheticConfig(), builder: _G | None = None) -> tuple[onnx.ModelProto, GroundTruth]:
    """Build the decoder graph (weights inline) and its ground truth.

    ``builder`` receives every tensor as it is made (``models.streaming`` passes one that
    writes weights straight to an external-data file, so no model is ever held whole).
    """
    rng = np.random.default_rng(cfg.seed)
    g = builder if builder is not None else _G()
    h, hd, nh, nkv, inter = cfg.hidden, cfg.head_dim, cfg.heads, cfg.kv_heads, cfg.intermediate
    n_rep = nh // nkv
    names: dict[str, str] = {}

    def w(k: int, n: int) -> np.ndarray:
        return (rng.standard_normal((k, n)) * cfg.weight_std / np.sqrt(k)).astype(np.float32)

    def gamma() -> np.ndarray:
        gm = (1.0 + 0.1 * rng.standard_normal(h)).astype(np.float32)
        gm[list(cfg.outlier_dims)] = cfg.outlier_gamma
        return gm

    inputs = [
        helper.make_tensor_value_info("input_ids", I64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", I64, ["batch_size", "total_sequence_length"]),
        helper.make_tensor_value_info("position_ids", I64, ["batch_size", "sequence_length"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", F, ["batch_size", "sequence_length", cfg.vocab])]

    embed = (rng.standard_normal((cfg.vocab, h))).astype(np.float32)
    x = g.op("Gather", [g.init(embed, "model.embed_tokens.weight"), "input_ids"], "/model/embed_tokens/Gather")
    if cfg.massive_dim is not None:
        first = g.op("Cast", [g.op("Equal", ["position_ids", g.const(np.array(0, np.int64))], "/model/massive/Equal")],
                     "/model/massive/Cast", to=F)
        onehot = np.zeros(h, np.float32)
        onehot[cfg.massive_dim] = cfg.massive_value
        bump = g.op("Mul", [g.op("Unsqueeze", [first, g.const(np.array([-1], np.int64))], "/model/massive/Unsqueeze"),
                            g.const(onehot, "massive_bump")], "/model/massive/Mul")
        x = g.op("Add", [x, bump], "/model/massive/Add")

    # rotary tables from position_ids: [B, 1, S, hd]
    inv_freq = (1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd))).astype(np.float32)
    pos = g.op("Cast", [g.op("Unsqueeze", ["position_ids", g.const(np.array([-1], np.int64))], "/rotary/Unsqueeze")],
               "/rotary/Cast", to=F)
    freqs = g.op("Mul", [pos, g.const(inv_freq, "inv_freq")], "/rotary/Mul")
    emb = g.op("Concat", [freqs, freqs], "/rotary/Concat", axis=-1)
    cos = g.op("Unsqueeze", [g.op("Cos", [emb], "/rotary/Cos"), g.const(np.array([1], np.int64))], "/rotary/Unsqueeze_1")
    sin = g.op("Unsqueeze", [g.op("Sin", [emb], "/rotary/Sin"), g.const(np.array([1], np.int64))], "/rotary/Unsqueeze_2")

    # causal + padding mask: key j visible to query at absolute position p iff j <= p and mask[j]
    total = g.op("Gather", [g.op("Shape", ["attention_mask"], "/mask/Shape"), g.const(np.array(1, np.int64))],
                 "/mask/Gather", axis=0)
    kpos = g.op("Range", [g.const(np.array(0, np.int64)), total, g.const(np.array(1, np.int64))], "/mask/Range")
    kpos4 = g.op("Reshape", [kpos, g.const(np.array([1, 1, 1, -1], np.int64))], "/mask/Reshape")
    qpos4 = g.op("Unsqueeze", ["position_ids", g.const(np.array([1, 3], np.int64))], "/mask/Unsqueeze")
    causal = g.op("LessOrEqual", [kpos4, qpos4], "/mask/LessOrEqual")
    pad = g.op("Cast", [g.op("Unsqueeze", ["attention_mask", g.const(np.array([1, 2], np.int64))], "/mask/Unsqueeze_1")],
               "/mask/Cast", to=TensorProto.BOOL)
    allowed = g.op("And", [causal, pad], "/mask/And")
    mask_bias = g.op("Where", [allowed, g.const(np.array(0.0, np.float32)), g.const(np.array(-3.0e38, np.float32))],
                     "/mask/Where")

    scale = np.array(1.0 / np.sqrt(np.sqrt(hd)), np.float32)
    for i in range(cfg.layers):
        p = f"/model/layers.{i}"
        res = x
        xn = _rms_norm(g, x, gamma(), cfg.eps, f"{p}/input_layernorm")
        q = _linear(g, xn, w(h, nh * hd), f"{p}/self_attn/q_proj", names, f"layers.{i}.q_proj")
        k = _linear(g, xn, w(h, nkv * hd), f"{p}/self_attn/k_proj", names, f"layers.{i}.k_proj")
        v = _linear(g, xn, w(h, nkv * hd), f"{p}/self_attn/v_proj", names, f"layers.{i}.v_proj")
        q = g.op("Transpose", [g.op("Reshape", [q, g.const(np.array([0, 0, nh, hd], np.int64))], f"{p}/Reshape")],
                 f"{p}/Transpose", perm=[0, 2, 1, 3])
        k = g.op("Transpose", [g.op("Reshape", [k, g.const(np.array([0, 0, nkv, hd], np.int64))], f"{p}/Reshape_1")],
                 f"{p}/Transpose_1", perm=[0, 2, 1, 3])
        v = g.op("Transpose", [g.op("Reshape", [v, g.const(np.array([0, 0, nkv, hd], np.int64))], f"{p}/Reshape_2")],
                 f"{p}/Transpose_2", perm=[0, 2, 1, 3])
        q = _rotate(g, q, cos, sin, hd // 2, f"{p}/rotary_q")
        k = _rotate(g, k, cos, sin, hd // 2, f"{p}/rotary_k")
        if cfg.kv_cache:
            for kind, t in (("key", k), ("value", v)):
                inputs.append(helper.make_tensor_value_info(
                    f"past_key_values.{i}.{kind}", F, ["batch_size", nkv, "past_sequence_length", hd]))
                outputs.append(helper.make_tensor_value_info(
                    f"present.{i}.{kind}", F, ["batch_size", nkv, "total_sequence_length", hd]))
                g.nodes.append(helper.make_node("Concat", [f"past_key_values.{i}.{kind}", t], [f"present.{i}.{kind}"],
                                                name=f"{p}/Concat_{kind}", axis=-2))
            k, v = f"present.{i}.key", f"present.{i}.value"

        def repeat(t: str, tag: str, _p: str = p) -> str:
            if n_rep == 1:
                return t
            u = g.op("Unsqueeze", [t, g.const(np.array([2], np.int64))], f"{_p}/repeat_{tag}/Unsqueeze")
            e = g.op("Expand", [u, g.const(np.array([1, 1, n_rep, 1, 1], np.int64))], f"{_p}/repeat_{tag}/Expand")
            return g.op("Reshape", [e, g.const(np.array([0, nh, -1, hd], np.int64))], f"{_p}/repeat_{tag}/Reshape")

        k, v = repeat(k, "k"), repeat(v, "v")
        qs = g.op("Mul", [q, g.const(scale)], f"{p}/Mul_q")
        kt = g.op("Mul", [g.op("Transpose", [k], f"{p}/Transpose_k", perm=[0, 1, 3, 2]), g.const(scale)], f"{p}/Mul_k")
        scores = g.op("Add", [g.op("MatMul", [qs, kt], f"{p}/MatMul_qk"), mask_bias], f"{p}/Add_mask")
        probs = g.op("Softmax", [scores], f"{p}/Softmax", axis=-1)
        attn = g.op("MatMul", [probs, v], f"{p}/MatMul_pv")
        attn = g.op("Reshape", [g.op("Transpose", [attn], f"{p}/Transpose_o", perm=[0, 2, 1, 3]),
                                g.const(np.array([0, 0, nh * hd], np.int64))], f"{p}/Reshape_o")
        o = _linear(g, attn, w(nh * hd, h), f"{p}/self_attn/o_proj", names, f"layers.{i}.o_proj")
        x = g.op("Add", [res, o], f"{p}/Add")

        res = x
        xn = _rms_norm(g, x, gamma(), cfg.eps, f"{p}/post_attention_layernorm")
        wg, wu, wd = w(h, inter), w(h, inter), w(inter, h)
        if cfg.super_weight is not None and cfg.super_weight[0] == i:
            _, row, col = cfg.super_weight
            wg[:, row] *= 4.0
            wu[:, row] *= 4.0
            wd[row, col] = cfg.super_weight_value
        gate = _linear(g, xn, wg, f"{p}/mlp/gate_proj", names, f"layers.{i}.gate_proj")
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{p}/mlp/act_fn/Sigmoid")], f"{p}/mlp/act_fn/Mul")
        up = _linear(g, xn, wu, f"{p}/mlp/up_proj", names, f"layers.{i}.up_proj")
        prod = g.op("Mul", [act, up], f"{p}/mlp/Mul")
        down = _linear(g, prod, wd, f"{p}/mlp/down_proj", names, f"layers.{i}.down_proj")
        x = g.op("Add", [res, down], f"{p}/Add_1")

    xn = _rms_norm(g, x, (1.0 + 0.1 * rng.standard_normal(h)).astype(np.float32), cfg.eps, "/model/norm")
    if cfg.tie_embeddings:
        wt = g.op("Transpose", ["model.embed_tokens.weight"], "/lm_head/Transpose", perm=[1, 0])
        g.nodes.append(helper.make_node("MatMul", [xn, wt], ["logits"], name="/lm_head/MatMul"))
    else:
        lm = (rng.standard_normal((h, cfg.vocab)) / np.sqrt(h)).astype(np.float32)
        g.nodes.append(helper.make_node("MatMul", [xn, g.init(lm, "lm_head.weight")], ["logits"], name="/lm_head/MatMul"))
    names["lm_head"] = "/lm_head/MatMul"

    graph = helper.make_graph(g.nodes, "synthetic_llama", inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="qcompiler.models")
    model.ir_version = 8
    truth = GroundTruth(tuple(cfg.outlier_dims), cfg.massive_dim, 0, cfg.super_weight, names)
    return model, truth


def byte_tokenizer_json(vocab: int = 256) -> str:
    """A byte-level tokenizer (one token per byte, no merges) as tokenizer.json text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    byte_vocab = {tok: i for i, tok in enumerate(sorted(alphabet))}
    if vocab < len(byte_vocab):
        raise ValueError(f"vocab must be >= {len(byte_vocab)} for a byte tokenizer")
    tok = Tokenizer(models.BPE(vocab=byte_vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def write_model_dir(model: onnx.ModelProto, out_dir: str | Path, cfg: SyntheticConfig | None = None) -> Path:
    """Write a model folder (model.onnx + model.onnx_data, tokenizer.json, config.json)."""
    import onnx_ir as ir

    from qcompiler.irutil import save_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_model(ir.serde.deserialize_model(model), out / "model.onnx")
    if cfg is not None:
        write_side_files(out, cfg)
    return out


def write_side_files(out: Path, cfg: SyntheticConfig) -> None:
    """tokenizer.json (byte-level) and config.json of a synthetic model folder."""
    (out / "tokenizer.json").write_text(byte_tokenizer_json(cfg.vocab))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.hidden,
        "intermediate_size": cfg.intermediate,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab,
        "rms_norm_eps": cfg.eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": 2048,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": "float32",
        "use_cache": cfg.kv_cache,
        "qcompiler_synthetic": asdict(cfg),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))


def build_model_dir(out_dir: str | Path, cfg: SyntheticConfig = SyntheticConfig()) -> tuple[Path, GroundTruth]:
    """Build a synthetic model folder; returns (folder, ground truth)."""
    model, truth = build_llama(cfg)
    return write_model_dir(model, out_dir, cfg), truth
