"""Building the op library: nvcc compiles the CUDA kernels (sm_80, sm_90); clear errors otherwise."""

from __future__ import annotations

import ctypes
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from qcompiler.cli import main
from qcompiler.errors import QCError
from qcompiler.ops import NvccMissingError, build, build_library, find_nvcc, library_path, register_library
from tests.ops.test_ops_cpu import assert_matches, case, run_case

NVCC = find_nvcc()


@pytest.fixture
def seeded(tmp_path: Path, ops_lib: Path) -> Path:
    """A build folder holding an up-to-date copy of the CPU library (so tests compile only what they test)."""
    out = tmp_path / "build"
    out.mkdir()
    shutil.copy2(ops_lib, out / build.CPU_LIB)
    stamp = json.loads((ops_lib.parent / build.STAMP).read_text())
    stamp["cuda"] = None
    (out / build.STAMP).write_text(json.dumps(stamp))
    return out


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA_HOME, /usr/local/cuda, PATH): CUDA kernels not compiled")
def test_nvcc_compiles_cuda_kernels(seeded: Path) -> None:
    tmp_path = seeded
    res = build_library(tmp_path, cuda=True, archs=("80", "90"))
    assert res.cuda_library is not None and res.cuda_library.is_file()
    assert res.archs == ("80", "90")
    # the library embeds one cubin per architecture
    assert build.cubin_archs(res.cuda_library) == [80, 90]
    stamp = json.loads((tmp_path / "build.json").read_text())
    assert stamp["cuda"]["archs"] == ["80", "90"] and "release" in stamp["cuda"]["version"]
    # it loads into ONNX Runtime CPU (CUDA kernels registered for the CUDA provider, unused here)
    # and its CPU kernels run; the CUDA runtime is linked in and answers without a GPU
    rng = np.random.default_rng(0)
    y, ref = run_case(res.cuda_library, *case(rng, (9,), 70, 33, 2, True, np.float32))
    assert_matches(y, ref)
    lib = ctypes.CDLL(str(res.cuda_library))
    lib.qc_ops_build_info.restype = ctypes.c_char_p
    assert json.loads(lib.qc_ops_build_info())["cuda"] is True
    err = ctypes.create_string_buffer(256)
    assert lib.qc_cuda_device_count(err, 256) >= 0
    # a second build with the same request is a no-op
    again = build_library(tmp_path, cuda=True, archs=("80", "90"))
    assert "CUDA library up to date" in again.notes


def test_nvcc_missing_builds_cpu_ops_and_says_so(tmp_path: Path) -> None:
    with pytest.raises(NvccMissingError, match=r"nvcc not found .*the CPU ops were built at"):
        build_library(tmp_path, cuda=True, nvcc=tmp_path / "no-such-nvcc")
    lib = tmp_path / build.CPU_LIB
    assert lib.is_file() and not (tmp_path / build.CUDA_LIB).exists()
    y, ref = run_case(lib, *case(np.random.default_rng(1), (4,), 33, 9, 0, False, np.float32))
    assert_matches(y, ref)


def test_cli_nvcc_missing(seeded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["ops", "build", "--cuda", "--nvcc", str(seeded / "nvcc"), "--out", str(seeded)])
    err = capsys.readouterr().err
    assert rc == 2 and "nvcc not found" in err and "CPU ops were built" in err
    assert (seeded / build.CPU_LIB).is_file()


def test_missing_compiler(tmp_path: Path) -> None:
    with pytest.raises(QCError, match="no C\\+\\+ compiler 'no-such-g\\+\\+' found"):
        build_library(tmp_path, cuda=False, cxx="no-such-g++")


def test_library_not_built_names_build_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(build, "default_build_dirs", lambda: [tmp_path / "empty"])
    with pytest.raises(QCError, match="is not built: run 'qc ops build'"):
        library_path()
    with pytest.raises(QCError, match="qc ops build --cuda"):
        library_path(cuda=True)
    import onnxruntime as ort

    with pytest.raises(QCError, match="qc ops build"):
        register_library(ort.SessionOptions())


def test_stale_library_is_refused(monkeypatch: pytest.MonkeyPatch, seeded: Path) -> None:
    tmp_path = seeded
    monkeypatch.setattr(build, "default_build_dirs", lambda: [tmp_path])
    assert library_path() == tmp_path / build.CPU_LIB
    stamp = json.loads((tmp_path / build.STAMP).read_text())
    stamp["source_hash"] = "0" * 16
    (tmp_path / build.STAMP).write_text(json.dumps(stamp))
    with pytest.raises(QCError, match=r"out of date .*run 'qc ops build'"):
        library_path()


def test_register_library_returns_cpu_library(ops_lib: Path) -> None:
    import onnxruntime as ort

    assert register_library(ort.SessionOptions(), cuda=False) == ops_lib
