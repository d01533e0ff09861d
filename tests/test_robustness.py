"""Robustness: failing writes, signals, scratch spilling, streaming builds, and what a model file may not do.

Outputs are atomic: whatever goes wrong while a model is written (disk full, a size
limit, a read-only folder, Ctrl-C, SIGTERM), the command exits non-zero with one line
and leaves neither the output folder nor a temporary one.  Real failures are used where
this machine allows them without root (a tmpfs in a user namespace, ``RLIMIT_FSIZE``,
real signals); the same code paths are also driven by injected ``OSError``s.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from qcompiler.models.synthetic import SyntheticConfig, build_model_dir

import qcompiler.irutil as irutil
from qcompiler.cli import main
from tests.helpers import WINDOW

ROOT = Path(__file__).resolve().parents[1]
SMALL = SyntheticConfig(layers=1, hidden=64, intermediate=128, vocab=256, kv_cache=False, super_weight=None)


def _run(args: list[str], capsys) -> tuple[int, str]:
    rc = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, (err[-1] if err else "")


def _nothing_left(parent: Path, out: Path) -> None:
    assert not out.exists(), f"{out} was left behind"
    assert not [p.name for p in parent.iterdir() if ".partial-" in p.name or p.name.endswith(".tmp")]


def _qc(*args: str, preexec=None, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qcompiler", *args], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=preexec, cwd=ROOT)


# ----------------------------------------------------------------------------- failing writes (injected)


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


def _fail_model_writer(monkeypatch) -> None:
    """ENOSPC after the first tensor reached the external-data file (a half-written model)."""
    real_save = ir.save

    def save(model, path, **kw):
        inner = kw.get("callback")

        def callback(tensor, info):
            if inner is not None:
                inner(tensor, info)
            _enospc()

        kw["callback"] = callback
        return real_save(model, path, **kw)

    monkeypatch.setattr(irutil.ir, "save", save)


def _fail_side_files(monkeypatch) -> None:
    import qcompiler.artifact as art

    def copy2(src, dst, **_k):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(art.shutil, "copy2", copy2)


def _fail_json(monkeypatch) -> None:
    import qcompiler.artifact as art

    monkeypatch.setattr(art.os, "replace", _enospc)


def _fail_scratch(monkeypatch) -> None:
    """The real store, with its file's writes failing."""
    real_init = irutil.SpillStore.__init__

    class FullFile:
        def __init__(self, f) -> None:
            self.f, self.closed = f, False

        def tell(self) -> int:
            return 0

        def seek(self, offset: int) -> None:
            pass

        def write(self, data) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self) -> None:
            self.f.close()

    def init(self, *a, **k):
        real_init(self, *a, **k)
        self._file = FullFile(self._file)

    monkeypatch.setattr(irutil, "SPILL_MIN_BYTES", 1024)
    monkeypatch.setattr(irutil.SpillStore, "__init__", init)


@pytest.mark.parametrize("inject", [_fail_model_writer, _fail_side_files, _fail_json, _fail_scratch],
                         ids=["model-writer", "side-files", "quantization-json", "scratch"])
def test_disk_full_injected(inject, synthetic_dir, tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "out"
    inject(monkeypatch)
    rc, err = _run(["quantize", str(synthetic_dir[0]), str(out), "--recipe", "w4a16-rtn"], capsys)
    assert rc == 4 and err.startswith("qc: error: ") and "No space left on device" in err, err
    assert ".partial-" not in err, f"the message names the temporary folder: {err}"
    _nothing_left(tmp_path, out)


def _unshare_ok() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    return probe.returncode == 0


needs_userns = pytest.mark.skipif(not _unshare_ok(), reason="no unprivileged user+mount namespaces here")


def _in_tmpfs(mount: Path, options: str, *qc_args: str) -> subprocess.CompletedProcess:
    """Run ``qc`` with a fresh tmpfs mounted at ``mount`` (private to a user+mount namespace)."""
    script = ('mount -t tmpfs -o "$1" qc-test "$2" || exit 99; shift 2; "$@"; rc=$?; '
              'echo "LEFT:$(ls -A "$MNT" | tr "\\n" " ")"; exit $rc')
    env = {**os.environ, "MNT": str(mount)}
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", options, str(mount),
                           sys.executable, "-m", "qcompiler", *qc_args],
                          capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)


@needs_userns
def test_disk_full_on_a_real_small_tmpfs(synthetic_dir, tmp_path: Path) -> None:
    mount = tmp_path / "mnt"
    mount.mkdir()
    proc = _in_tmpfs(mount, "size=64k", "quantize", str(synthetic_dir[0]), str(mount / "out"), "--recipe", "w4a16-rtn")
    if proc.returncode == 99:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()[-200:]}")
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 4 and "No space left on device" in last and "Traceback" not in proc.stderr, proc.stderr
    assert f"{mount}/out" in last
    assert proc.stdout.strip().splitlines()[-1] == "LEFT:", proc.stdout  # nothing in the full file system


@needs_userns
def test_read_only_output_on_a_real_read_only_mount(synthetic_dir, tmp_path: Path) -> None:
    mount = tmp_path / "mnt"
    mount.mkdir()
    proc = _in_tmpfs(mount, "ro", "quantize", str(synthetic_dir[0]), str(mount / "out"), "--recipe", "w4a16-rtn")
    if proc.returncode == 99:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()[-200:]}")
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"qc: error: cannot write into {mount}: read-only file system"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod 0555 (covered by the mount and injection tests)")
def test_read_only_output_folder_chmod(synthetic_dir, tmp_path: Path, capsys) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc, err = _run(["quantize", str(synthetic_dir[0]), str(ro / "out"), "--recipe", "w4a16-rtn"], capsys)
    finally:
        ro.chmod(0o755)
    assert rc == 4 and "permission denied" in err


def test_unwritable_output_folder_injected(synthetic_dir, tmp_path: Path, monkeypatch, capsys) -> None:
    """The same check as a chmod 0555 folder for a user who is not root."""
    import qcompiler.artifact as art

    monkeypatch.setattr(art.os, "access", lambda path, mode: False)
    rc, err = _run(["quantize", str(synthetic_dir[0]), str(tmp_path / "out"), "--recipe", "w4a16-rtn"], capsys)
    assert rc == 4 and err == f"qc: error: cannot write into {tmp_path}: permission denied"
    _nothing_left(tmp_path, tmp_path / "out")


def test_file_size_limit_mid_write(synthetic_dir, tmp_path: Path) -> None:
    """A real write failure without root: RLIMIT_FSIZE makes the external-data write fail (EFBIG)."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))

    out = tmp_path / "out"
    proc = _qc("quantize", str(synthetic_dir[0]), str(out), "--recipe", "w4a16-rtn", preexec=limit)
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"qc: error: cannot write {out}/model.onnx: File too large"
    _nothing_left(tmp_path, out)


# ----------------------------------------------------------------------------- signals during a write

_SIGNAL_DRIVER = textwrap.dedent("""
    import os, signal, sys
    import onnx_ir as ir
    real_save, sig, written = ir.save, getattr(signal, sys.argv[1]), []

    def save(model, path, **kw):
        inner = kw.get("callback")

        def callback(tensor, info):
            inner(tensor, info)
            written.append(tensor.name)
            if len(written) == 3:  # a real signal while the external data is half written
                os.kill(os.getpid(), sig)

        kw["callback"] = callback
        return real_save(model, path, **kw)

    ir.save = save
    from qcompiler.cli import main
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.parametrize(("sig", "code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_signal_during_write_leaves_nothing(sig: str, code: int, synthetic_dir, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", _SIGNAL_DRIVER, sig, "quantize", str(synthetic_dir[0]), str(out),
                           "--recipe", "w4a16-rtn"], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == code, proc.stderr
    assert "interrupted; nothing was written" in proc.stderr and "Traceback" not in proc.stderr
    _nothing_left(tmp_path, out)


# ----------------------------------------------------------------------------- scratch spilling


def _digest(folder: Path) -> dict[str, str]:
    return {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in ("model.onnx", "model.onnx_data")}


@pytest.mark.parametrize("recipe", ["w4a16-rtn", "w8a8-dynamic", "w8a8-static-smooth"])
def test_spilling_changes_no_byte(recipe: str, synthetic_dir, synthetic_text, tmp_path: Path, monkeypatch,
                                  capsys) -> None:
    """Spilled tensors (every weight here) give the same files as tensors kept in memory
    (w8a8-static-smooth: split-outliers' spilled weights are then read by the calibrator)."""
    extra = ["--calib", str(synthetic_text), "--calib-samples", "4", "--seq-len", "32"] if "static" in recipe else []
    monkeypatch.setenv("QC_CALIB_CACHE", str(tmp_path / "calib-cache"))
    stores: list[irutil.SpillStore] = []
    real_init = irutil.SpillStore.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        stores.append(self)

    monkeypatch.setattr(irutil.SpillStore, "__init__", init)
    monkeypatch.setattr(irutil, "SPILL_MIN_BYTES", 1 << 40)
    assert _run(["quantize", str(synthetic_dir[0]), str(tmp_path / "mem"), "--recipe", recipe, *extra], capsys)[0] == 0
    monkeypatch.setattr(irutil, "SPILL_MIN_BYTES", 4096)
    assert _run(["quantize", str(synthetic_dir[0]), str(tmp_path / "spill"), "--recipe", recipe, *extra], capsys)[0] == 0
    assert stores[0].bytes_spilled == 0 and stores[1].bytes_spilled > 0
    assert _digest(tmp_path / "mem") == _digest(tmp_path / "spill")
    assert not (tmp_path / "spill" / ".scratch").exists()


def test_spilled_tensor_reads_back(tmp_path: Path) -> None:
    store = irutil.SpillStore(tmp_path / "s", min_bytes=16)
    graph = ir.Graph([], [], nodes=[])
    irutil.attach_spill(graph, store)
    q = np.arange(40, dtype=np.uint8).reshape(8, 5) % 16
    big = irutil.add_initializer(graph, "q", ir.Tensor(q, dtype=ir.DataType.UINT4))
    small = irutil.add_initializer(graph, "s", np.ones(2, np.float32))
    f = irutil.add_initializer(graph, "f", np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8))
    assert isinstance(big.const_value, ir.ExternalTensor) and isinstance(f.const_value, ir.ExternalTensor)
    assert not isinstance(small.const_value, ir.ExternalTensor)
    np.testing.assert_array_equal(big.const_value.numpy().astype(np.uint8), q)
    np.testing.assert_array_equal(f.const_value.numpy(), np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8))
    assert big.const_value.offset % 4096 == 0 and f.const_value.offset % 4096 == 0
    # nothing stays mapped or cached between reads; each read is the caller's own (writable) array
    a = f.const_value.numpy()
    assert f.const_value.raw is None and big.const_value.raw is None and a.flags.writeable
    a[:] = 0
    assert f.const_value.numpy().any()
    store.close()


def test_external_constant_attributes_survive_a_resave(tmp_path: Path) -> None:
    """Exporters past 2 GB put even ``Constant`` values in the data file; a re-save must keep them."""
    from onnx import helper, numpy_helper

    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "W")
    cval = np.arange(64, dtype=np.float32).reshape(1, 64)
    nodes = [
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(cval, "cv")),
        helper.make_node("MatMul", ["x", "W"], ["y"]),
        helper.make_node("Add", ["y", "c"], ["z"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 64])],
                              [helper.make_tensor_value_info("z", 1, [1, 64])], [w])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    # the same data-file name in both folders: a stale location would silently read the wrong file
    onnx.save(proto, src / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx_data", size_threshold=0, convert_attribute=True)
    irutil.save_model(irutil.load_model(src / "model.onnx"), dst / "model.onnx")
    shutil.rmtree(src)
    irutil.check_model_file(dst / "model.onnx")
    import onnxruntime as ort

    x = np.ones((1, 64), np.float32)
    out = ort.InferenceSession(str(dst / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(out, x @ np.ones((64, 64), np.float32) + cval)


# ----------------------------------------------------------------------------- streaming builder (small scale)


def test_streaming_builder_matches_in_memory_and_is_deterministic(tmp_path: Path) -> None:
    from onnx import numpy_helper
    from qcompiler.models.streaming import build_model_dir_streaming, model_bytes

    a, _ = build_model_dir_streaming(tmp_path / "a", SMALL)
    b, _ = build_model_dir_streaming(tmp_path / "b", SMALL)
    c, _ = build_model_dir(tmp_path / "c", SMALL)
    assert _digest(a) == _digest(b)  # same seed → byte-identical folder
    wa = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(a / "model.onnx")).graph.initializer}
    wc = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(c / "model.onnx")).graph.initializer}
    assert wa.keys() == wc.keys()
    assert all(wa[k].shape == wc[k].shape and np.array_equal(wa[k], wc[k]) for k in wa)
    total = sum(v.nbytes for v in wa.values())
    assert model_bytes(SMALL) <= total < model_bytes(SMALL) * 1.05
    header = onnx.load(str(a / "model.onnx"), load_external_data=False)
    ext = [t for t in header.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert ext and all(int({e.key: e.value for e in t.external_data}["offset"]) % 4096 == 0 for t in ext)


def test_streamed_model_quantizes_and_evaluates(tmp_path: Path, synthetic_text, capsys) -> None:
    """The code path of tools/bench_scale.py on a model of a few hundred kB."""
    import json

    from qcompiler.models.streaming import build_model_dir_streaming

    model, _ = build_model_dir_streaming(tmp_path / "float", SMALL)
    assert main(["quantize", str(model), str(tmp_path / "q"), "--recipe", "w4a16-rtn", "--group-size", "32"]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "q"), "--text", str(synthetic_text), "--max-tokens", "256",
                 "--seq-len", "64", "--reference", str(model)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert np.isfinite(res["perplexity"]) and res["top1_agreement"] > 0.5


# ----------------------------------------------------------------------------- security


_PICKLE = re.compile(
    r"^\s*(import|from)\s+(c?pickle|dill|joblib|cloudpickle)\b|torch\.load\(|pickle\.loads?\(|"
    r"allow_pickle\s*=\s*True|weights_only\s*=\s*False|trust_remote_code\s*=\s*True",
    re.MULTILINE,
)


def test_no_pickle_loading_anywhere() -> None:
    """No module unpickles anything, and nothing turns remote code on by itself."""
    files = [p for d in ("qcompiler", "passes", "models", "tools") for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 20
    hits = [f"{p.relative_to(ROOT)}: {m.group(0).strip()}" for p in files for m in _PICKLE.finditer(p.read_text())]
    assert not hits, hits


def test_trust_remote_code_is_off_unless_asked() -> None:
    import inspect

    from qcompiler.cli import build_parser
    from qcompiler.export import export, load_hf_model

    parser = build_parser()
    assert parser.parse_args(["export", "m", "o"]).trust_remote_code is False
    assert parser.parse_args(["export", "m", "o", "--trust-remote-code"]).trust_remote_code is True
    for fn in (export, load_hf_model):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False


def test_names_from_the_model_never_become_paths(synthetic_dir, tmp_path: Path, capsys) -> None:
    """Initializer and node names that look like paths stay names: every byte lands in the output."""
    folder = tmp_path / "work" / "m"
    shutil.copytree(synthetic_dir[0], folder)
    m = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    evil = ["../../escaped", "/tmp/abs-escaped", "..\\..\\win-escaped"]
    renames = {t.name: evil[i % len(evil)] + f"_{i}" for i, t in enumerate(m.graph.initializer)}
    for t in m.graph.initializer:
        t.name = renames[t.name]
    for node in m.graph.node:
        node.input[:] = [renames.get(x, x) for x in node.input]
        node.name = "../../" + node.name
    onnx.save(m, str(folder / "model.onnx"))
    before = {p for p in tmp_path.rglob("*")}
    out = tmp_path / "work" / "out"
    rc, err = _run(["quantize", str(folder), str(out), "--recipe", "w4a16-rtn", "--dump-ir", str(tmp_path / "work" / "ir")],
                   capsys)
    assert rc == 0, err
    new = {p for p in tmp_path.rglob("*")} - before
    assert all(p.is_relative_to(out) or p.is_relative_to(tmp_path / "work" / "ir") for p in new), sorted(new)
    assert sorted(p.name for p in out.iterdir()) == [".qcompiler-output", "config.json", "model.onnx",
                                                    "model.onnx_data", "quantization.json", "tokenizer.json"]
    assert not Path("/tmp/abs-escaped_1").exists()


def test_shared_weight_quantized_like_two_copies(synthetic_nokv_dir, tmp_path: Path, capsys) -> None:
    """One initializer read by two linears gives the same logits as two identical initializers."""
    from qcompiler.runtime import open_runner
    from tests.badinputs.cases import SHARED_FROM, SHARED_TO, with_shared_weight

    shared = with_shared_weight(synthetic_nokv_dir[0], tmp_path)
    copies = tmp_path / "copies"
    shutil.copytree(synthetic_nokv_dir[0], copies)
    m = onnx.load(str(copies / "model.onnx"))
    src = next(t for t in m.graph.initializer if t.name.endswith(SHARED_FROM))
    node = next(n for n in m.graph.node if SHARED_TO in n.name and n.op_type == "MatMul")
    dst = next(t for t in m.graph.initializer if t.name == node.input[1])
    dst.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(src), dst.name))
    (copies / "model.onnx_data").unlink()
    onnx.save(m, str(copies / "model.onnx"), save_as_external_data=True, location="model.onnx_data")
    for name, folder in (("qs", shared), ("qc", copies)):
        assert _run(["quantize", str(folder), str(tmp_path / name), "--recipe", "w4a16-rtn", "--group-size", "32"],
                    capsys)[0] == 0
    a = open_runner(tmp_path / "qs").logits(WINDOW)
    b = open_runner(tmp_path / "qc").logits(WINDOW)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())


def test_no_stray_files_in_the_working_folder(synthetic_dir, tmp_path: Path, monkeypatch, capsys) -> None:
    """ONNX Runtime's symbolic shape inference (used by the fusions) saves ``sym_shape_infer_temp.onnx``
    into the working folder when it cannot infer everything; the fusions run its inference loop
    without that step, and an incomplete inference must leave nothing there either."""
    from qcompiler.shapes import _symbolic_shape_inference_class

    SymbolicShapeInference = _symbolic_shape_inference_class()  # the copy the fusions use
    assert SymbolicShapeInference is not None
    calls: list[str] = []
    real = SymbolicShapeInference._infer_impl

    def incomplete(self, *args, **kwargs):
        calls.append(os.getcwd())
        real(self, *args, **kwargs)
        return False  # "not everything was inferred": the tool's own infer_shapes would save a file now

    monkeypatch.setattr(SymbolicShapeInference, "_infer_impl", incomplete)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    rc, err = _run(["quantize", str(synthetic_dir[0]), str(tmp_path / "out"), "--recipe", "w4a16-rtn"], capsys)
    assert rc == 0, err
    assert calls, "the fusions no longer use symbolic shape inference: drop this test"
    assert list(cwd.iterdir()) == []
