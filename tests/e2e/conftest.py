"""End-to-end fixtures: whole jobs through `mpirun python -m ghmpi` on real files, checked
against Hugging Face transformers' generate on the same checkpoint."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from ghmpi.io.prompts import PromptFile, write_prompts

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "data" / "tiny-llama"
N_PROMPTS = 14
MAX_NEW = 24


def mpirun() -> str:
    exe = os.environ.get("MPIRUN") or str(Path(sys.executable).parent / "mpirun")
    return exe if os.path.exists(exe) else shutil.which("mpirun")


def mpi_env() -> dict[str, str]:
    env = dict(os.environ)
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


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory) -> Path:
    """The first N_PROMPTS shipped prompts (varied lengths), as a flat prompts file."""
    with PromptFile(REPO / "data" / "prompts.h5") as pf:
        prompts = [t for _, t, _ in pf.iter_prompts()][:N_PROMPTS]
    path = tmp_path_factory.mktemp("prompts") / "prompts.h5"
    write_prompts(path, prompts)
    return path


@pytest.fixture(scope="session")
def reference(prompts_file) -> tuple[list[list[int]], list[int]]:
    """transformers' greedy generate, one prompt at a time (no padding), float32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    with PromptFile(prompts_file) as pf:
        prompts = [t for _, t, _ in pf.iter_prompts()]
    completions, reasons = [], []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor(np.asarray(p, dtype=np.int64))[None]
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=MAX_NEW, pad_token_id=min(eos))
            new = out[0, ids.shape[1]:].tolist()
            completions.append(new)
            reasons.append(1 if new[-1] in eos else 2)
    assert 1 in reasons and 2 in reasons, "the reference should cover both EOS and length stops"
    return completions, reasons
