"""Partition check: which nodes of a model would not run on a target's execution provider.

With the target's provider present in the installed onnxruntime, a session is created
with it first and the CPU provider as fallback, ONNX Runtime records where it placed
every node (``session.record_ep_graph_assignment_info``), and every node placed
elsewhere is listed (names are those of ORT's optimized graph).  Without the provider,
the nodes are checked against an op-support table (:mod:`qcompiler.op_support`) and the
report says so: a table gives the op types (and the dtypes that matter for quantized
ops) a provider registers kernels for, not what a session would do.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from qcompiler.artifact import open_model_dir
from qcompiler.errors import InputError, QCError
from qcompiler.irutil import check_model_file, load_proto_header
from qcompiler.op_support import PROVIDERS, table_verdict
from qcompiler.targets import check_target

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    name: str
    op_type: str
    domain: str
    placed_on: str  # provider name, or "CPU (fallback)" / "unsupported" for a table verdict
    reason: str = ""


@dataclass
class PartitionReport:
    model: str
    target: str
    provider: str
    method: str  # "onnxruntime" | "op-support table"
    note: str
    total_nodes: int
    not_assigned: list[Placement] = field(default_factory=list)
    model_issues: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. the CPU's ISA and the integer-GEMM probe

    @property
    def ok(self) -> bool:
        return not self.not_assigned and not self.model_issues

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["assigned"] = self.total_nodes - len(self.not_assigned)
        d["ok"] = self.ok
        return d

    def render(self) -> str:
        lines = [
            f"model:    {self.model}",
            f"target:   {self.target} ({self.provider})",
            f"method:   {self.method}: {self.note}",
            f"nodes:    {self.total_nodes}, on {self.provider}: {self.total_nodes - len(self.not_assigned)}, "
            f"not on it: {len(self.not_assigned)}",
        ]
        lines += [f"          {note}" for note in self.notes]
        lines += [f"model:    {issue}" for issue in self.model_issues]
        groups: dict[tuple[str, str, str, str], list[str]] = {}
        for p in self.not_assigned:
            groups.setdefault((p.domain, p.op_type, p.placed_on, p.reason), []).append(p.name)
        for (domain, op, placed, reason), names in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            qual = f"{domain}.{op}" if domain else op
            shown = ", ".join(names[:4]) + (f", … (+{len(names) - 4})" if len(names) > 4 else "")
            lines.append(f"  {qual} ×{len(names)} → {placed}: {reason}  [{shown}]")
        if self.ok:
            lines.append(f"every node is assigned to {self.provider}" if self.method == "onnxruntime"
                         else f"every node is supported by {self.provider} according to the table")
        return "\n".join(lines)


def _runtime_check(path: Path, target: str, provider: str, uses_qc: bool) -> PartitionReport:
    import onnxruntime as ort

    from qcompiler.runtime import ort_message, session_options

    check_model_file(path)  # the same checks and messages as every other command, before ORT's own
    so = session_options(optimize=True)
    so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    extra = ""
    if uses_qc:
        from qcompiler.ops import register_library

        try:
            register_library(so, cuda=(target == "cuda"))
        except QCError:
            if target != "cuda":
                raise
            register_library(so, cuda=False)  # the ops then run (and are listed) on CPU
            extra = "; qcompiler's CUDA kernels are not built ('qc ops build --cuda'), so its ops use the CPU library"
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    try:
        sess = ort.InferenceSession(str(path), so, providers=providers)
    except Exception as e:  # ORT raises its own exception types
        raise InputError(f"ONNX Runtime cannot create a {provider} session for {path}: {ort_message(e)}") from None
    total, missing = 0, []
    for sub in sess.get_provider_graph_assignment_info():
        for n in sub.get_nodes():
            total += 1
            if sub.ep_name != provider:
                missing.append(Placement(n.name, n.op_type, n.domain, sub.ep_name, "placed by ONNX Runtime"))
    note = f"a {provider} session was created and ONNX Runtime's node assignment recorded (optimized graph){extra}"
    return PartitionReport(str(path.parent), target, provider, "onnxruntime", note, total, missing)


def _value_dtypes(proto: onnx.ModelProto) -> dict[str, int]:
    g = proto.graph
    types = {t.name: t.data_type for t in g.initializer}
    for vi in [*g.input, *g.value_info, *g.output]:
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for node in g.node:  # the producers whose output type is an attribute or a fixed type
        if node.op_type == "Cast" and node.domain in ("", "ai.onnx"):
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            if to is not None:
                types.setdefault(node.output[0], to)
        elif node.op_type == "QuantizeLinear" and len(node.input) > 2 and node.input[2] in types:
            types.setdefault(node.output[0], types[node.input[2]])
        elif node.op_type == "DynamicQuantizeLinear":
            types.setdefault(node.output[0], onnx.TensorProto.UINT8)
    return types


def _tensor(proto: onnx.ModelProto, name: str, base: Path) -> np.ndarray | None:
    for t in proto.graph.initializer:
        if t.name == name:
            try:
                return onnx.numpy_helper.to_array(t, base_dir=str(base))
            except (OSError, ValueError, TypeError) as e:  # external data missing or unreadable
                log.warning("partition check: cannot read initializer %s: %s", name, e)
                return None
    return None


def _table_check(path: Path, target: str, provider: str, why: str) -> PartitionReport:
    proto = load_proto_header(path)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    dtypes = _value_dtypes(proto)
    cuda_lib = False
    if target == "cuda":
        from qcompiler.ops import library_path

        try:
            cuda_lib = library_path(cuda=True).is_file()
        except QCError:
            cuda_lib = False
    missing: list[Placement] = []
    initializers = {t.name for t in proto.graph.initializer}
    for node in proto.graph.node:
        verdict = table_verdict(target, node, opset, dtypes, initializers, cuda_lib,
                                lambda name: _tensor(proto, name, path.parent))
        if verdict is not None:
            placed, reason = verdict
            missing.append(Placement(node.name, node.op_type, node.domain, placed, reason))
    issues = []
    if target == "npu":
        if opset > 21:
            issues.append(f"default opset {opset} is above 21 (NPU toolchains take opset <= 21)")
        for vi in proto.graph.input:
            dyn = [d.dim_param or "?" for d in vi.type.tensor_type.shape.dim if not d.HasField("dim_value")]
            if dyn:
                issues.append(f"input '{vi.name}' has dynamic dimensions {dyn} (quantize with --static-shapes)")
    note = f"{why}; verdicts come from {PROVIDERS[target]['table']}, not from running a session"
    return PartitionReport(str(path.parent), target, provider, "op-support table", note, len(proto.graph.node),
                           missing, issues)


def check_partition(model_dir: str | os.PathLike, target: str, use_table: bool = False) -> PartitionReport:
    """Partition report of ``model_dir`` for ``target`` (cpu | cuda | npu)."""
    import onnxruntime as ort

    check_target(target)
    md = open_model_dir(model_dir)
    path = md.model_path
    proto = load_proto_header(path)
    uses_qc = any(o.domain == "qcompiler" for o in proto.opset_import)
    available = ort.get_available_providers()
    wanted = PROVIDERS[target]["providers"]
    provider = next((p for p in wanted if p in available), wanted[0])
    if target == "npu":
        present = [p for p in wanted if p in available]
        why = (f"{present[0]} is installed but an NPU session needs device options, so none was run" if present
               else f"no NPU provider ({', '.join(wanted)}) is available in this onnxruntime")
        return _table_check(path, target, present[0] if present else "NPU (plain QDQ)", why)
    if use_table or provider not in available:
        why = (f"{provider} is not available in this onnxruntime (it has {', '.join(available)})"
               if provider not in available else "table requested")
        return _table_check(path, target, provider, why)
    return _runtime_check(path, target, provider, uses_qc)


def onnx_full_check(model_dir: str | os.PathLike) -> list[str]:
    """``onnx.checker.check_model(full_check=True)`` on the model file; problems as strings."""
    path = open_model_dir(model_dir).model_path
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        return [f"onnx.checker (full_check) fails: {str(e).splitlines()[0]}"]
    return []
