"""``qc export MODEL.gguf OUT --keep-gguf-quant``: llama.cpp's quantized blocks carried into the ONNX graph as they are.

The graph is traced as for any export (transformers dequantizes the GGUF to fp32, optimum
exports); then every weight that came from a quantized GGUF tensor is replaced by that
tensor's own blocks (``qcompiler.quant.gguf_blocks``), with no second rounding:

* ``MatMul(X, W)`` → ``MatMulNBits(X, B, s[, z])`` computing ``Y = X·Ŵ``, ``Ŵ = s·(u − z)``;
* ``Gather(E, ids)`` → ``GatherBlockQuantized(B, ids, s[, z])`` and the tied lm_head
  ``MatMul(X, Transpose(E))`` → ``MatMulNBits`` reading the very same ``B``/``s``/``z``
  (MatMulNBits' ``[N, blocks, blob]`` with N = vocabulary is GatherBlockQuantized's
  ``[V, H·bits/8]``);
* an 8-bit grid is two 4-bit planes, ``s·(u − 128) = 16s·(hi − 8) + s·lo`` (``gb.pack_planes``):
  two MatMulNBits (GatherBlockQuantized) whose outputs are added;
* a type with a float minimum per block (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K:
  ``Ŵ[k, n] = s·(u − z) + o[k/b, n]``) adds the exact correction

      X·Ŵ = MatMulNBits(X, u, s, z) + blocksum(X)·O,   blocksum(X)[…, j] = Σ_{k∈block j} X[…, k]

  with ``O[K/b, N]`` the offsets: one ``ReduceSum`` per activation and block size (shared
  by q/k/v and gate/up) and one small MatMul per linear, marked ``qcompiler.gguf_offset``
  so that ``canonicalize`` does not take it for a linear layer of the model.  (An
  embedding row gets ``+ offsets[id]`` repeated over its block.)  Float zero points
  (``z = −o/s``) would change the values by a rounding and, in ONNX Runtime 1.32, leave
  MatMulNBits' fast kernels (``tools/bench_gguf_offsets.py``).

Tensors are matched to graph weights by value, not by name: a GGUF tensor's gguf-py
dequantization (rows permuted back as transformers does for llama's q/k rotary layout)
must equal the exported fp32 weight bit for bit, which also proves the transcoding exact.
llama.cpp's q/k permutation acts on rows (output channels) only, so it is undone on the
integer blocks by moving whole rows.  A quantized type with no exact form (IQ*, TQ*, …)
is an error; with ``allow_requant`` it is re-quantized from its dequantized values
(RTN, 4-bit, asymmetric, groups of 32) and listed as not exact.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompiler.errors import QCError
from qcompiler.irutil import (
    GGUF_OFFSET_MARK,
    MS_DOMAIN,
    add_initializer,
    ensure_opset,
    linear_weight,
    remove_unused_initializers,
)
from qcompiler.quant import gguf_blocks as gb

log = logging.getLogger(__name__)

OFFSET_MARK = GGUF_OFFSET_MARK  # marks the exact offset-correction MatMul: not a linear layer of the model
_FLOAT_TYPES = ("F32", "F16", "BF16", "F64")
REQUANT_FORM = gb.BlockForm(4, 32, 0, True)  # the --allow-requant fallback: RTN uint4 g32, min as offset


@dataclass(frozen=True)
class GGUFWeight:
    """One 2-D GGUF tensor: ``name``, its type name, raw bytes ``[N, row bytes]``, logical ``(N, K)``."""

    name: str
    qtype: Any  # gguf.GGMLQuantizationType
    raw: np.ndarray
    shape: tuple[int, int]


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def read_gguf(path: str | Path) -> tuple[dict[str, Any], list[GGUFWeight]]:
    """(metadata: architecture, heads; the 2-D tensors) of a GGUF file, tensors memory-mapped."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch = _field(reader, "general.architecture", "")
    meta = {
        "arch": arch,
        "n_head": _field(reader, f"{arch}.attention.head_count"),
        "n_kv": _field(reader, f"{arch}.attention.head_count_kv"),
    }
    weights = []
    for t in reader.tensors:
        if len(t.shape) != 2:
            continue
        k, n = (int(x) for x in t.shape)  # ggml order: ne[0] = K (contiguous), ne[1] = N
        weights.append(GGUFWeight(t.name, t.tensor_type, np.asarray(t.data).reshape(n, -1), (n, k)))
    return meta, weights


def row_permutation(name: str, meta: dict[str, Any], n: int) -> np.ndarray | None:
    """transformers' reverse of llama.cpp's rotary permutation of q/k rows, as row indices.

    llama.cpp stores q (and k) rows per head as ``[h, 2, d/2]`` → ``[h, d/2, 2]``; the
    reverse is ``reshape(h, d/2, 2).swapaxes(1, 2)``, here applied to ``arange(N)``.
    """
    if meta["arch"] != "llama" or not meta["n_head"]:
        return None
    if ".attn_q." in name:
        heads = meta["n_head"]
    elif ".attn_k." in name:
        heads = meta["n_kv"] or meta["n_head"]
    else:
        return None
    return np.arange(n).reshape(heads, n // heads // 2, 2).swapaxes(1, 2).reshape(n)


def _key(w: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(w, dtype=np.float32).tobytes(), digest_size=16).hexdigest()


@dataclass
class _Users:
    gathers: list[ir.Node]
    matmuls: list[ir.Node]  # MatMul(X, W) with W = value.T, or MatMul(X, Transpose(E))


def _graph_weights(graph: ir.Graph) -> dict[str, _Users]:
    """``{value key of the weight as [N, K]: its Gathers and linears}``."""
    found: dict[str, _Users] = {}
    cache: dict[int, str] = {}

    def key_of(v: ir.Value, transposed: bool) -> str:
        if id(v) not in cache:
            a = v.const_value.numpy()
            cache[id(v)] = _key(a if transposed else a.T)
        return cache[id(v)]

    for node in graph:
        if node.domain != "":
            continue
        if node.op_type == "Gather" and node.attributes.get_int("axis", 0) == 0:
            data = node.inputs[0]
            if data is not None and data.const_value is not None and len(data.const_value.shape) == 2 \
                    and data.const_value.dtype == ir.DataType.FLOAT:
                found.setdefault(key_of(data, True), _Users([], [])).gathers.append(node)
        elif node.op_type == "MatMul":
            lw = linear_weight(node)
            if lw is not None and lw[0].const_value.dtype == ir.DataType.FLOAT:
                found.setdefault(key_of(*lw), _Users([], [])).matmuls.append(node)
    return found


def _requant(w: np.ndarray) -> gb.IntBlocks:
    """RTN uint4, groups of 32 along K, minimum as offset (exact min/max): the ``--allow-requant`` fallback."""
    n, k = w.shape
    g = w.reshape(n, k // 32, 32)
    lo, hi = g.min(-1), g.max(-1)
    s = ((hi - lo) / 15).astype(np.float32)
    inv = np.where(s == 0, 0, 1 / np.where(s == 0, 1, s))
    u = np.clip(np.rint((g - lo[..., None]) * inv[..., None]), 0, 15).astype(np.uint8)
    return gb.IntBlocks(u.reshape(n, k), s, lo.astype(np.float32), REQUANT_FORM, "requant")


class Transcoder:
    """Rewrites one graph; ``report`` maps each GGUF tensor to what it became."""

    def __init__(self, model: ir.Model, allow_requant: bool = False, accuracy_level: int = 0) -> None:
        self.model, self.graph = model, model.graph
        self.allow_requant, self.accuracy_level = allow_requant, accuracy_level
        self.report: dict[str, dict[str, Any]] = {}
        self._bsums: dict[tuple[int, int], ir.Value] = {}

    def run(self, gguf_path: str | Path) -> dict[str, dict[str, Any]]:
        meta, weights = read_gguf(gguf_path)
        users = _graph_weights(self.graph)
        unsupported = sorted({w.qtype.name for w in weights
                              if w.qtype.name not in _FLOAT_TYPES and not gb.supported(w.qtype)})
        if unsupported and not self.allow_requant:
            raise QCError(f"GGUF tensor type(s) {', '.join(unsupported)} have no exact ONNX form; "
                          "pass --allow-requant to re-quantize them (RTN int4 g32) or export without --keep-gguf-quant")
        for w in weights:
            if w.qtype.name in _FLOAT_TYPES:
                self.report[w.name] = {"gguf_type": w.qtype.name, "onnx": "float (as exported)", "exact": True}
                continue
            self._one(w, meta, users)
        if any(r.get("users") for r in self.report.values()):
            remove_unused_initializers(self.graph)
            ensure_opset(self.model, MS_DOMAIN, 1)
        return self.report

    def _one(self, w: GGUFWeight, meta: dict[str, Any], users: dict[str, _Users]) -> None:
        import gguf

        perm = row_permutation(w.name, meta, w.shape[0])
        exact = gb.supported(w.qtype)
        if exact:
            blocks = gb.decode(w.raw, w.qtype, w.shape)
            if perm is not None:
                blocks = blocks.permute_rows(perm)
            ref = blocks.dequantize()
        else:
            ref = gguf.quants.dequantize(w.raw, w.qtype).reshape(w.shape)
            if perm is not None:
                ref = ref[perm]
            blocks = _requant(ref)
        found = users.pop(_key(ref), None)
        del ref
        entry: dict[str, Any] = {"gguf_type": w.qtype.name, "exact": exact,
                                 "gguf_bits_per_weight": round(gb.gguf_bits_per_weight(w.qtype), 4),
                                 "onnx_bits_per_weight": round(gb.onnx_bits_per_weight(
                                     blocks.form, split_8bit=self.accuracy_level != 4), 4),
                                 "onnx": self._describe(blocks.form, self.accuracy_level), "users": []}
        if not exact:
            entry["requantized"] = "dequantized by gguf-py, then RTN uint4 g32 (min/max)"
        if found is None:
            log.warning("GGUF tensor %s (%s) matches no weight of the exported graph; left out", w.name, w.qtype.name)
            entry.update(onnx="not in the graph", users=[])
            self.report[w.name] = entry
            return
        base = w.name.removesuffix(".weight")
        planes = [_PlaneValues.add(self.graph, base, p)
                  for p in gb.pack_planes(blocks, split_8bit=self.accuracy_level != 4)]
        offsets = blocks.offset
        if offsets is not None and not np.any(offsets):
            offsets = None
        o_val = add_initializer(self.graph, f"{base}.offsets", np.ascontiguousarray(offsets.T)) \
            if offsets is not None else None
        n, k = blocks.shape
        for mm in found.matmuls:
            self._matmul(mm, planes, o_val, blocks.form.block, k, n)
            entry["users"].append(mm.name or "MatMul")
        for g in found.gathers:
            self._gather(g, planes, o_val, blocks.form.block, k, n, base)
            entry["users"].append(g.name or "Gather")
        self.report[w.name] = entry

    @staticmethod
    def _describe(form: gb.BlockForm, accuracy_level: int) -> str:
        if form.bits == 8 and accuracy_level == 4:
            what = f"8-bit, block {form.block}, accuracy_level 4 (int8 activations)"
        elif form.bits == 8:
            what = f"8-bit grid as two 4-bit planes (16s·(hi − 8) + s·lo), block {form.block}"
        else:
            zp = "" if form.zero_point == 8 else f", zero point {form.zero_point}"
            what = f"4-bit, block {form.block}{zp}"
        return f"MatMulNBits/GatherBlockQuantized {what}" + (", + per-block offset correction" if form.has_offset else "")

    def _matmul(self, mm: ir.Node, planes: list[_PlaneValues], o_val: ir.Value | None, block: int, k: int,
                n: int) -> None:
        x, name = mm.inputs[0], mm.name or "linear"
        nodes: list[ir.Node] = []
        for p in planes:
            nodes.append(ir.node("MatMulNBits", [x, *p.inputs()], domain=MS_DOMAIN, name=f"{name}_gguf{p.suffix}",
                                 attributes={"K": k, "N": n, "bits": p.bits, "block_size": block,
                                             "accuracy_level": self.accuracy_level}))
        terms = [nd.outputs[0] for nd in nodes]
        if o_val is not None:
            corr = ir.node("MatMul", [self._block_sums(x, block), o_val], name=f"{name}_offset")
            corr.metadata_props[OFFSET_MARK] = "1"
            nodes.append(corr)
            terms.append(corr.outputs[0])
        for i, t in enumerate(terms[1:]):
            nodes.append(ir.node("Add", [nodes[-1].outputs[0] if i else terms[0], t], name=f"{name}_add{i}"))
        _take_over(self.graph, mm, nodes, terms)
        transpose = mm.inputs[1].producer() if mm.inputs[1] is not None else None
        self.graph.remove(mm, safe=True)
        if transpose is not None and transpose.op_type == "Transpose" and not transpose.outputs[0].uses():
            self.graph.remove(transpose, safe=True)

    def _block_sums(self, x: ir.Value, block: int) -> ir.Value:
        """``ReduceSum(Reshape(X, [0, …, 0, −1, b]), −1)``, once per activation and block size."""
        key = (id(x), block)
        if key in self._bsums:
            return self._bsums[key]
        rank = len(x.shape) if x.shape is not None else 3
        shape = add_initializer(self.graph, "gguf_blocks_shape", np.array([0] * (rank - 1) + [-1, block], np.int64))
        axes = add_initializer(self.graph, "gguf_blocks_axes", np.array([-1], np.int64))
        reshape = ir.node("Reshape", [x, shape], name=f"{x.name}_blocks{block}")
        rsum = ir.node("ReduceSum", [reshape.outputs[0], axes], attributes={"keepdims": 0},
                       name=f"{x.name}_blocksum{block}")
        producer = x.producer()
        if producer is not None:
            self.graph.insert_after(producer, [reshape, rsum])
        else:
            self.graph.insert_before(next(iter(self.graph)), [reshape, rsum])
        self._bsums[key] = rsum.outputs[0]
        return rsum.outputs[0]

    def _gather(self, g: ir.Node, planes: list[_PlaneValues], o_val: ir.Value | None, block: int, k: int, n: int,
                base: str) -> None:
        """Rows of the same initializers the lm_head reads: ``Σ_planes GatherBlockQuantized`` (+ the row's offsets)."""
        rows = add_initializer(self.graph, f"{base}.rows_shape", np.array([n, -1], np.int64))
        ids = g.inputs[1]
        rank = len(ids.shape) if ids.shape is not None else 2
        row_shape = add_initializer(self.graph, f"{base}.row_shape", np.array([0] * rank + [k], np.int64))
        nodes: list[ir.Node] = []
        terms: list[ir.Value] = []
        for p in planes:
            reshaped = [ir.node("Reshape", [v, rows], name=f"{base}{p.suffix}_rows_{i}") for i, v in enumerate(p.inputs())]
            zp = [reshaped[2].outputs[0]] if len(reshaped) > 2 else []
            gbq = ir.node("GatherBlockQuantized", [reshaped[0].outputs[0], ids, reshaped[1].outputs[0], *zp],
                          domain=MS_DOMAIN, name=f"{g.name or base}_gguf{p.suffix}",
                          attributes={"gather_axis": 0, "quantize_axis": 1, "block_size": block, "bits": p.bits})
            # ORT's symbolic shape inference (which the fusions use) takes a 4-bit GatherBlockQuantized row for
            # K/2 values (packed bytes): a Reshape to [..., K] states the true shape
            fix = ir.node("Reshape", [gbq.outputs[0], row_shape], name=f"{g.name or base}_gguf{p.suffix}_shape")
            nodes += [*reshaped, gbq, fix]
            terms.append(fix.outputs[0])
        if o_val is not None:
            # row v gets O[j, v] on each value of its block j: Gather(O, ids, axis=1) [K/b, …ids] → […ids, K/b]
            # → […, K/b, 1] → expand to […, K/b, b] → […, K]; O is the lm_head's correction matrix, not a copy
            og = ir.node("Gather", [o_val, ids], attributes={"axis": 1}, name=f"{base}_offset_rows")
            tr = ir.node("Transpose", [og.outputs[0]], attributes={"perm": [*range(1, rank + 1), 0]})
            ax = add_initializer(self.graph, f"{base}.ax", np.array([-1], np.int64))
            un = ir.node("Unsqueeze", [tr.outputs[0], ax])
            ex = ir.node("Expand", [un.outputs[0], add_initializer(self.graph, f"{base}.expand",
                                                                     np.array([1, block], np.int64))])
            flat = add_initializer(self.graph, f"{base}.flat", np.array([0] * rank + [-1], np.int64))
            fl = ir.node("Reshape", [ex.outputs[0], flat])
            nodes += [og, tr, un, ex, fl]
            terms.append(fl.outputs[0])
        for i, t in enumerate(terms[1:]):
            nodes.append(ir.node("Add", [nodes[-1].outputs[0] if i else terms[0], t], name=f"{base}_gather_add{i}"))
        _take_over(self.graph, g, nodes, terms)
        self.graph.remove(g, safe=True)


@dataclass(frozen=True)
class _PlaneValues:
    """The initializers of one plane (``gb.Plane``) in the graph."""

    suffix: str
    b: ir.Value
    s: ir.Value
    z: ir.Value | None
    bits: int

    @staticmethod
    def add(graph: ir.Graph, base: str, p: gb.Plane) -> _PlaneValues:
        b = add_initializer(graph, f"{base}{p.suffix}.qweight", p.packed)
        s = add_initializer(graph, f"{base}{p.suffix}.scales", p.scales)
        z = add_initializer(graph, f"{base}{p.suffix}.zero_points", p.zero_points) if p.zero_points is not None else None
        return _PlaneValues(p.suffix, b, s, z, p.bits)

    def inputs(self) -> list[ir.Value]:
        return [self.b, self.s] + ([self.z] if self.z is not None else [])


def _take_over(graph: ir.Graph, old: ir.Node, nodes: list[ir.Node], terms: list[ir.Value]) -> None:
    """Insert ``nodes`` before ``old``; the last one's output takes ``old``'s name, users and type, and the
    ``terms`` summed into it (and the partial sums) its shape and type (shape inference does not see
    through contrib ops, and the fusions compare residual shapes)."""
    graph.insert_before(old, nodes)
    new_out, old_out = nodes[-1].outputs[0], old.outputs[0]
    for v in [*terms, *(n.outputs[0] for n in nodes if n.op_type == "Add")]:
        v.shape, v.type = old_out.shape, old_out.type
    old_out.replace_all_uses_with(new_out, replace_graph_outputs=True)
    name, old_out.name = old_out.name, None
    new_out.name = name
    new_out.shape, new_out.type = old_out.shape, old_out.type


def transcode(model: ir.Model, gguf_path: str | Path, allow_requant: bool = False,
              accuracy_level: int = 0) -> dict[str, Any]:
    """Replace the GGUF-quantized weights of ``model`` (exported from ``gguf_path``) in place; returns the report
    written to ``quantization.json``.  ``accuracy_level`` is MatMulNBits' (4: int8 activations, and 8-bit grids
    as one 8-bit plane, for which ONNX Runtime's kernel is fast only at that level)."""
    tensors = Transcoder(model, allow_requant, accuracy_level).run(gguf_path)
    quantized = {k: v for k, v in tensors.items() if v["gguf_type"] not in _FLOAT_TYPES}
    table: dict[str, dict[str, Any]] = {}
    for v in quantized.values():
        row = table.setdefault(v["gguf_type"], {"tensors": 0, "exact": v["exact"], "onnx": v["onnx"],
                                                "gguf_bits_per_weight": v["gguf_bits_per_weight"],
                                                "onnx_bits_per_weight": v["onnx_bits_per_weight"]})
        row["tensors"] += 1
    missing = [k for k, v in quantized.items() if not v["users"]]
    left = [n.name for n in model.graph if n.op_type == "MatMul" and linear_weight(n) is not None]
    if left:
        log.warning("%d linear(s) kept a float weight no GGUF tensor matched, e.g. %s", len(left), left[0])
    return {
        "recipe": "gguf-native",
        "accuracy_level": accuracy_level,
        "source_gguf": str(gguf_path),
        "exact": all(v["exact"] for v in quantized.values()) and not missing,
        "types": table,
        "tensors": tensors,
        "not_in_graph": missing,
        "kept_float": [k for k, v in tensors.items() if v["gguf_type"] in _FLOAT_TYPES],
        "float_linears_in_graph": left,
    }
