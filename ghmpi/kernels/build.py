"""Compile the native kernels once per machine type, into a per-user cache, safely under MPI.

The shared library is built with `torch.utils.cpp_extension.load` (g++, ninja) the first time a
process asks for it, for the host CPU (`-march=native`), and kept in
`$GHMPI_KERNEL_CACHE` (default `$XDG_CACHE_HOME/ghmpi/kernels`, i.e. `~/.cache/ghmpi/kernels`)
under a key that hashes the source, the compiler, the flags, the CPU's feature flags, torch and
Python. So a shared home on NFS holds one build per kind of node, and a new source, compiler or
torch builds anew.

Several ranks per node (or nodes sharing a home) may ask at the same moment. One builds while
holding an exclusive `flock` on the key's lock file (released by the kernel if it dies); the others
wait on it, then load what it built. The build itself happens in a directory private to the process
and the library is moved into place with an atomic rename, so a reader never sees a half-written
file even where locking does not work (then they all build, and the last rename wins).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

SOURCE_DIR = Path(__file__).resolve().parent
LOCK_WAIT_S = 900.0  # how long to wait for another process's build before building ourselves


def cache_root() -> Path:
    if os.environ.get("GHMPI_KERNEL_CACHE"):
        return Path(os.environ["GHMPI_KERNEL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ghmpi" / "kernels"


def _cpu_flags() -> str:
    """The host's instruction-set flags: what -march=native compiles for."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.machine() + " " + platform.processor()


def _compiler() -> tuple[str, str]:
    cxx = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
        version = out.stdout.splitlines()[0] if out.returncode == 0 and out.stdout else ""
    except (OSError, subprocess.SubprocessError):
        version = ""
    return cxx, version


def _openmp_library() -> str | None:
    """The OpenMP runtime torch loaded (its own libgomp, or Intel's), if ATen uses OpenMP.

    The kernel uses ATen's thread pool through at::parallel_for, which with the OpenMP backend
    is inline code: it must be compiled with -fopenmp and link the *same* runtime as torch, or
    the process would run two thread pools that fight over the cores."""
    if "OpenMP" not in torch.__config__.parallel_info().split("parallel backend:")[-1]:
        return None
    libs = loaded_libraries(r"/lib(gomp|iomp5|omp)[^/]*\.so")
    return libs[0] if libs else None


def loaded_libraries(pattern: str) -> list[str]:
    """Paths of the files this process has mapped (its shared libraries) that match the regex
    `pattern`, in /proc/self/maps order, each once; none where that cannot be read."""
    found: dict[str, None] = {}
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 6 and re.search(pattern, fields[-1]):
                    found[fields[-1]] = None
    except OSError:
        pass
    return list(found)


def build_spec(name: str, sources: list[str], extra_cflags: list[str] = ()) -> dict:
    """Everything that decides the binary, and the cache key that hashes it."""
    cxx, cxx_version = _compiler()
    omp = _openmp_library()
    cflags = ["-O3", "-march=native", "-fno-math-errno", *extra_cflags]
    ldflags: list[str] = []
    if omp:
        cflags.append("-fopenmp")
        ldflags.append(omp)  # by path: the soname torch loaded, not the system's libgomp
    h = hashlib.sha256()
    for src in [*sources, *sorted(p.name for p in SOURCE_DIR.glob("*.h"))]:  # and the headers
        h.update((SOURCE_DIR / src).read_bytes())
    for part in (cxx, cxx_version, " ".join(cflags), os.path.basename(omp or ""), _cpu_flags(),
                 torch.__version__, sys.version, platform.machine()):
        h.update(part.encode() + b"\0")
    key = h.hexdigest()[:16]
    return {"name": f"{name}_{key}", "key": key, "sources": [str(SOURCE_DIR / s) for s in sources],
            "cflags": cflags, "ldflags": ldflags, "compiler": cxx_version or cxx}


@contextlib.contextmanager
def _locked(path: Path, wait_s: float) -> Iterator[bool]:
    """Hold an exclusive flock on `path` (True), or give up after wait_s or where the file
    system cannot lock (False): the caller then builds privately, which is still safe."""
    fd, locked = None, False
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                    break  # e.g. ENOLCK on an NFS without locking
                time.sleep(0.2)
    except OSError:
        pass
    try:
        yield locked
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _ninja_on_path() -> None:
    """cpp_extension runs `ninja` from PATH; the pip package's binary sits next to the
    interpreter (venv/bin) or in ninja.BIN_DIR, which an unactivated venv lacks on PATH."""
    dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja  # noqa: F401  (the pip package)
        dirs.append(ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    path = os.environ.get("PATH", "").split(os.pathsep)
    extra = [d for d in dirs if d and d not in path and os.path.exists(os.path.join(d, "ninja"))]
    if extra:
        os.environ["PATH"] = os.pathsep.join(extra + path)


def build_or_load(name: str, sources: list[str], extra_cflags: list[str] = ()) -> tuple[ctypes.CDLL, Path, bool]:
    """The library for this host, from the cache or compiled now. -> (library, its path, built?).
    Raises on any failure (no compiler, no ninja, compile error); the caller falls back."""
    spec = build_spec(name, sources, list(extra_cflags))
    final_dir = cache_root() / spec["key"]
    final = final_dir / f"{spec['name']}.so"
    if final.exists():
        return ctypes.CDLL(str(final)), final, False
    try:
        final_dir.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: build for this machine under /tmp instead
        final_dir = Path(tempfile.gettempdir()) / f"ghmpi-kernels-{os.getuid()}" / spec["key"]
        final = final_dir / final.name
        if final.exists():
            return ctypes.CDLL(str(final)), final, False
        final_dir.mkdir(parents=True, exist_ok=True)
    with _locked(final_dir / ".lock", LOCK_WAIT_S):
        if final.exists():  # another process built it while we waited
            return ctypes.CDLL(str(final)), final, False
        from torch.utils import cpp_extension

        _ninja_on_path()
        private = final_dir / f"build-{socket.gethostname()}-{os.getpid()}"
        shutil.rmtree(private, ignore_errors=True)
        private.mkdir()
        try:
            if cpp_extension.is_ninja_available():
                with open(private / "build.log", "w") as log, \
                        contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                    built = cpp_extension.load(
                        name=spec["name"], sources=spec["sources"], extra_cflags=spec["cflags"],
                        extra_ldflags=spec["ldflags"], build_directory=str(private),
                        is_python_module=False, verbose=False)
            else:  # e.g. an offline node without the ninja package: one g++ line does it
                built = _compile_direct(spec, private / f"{spec['name']}.so")
            tmp = final_dir / f".{spec['name']}.so.{os.getpid()}"
            shutil.copyfile(built, tmp)
            os.replace(tmp, final)  # atomic: readers see no file or the whole file
        finally:
            shutil.rmtree(private, ignore_errors=True)
    return ctypes.CDLL(str(final)), final, True


def _compile_direct(spec: dict, out: Path) -> Path:
    """What cpp_extension.load does for one C++ file, without ninja: torch's include and library
    paths and C++ ABI; compiled, then linked without -fopenmp (which would add the system's
    libgomp next to torch's). Raises with the compiler's message on failure."""
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX", "c++")
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", 1))
    libs = cpp_extension.library_paths()
    obj = out.with_suffix(".o")
    compile_cmd = [cxx, *spec["cflags"], "-std=c++17", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
                   *[f"-I{p}" for p in cpp_extension.include_paths()], "-c", *spec["sources"],
                   "-o", str(obj)]
    link_cmd = [cxx, "-shared", str(obj), "-o", str(out), *[f"-L{p}" for p in libs],
                *[f"-Wl,-rpath,{p}" for p in libs], "-lc10", "-ltorch_cpu", *spec["ldflags"]]
    for cmd in (compile_cmd, link_cmd):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:3])} ... failed: {r.stderr.strip()[-1500:]}")
    return out
