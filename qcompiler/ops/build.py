"""Build qcompiler's custom-op library with the machine's g++ and, when present, nvcc.

Two shared libraries come out of ``qcompiler/ops/csrc``:

* ``libqcompiler_ops.so``: the CPU kernels of every op (always built);
* ``libqcompiler_ops_cuda.so``: the same CPU kernels plus CUDA kernels registered for
  ``CUDAExecutionProvider`` (``qc_cuda.cu`` compiled for sm_80 and sm_90, CUDA runtime
  linked statically, so the library loads on machines without a GPU).

A ``build.json`` beside them records the sources' hash, the compilers and the flags;
:func:`library_path` refuses a library whose sources have changed since.  Builds write
to temporary files and rename them into place under a file lock, so concurrent test
runs and sessions never load a half-written library.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qcompiler.errors import QCError

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
CPU_LIB = "libqcompiler_ops.so"
CUDA_LIB = "libqcompiler_ops_cuda.so"
STAMP = "build.json"
DEFAULT_ARCHS = ("80", "90")
BUILD_COMMAND = "qc ops build"

CXX_FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-fvisibility=hidden", "-Wall", "-Wno-uninitialized",
             "-Wno-maybe-uninitialized")
NVCC_FLAGS = ("-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden")


class OpsBuildError(QCError):
    """The op library could not be built (compiler missing or failing)."""


class NvccMissingError(OpsBuildError):
    """A CUDA build was asked for but nvcc is not there; the CPU library was built."""


@dataclass(frozen=True)
class BuildResult:
    out_dir: Path
    cpu_library: Path
    cuda_library: Path | None
    archs: tuple[str, ...]
    source_hash: str
    seconds: float
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["out_dir"], d["cpu_library"] = str(self.out_dir), str(self.cpu_library)
        d["cuda_library"] = str(self.cuda_library) if self.cuda_library else None
        return d


def source_hash() -> str:
    """Hash of every source file under ``csrc`` (names and contents)."""
    h = hashlib.sha256()
    for p in sorted(CSRC.iterdir()):
        if p.is_file() and p.suffix in (".h", ".cc", ".cu"):
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def default_build_dirs() -> list[Path]:
    """Where libraries are built/looked for: ``$QC_OPS_DIR``, the package folder, the user cache."""
    dirs = []
    if os.environ.get("QC_OPS_DIR"):
        dirs.append(Path(os.environ["QC_OPS_DIR"]))
    dirs.append(Path(__file__).resolve().parent / "_build")
    dirs.append(Path.home() / ".cache" / "qcompiler" / "ops")
    return dirs


def _writable_build_dir() -> Path:
    for d in default_build_dirs():
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(d, os.W_OK):
            return d
    raise OpsBuildError("no writable folder for the op library; set QC_OPS_DIR to one")


def find_nvcc(nvcc: str | os.PathLike | None = None) -> Path | None:
    """nvcc from the argument, ``$QC_NVCC``, ``$CUDA_HOME``, ``/usr/local/cuda`` or ``PATH``."""
    if nvcc is not None:
        p = Path(nvcc)
        return p if p.is_file() and os.access(p, os.X_OK) else None
    candidates = [os.environ.get("QC_NVCC")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(str(Path(os.environ[var]) / "bin" / "nvcc"))
    candidates += ["/usr/local/cuda/bin/nvcc", shutil.which("nvcc")]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return Path(c)
    return None


def find_cxx(cxx: str | None = None) -> str:
    name = cxx or os.environ.get("CXX") or "g++"
    path = shutil.which(name)
    if path is None:
        raise OpsBuildError(f"no C++ compiler '{name}' found: install g++ (or set CXX) and run '{BUILD_COMMAND}'")
    return path


def _run(cmd: Sequence[str], what: str) -> str:
    log.debug("%s: %s", what, " ".join(cmd))
    try:
        res = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    except OSError as e:
        raise OpsBuildError(f"{what}: cannot run {cmd[0]}: {e.strerror or e}") from None
    if res.returncode != 0:
        tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-15:])
        raise OpsBuildError(f"{what} failed (exit {res.returncode}):\n{tail}")
    return res.stderr + res.stdout


def _version(tool: str) -> str:
    try:
        out = subprocess.run([tool, "--version"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return "unknown"
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    release = [ln for ln in lines if "release" in ln]  # nvcc: "Cuda compilation tools, release 13.0, V13.0.88"
    return (release or lines or ["unknown"])[0]


def _link_cpu(cxx: str, out: Path, extra: Sequence[str] = ()) -> None:
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        _run([cxx, *CXX_FLAGS, *extra, str(CSRC / "qc_ops.cc"), "-o", str(tmp)], f"compiling {out.name}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _build_cuda(cxx: str, nvcc: Path, out: Path, archs: Sequence[str]) -> None:
    cuda_home = nvcc.resolve().parent.parent
    lib_dirs = [d for d in (cuda_home / "lib64", cuda_home / "lib", cuda_home / "targets" / "x86_64-linux" / "lib")
                if (d / "libcudart_static.a").is_file()]
    if not lib_dirs:
        raise OpsBuildError(f"nvcc at {nvcc} has no libcudart_static.a beside it (looked in {cuda_home}/lib64)")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    with tempfile.TemporaryDirectory(prefix="qc-ops-", dir=out.parent) as tmpd:
        obj = Path(tmpd) / "qc_cuda.o"
        _run([str(nvcc), *NVCC_FLAGS, *gencode, f"-ccbin={cxx}", "-c", str(CSRC / "qc_cuda.cu"), "-o", str(obj)],
             f"nvcc compiling qc_cuda.cu for sm_{', sm_'.join(archs)}")
        extra = ["-DQC_WITH_CUDA", f"-I{cuda_home / 'include'}", str(obj), f"-L{lib_dirs[0]}", "-lcudart_static",
                 "-ldl", "-lrt", "-lpthread"]
        _link_cpu(cxx, out, extra)


def read_stamp(out_dir: Path) -> dict[str, object] | None:
    p = out_dir / STAMP
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def build_library(
    out_dir: str | os.PathLike | None = None,
    cuda: bool | None = None,
    nvcc: str | os.PathLike | None = None,
    cxx: str | None = None,
    archs: Sequence[str] = DEFAULT_ARCHS,
    force: bool = False,
) -> BuildResult:
    """Build the op library into ``out_dir`` (default: the first writable default folder).

    ``cuda=None`` builds the CUDA variant when nvcc is found; ``cuda=True`` requires it:
    without nvcc the CPU library is still built and :class:`NvccMissingError` says so.
    An up-to-date build (same sources, same request) is reused unless ``force``.
    """
    t0 = time.perf_counter()
    out = Path(out_dir) if out_dir is not None else _writable_build_dir()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OpsBuildError(f"cannot create {out}: {e.strerror or e}") from None
    archs = tuple(str(a).removeprefix("sm_") for a in archs)
    cxx_path = find_cxx(cxx)
    nvcc_path = find_nvcc(nvcc) if cuda is not False else None
    want_cuda = cuda is True or (cuda is None and nvcc_path is not None)
    src = source_hash()
    notes: list[str] = []
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = read_stamp(out) or {}
        cpu_lib, cuda_lib = out / CPU_LIB, out / CUDA_LIB
        fresh = not force and stamp.get("source_hash") == src and cpu_lib.is_file()
        if not fresh:
            log.info("building %s with %s", cpu_lib, cxx_path)
            _link_cpu(cxx_path, cpu_lib)
            cuda_lib.unlink(missing_ok=True)
            stamp = {"source_hash": src, "cxx": _version(cxx_path), "cxx_flags": list(CXX_FLAGS), "cuda": None}
        else:
            notes.append("CPU library up to date")
        built_cuda: Path | None = cuda_lib if (cuda_lib.is_file() and stamp.get("cuda")) else None
        if want_cuda and nvcc_path is not None:
            same = built_cuda is not None and (stamp.get("cuda") or {}).get("archs") == list(archs)  # type: ignore[union-attr]
            if not same or force:
                log.info("building %s with %s (sm_%s)", cuda_lib, nvcc_path, ", sm_".join(archs))
                _build_cuda(cxx_path, nvcc_path, cuda_lib, archs)
                stamp["cuda"] = {"nvcc": str(nvcc_path), "version": _version(str(nvcc_path)), "archs": list(archs),
                                 "cubins": [f"sm_{a}" for a in cubin_archs(cuda_lib)]}
                built_cuda = cuda_lib
            else:
                notes.append("CUDA library up to date")
        elif cuda is None:
            notes.append("nvcc not found: built the CPU ops only (set CUDA_HOME or QC_NVCC for the CUDA kernels)")
        stamp["built_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        tmp = out / f".{STAMP}.tmp"
        tmp.write_text(json.dumps(stamp, indent=2) + "\n")
        os.replace(tmp, out / STAMP)
    result = BuildResult(out, cpu_lib, built_cuda, archs if built_cuda else (), src,
                         round(time.perf_counter() - t0, 2), tuple(notes))
    if want_cuda and nvcc_path is None:
        where = nvcc if nvcc is not None else "$QC_NVCC, $CUDA_HOME/bin, /usr/local/cuda/bin or PATH"
        raise NvccMissingError(
            f"nvcc not found ({where}): cannot build the CUDA kernels; the CPU ops were built at {cpu_lib}"
        )
    return result


def find_library(cuda: bool = False) -> Path:
    """The built library (CPU or CUDA variant); raises :class:`QCError` naming the build command."""
    name = CUDA_LIB if cuda else CPU_LIB
    src = source_hash()
    stale: Path | None = None
    for d in default_build_dirs():
        lib = d / name
        if not lib.is_file():
            continue
        stamp = read_stamp(d) or {}
        if stamp.get("source_hash") != src:
            stale = stale or lib
            continue
        return lib
    if stale is not None:
        raise QCError(f"qcompiler's op library {stale} is out of date (its sources changed): run '{BUILD_COMMAND}'")
    what = "with CUDA kernels is not built: run 'qc ops build --cuda'" if cuda else \
        f"is not built: run '{BUILD_COMMAND}'"
    raise QCError(f"qcompiler's custom-op library (domain 'qcompiler') {what}")


def cubin_archs(library: str | os.PathLike) -> list[int]:
    """SM versions of the CUDA binaries embedded in ``library`` (ELF images with e_machine EM_CUDA).

    nvcc embeds one cubin per ``-gencode ... code=sm_XY``; its ELF header's ``e_flags``
    carries the SM version in bits 8–15.  (Needs no cuobjdump; compressed fatbins are
    not looked into.)
    """
    import struct

    data = Path(library).read_bytes()
    archs: set[int] = set()
    start = 1
    while (off := data.find(b"\x7fELF", start)) != -1:
        start = off + 4
        if off + 52 > len(data) or data[off + 4] != 2:  # 64-bit ELF only
            continue
        (machine,) = struct.unpack_from("<H", data, off + 18)
        if machine == 190:  # EM_CUDA
            (flags,) = struct.unpack_from("<I", data, off + 48)
            archs.add((flags >> 8) & 0xFF)
    return sorted(archs)
