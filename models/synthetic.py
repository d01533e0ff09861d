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
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from qcompiler.decoder_graph import F, GraphBuilder, LlamaShape, build_decoder


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


class _G(GraphBuilder):
    """The synthetic model's weights for :func:`qcompiler.decoder_graph.build_decoder`.

    Each weight is drawn from the seeded generator the moment the graph asks for it (the
    graph asks in the order of the forward pass, so a seed gives the same numbers whatever
    builds them), with the hard cases of the module docstring injected; initializers are
    named by their graph path (``/model/layers.0/self_attn/q_proj.weight``) and nodes
    ``{path}_{n}``.
    """

    def __init__(self) -> None:
        super().__init__(F)
        self.start(SyntheticConfig())

    def start(self, cfg: SyntheticConfig) -> None:
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)
        self._mlp: dict[str, np.ndarray] = {}  # up/down, drawn with gate

    def op(self, op: str, inputs: list[str], name: str, **attrs: object) -> str:
        self._n += 1
        node = f"{name}_{self._n}"
        self.nodes.append(helper.make_node(op, inputs, [f"{node}_out"], name=node, **attrs))
        return f"{node}_out"

    def has(self, name: str) -> bool:
        return name == "lm_head.weight" and not self.cfg.tie_embeddings

    def after_embed(self, x: str) -> str:
        """The massive activation: ``massive_value`` on ``massive_dim`` of the token at position 0."""
        cfg = self.cfg
        if cfg.massive_dim is None:
            return x
        first = self.op("Cast", [self.op("Equal", ["position_ids", self.const(np.array(0, np.int64))],
                                         "/model/massive/Equal")], "/model/massive/Cast", to=F)
        onehot = np.zeros(cfg.hidden, np.float32)
        onehot[cfg.massive_dim] = cfg.massive_value
        bump = self.op("Mul", [self.op("Unsqueeze", [first, self.const(np.array([-1], np.int64))],
                                       "/model/massive/Unsqueeze"), self.const(onehot, base="massive_bump")],
                       "/model/massive/Mul")
        return self.op("Add", [x, bump], "/model/massive/Add")

    def weight(self, name: str, transpose: bool = False) -> str:
        return self.init(self._draw(name), _graph_name(name))

    def _draw(self, name: str) -> np.ndarray:
        cfg, rng, h = self.cfg, self.rng, self.cfg.hidden

        def w(k: int, n: int) -> np.ndarray:
            return (rng.standard_normal((k, n)) * cfg.weight_std / np.sqrt(k)).astype(np.float32)

        if name == "model.embed_tokens.weight":
            return rng.standard_normal((cfg.vocab, h)).astype(np.float32)
        if name == "model.norm.weight":
            return (1.0 + 0.1 * rng.standard_normal(h)).astype(np.float32)
        if name == "lm_head.weight":
            return (rng.standard_normal((h, cfg.vocab)) / np.sqrt(h)).astype(np.float32)
        m = re.fullmatch(r"model\.layers\.(\d+)\.(\w+)\.?(\w*)\.weight", name)
        if m is None:
            raise KeyError(f"the synthetic model has no weight {name}")
        layer, part, proj = int(m[1]), m[2], m[3]
        if part.endswith("layernorm"):
            gm = (1.0 + 0.1 * rng.standard_normal(h)).astype(np.float32)
            gm[list(cfg.outlier_dims)] = cfg.outlier_gamma
            return gm
        q, kv = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        if proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            return w(*{"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}[proj])
        if proj == "gate_proj":
            wg, wu, wd = w(h, cfg.intermediate), w(h, cfg.intermediate), w(cfg.intermediate, h)
            if cfg.super_weight is not None and cfg.super_weight[0] == layer:
                _, row, col = cfg.super_weight
                wg[:, row] *= 4.0
                wu[:, row] *= 4.0
                wd[row, col] = cfg.super_weight_value
            self._mlp = {"up_proj": wu, "down_proj": wd}
            return wg
        return self._mlp.pop(proj)


def _graph_name(hf: str) -> str:
    """``model.layers.0.self_attn.q_proj.weight`` → ``/model/layers.0/self_attn/q_proj.weight``."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.*)", hf)
    if m:
        return f"/model/layers.{m[1]}/" + m[2].replace("self_attn.", "self_attn/").replace("mlp.", "mlp/")
    return "/model/norm.weight" if hf == "model.norm.weight" else hf


def _truth_key(hf: str) -> str:
    """``model.layers.0.self_attn.q_proj`` → ``layers.0.q_proj`` (``lm_head`` stays)."""
    return hf.removeprefix("model.").replace("self_attn.", "").replace("mlp.", "")


def build_llama(cfg: SyntheticConfig = SyntheticConfig(), builder: _G | None = None) -> tuple[onnx.ModelProto, GroundTruth]:
    """Build the decoder graph (weights inline) and its ground truth.

    The graph is :func:`qcompiler.decoder_graph.build_decoder`'s, the one ``qc export --stream``
    writes.  ``builder`` receives every tensor as it is made (``models.streaming`` passes one that
    writes weights straight to an external-data file, so no model is ever held whole).
    """
    g = builder if builder is not None else _G()
    g.start(cfg)
    hd = cfg.head_dim
    inv_freq = (1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd))).astype(np.float32)
    shape = LlamaShape(model_type="llama", layers=cfg.layers, hidden=cfg.hidden, heads=cfg.heads,
                       kv_heads=cfg.kv_heads, head_dim=hd, intermediate=cfg.intermediate, vocab=cfg.vocab,
                       eps=cfg.eps, tie=cfg.tie_embeddings, inv_freq=tuple(float(v) for v in inv_freq))
    model = build_decoder(shape, g, cfg.kv_cache, graph_name="synthetic_llama", producer="qcompiler.models")
    names = {_truth_key(hf): node for hf, node in g.linears.items()}
    return model, GroundTruth(tuple(cfg.outlier_dims), cfg.massive_dim, 0, cfg.super_weight, names)


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
