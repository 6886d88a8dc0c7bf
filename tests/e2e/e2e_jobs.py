"""Helpers of the end-to-end tests: run whole jobs through `mpirun python -m ghmpi` on real files."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import yaml


REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "data" / "tiny-llama"
N_PROMPTS = 14
MAX_NEW = 24


def mpirun() -> str:
    exe = os.environ.get("MPIRUN") or str(Path(sys.executable).parent / "mpirun")
    return exe if os.path.exists(exe) else shutil.which("mpirun")


@functools.cache
def mpi_tmpdir() -> str:
    """A fresh folder of this test run for mpirun's session files (TMPDIR). An mpirun that a test
    kills leaves its folder (`ompi.<pid>`, with PMIx's rendezvous files) behind, and a later
    mpirun given the same pid then fails to start ("The PMIx server's listener thread failed to
    start"): in a shared /tmp such leftovers pile up over many runs, here they go with the run."""
    path = tempfile.mkdtemp(prefix="ghmpi-mpi-", dir="/tmp")
    atexit.register(shutil.rmtree, path, True)
    return path


def mpi_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TMPDIR"] = mpi_tmpdir()
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_mpi_yield_when_idle="1", PMIX_MCA_psec="native", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def ghmpi(n: int, *args: str, timeout: float = 240, cwd: Path = REPO, **popen) -> subprocess.CompletedProcess:
    """Run `mpirun -n N python -m ghmpi ARGS` (n == 0: plain python, no mpirun)."""
    cmd = [sys.executable, "-m", "ghmpi", *args]
    if n:
        cmd = [mpirun(), "--oversubscribe", "-n", str(n), *cmd]
    return subprocess.run(cmd, cwd=cwd, env=mpi_env(), capture_output=True, text=True,
                          timeout=timeout, **popen)


def write_job(path: Path, prompts: Path, output: Path, **sections) -> Path:
    job = {"model": {"path": str(MODEL), "dtype": "float32"},
           "io": {"prompts": str(prompts), "output": str(output)},
           "generation": {"max_new_tokens": MAX_NEW},
           "runtime": {"progress_seconds": 1.0}}
    for section, values in sections.items():
        job.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(job))
    return path


def read_output(path: Path) -> tuple[list[list[int]], list[int]]:
    with h5py.File(path, "r") as f:
        tokens, offsets, reasons = f["tokens"][:], f["offsets"][:], f["finish_reason"][:]
    return ([tokens[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])], reasons.tolist())


