"""`bench job`: the whole job (`mpirun -n N python -m ghmpi`) against Hugging Face transformers'
`generate` on the same random-weight checkpoint, prompts and lengths, in the same run.

Both figures count generated tokens over the generation time, after the model is loaded (the
job's own wall time, load included, is reported beside it).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from ghmpi.bench import log
from ghmpi.bench.checkpoint import build
from ghmpi.io.prompts import PromptWriter


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", default=None, help="llama3-8b (default on a GPU) | llama2-7b | tiny")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--workdir", default="/tmp/ghmpi-bench", help="checkpoints, prompts, outputs")
    p.add_argument("--prompts", type=int, default=None, help="prompts (256)")
    p.add_argument("--prompt-len", type=int, default=None, help="tokens per prompt (512)")
    p.add_argument("--new", type=int, default=None, help="new tokens per prompt (128)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--np", type=int, default=1, help="MPI ranks of the ghmpi job")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="extra ghmpi --set KEY=VALUE for the job (repeatable)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--mpirun", default=None, help="mpirun to use (default: beside python, or PATH)")


def _hf_generate(model_dir: Path, ids: np.ndarray, new: int, dtype: str) -> dict:
    from transformers import AutoModelForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(dev)
    load = time.perf_counter() - t0
    x = torch.from_numpy(ids).long().to(dev)
    mask = torch.ones_like(x)
    kw = dict(do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
    model.generate(x[:2, :16], attention_mask=mask[:2, :16], **{**kw, "max_new_tokens": 2,
                                                                  "min_new_tokens": 2})
    if dev == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(x, attention_mask=mask, **kw)
    if dev == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter() - t0
    tokens = (out.shape[1] - x.shape[1]) * x.shape[0]
    del model, out
    if dev == "cuda":
        torch.cuda.empty_cache()
    return dict(load_s=load, generate_s=t, tokens=tokens, tokens_per_s=tokens / t)


def _mpirun(given: str | None) -> str:
    if given:
        return given
    beside = Path(sys.executable).parent / "mpirun"
    return str(beside) if beside.exists() else "mpirun"


def make_inputs(work: Path, shape: str, layers: int | None, N: int, L: int
                ) -> tuple[Path, Path, np.ndarray]:
    """The random checkpoint (built once, reused) and a prompts file of N random prompts of L
    tokens -> (model folder, prompts file, the token ids (N, L))."""
    import json

    t0 = time.perf_counter()
    model_dir = build(work / (shape + (f"-{layers}l" if layers else "")), shape, layers)
    log(f"checkpoint {model_dir} ready in {time.perf_counter() - t0:.0f} s")
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    ids = np.random.default_rng(0).integers(3, vocab, (N, L)).astype(np.int32)
    prompts = work / f"prompts-{N}x{L}.h5"
    with PromptWriter(prompts) as w:
        for row in ids:
            w.add(row)
    return model_dir, prompts, ids


def run_ghmpi(model_dir: Path, prompts: Path, out: Path, ranks: int, new: int, dtype: str,
              overrides: list[str], mpirun: str | None = None,
              env: dict[str, str] | None = None) -> dict:
    """Run the job under mpirun (`env`: more variables for it); -> its figures from the output
    file and its summary lines.

    The ranks start in the output's folder, not the caller's: `python -m` puts its working
    directory first on sys.path, so started from a checkout it would run that checkout's ghmpi
    whatever `env` says. Here a PYTHONPATH in `env` (another version's code, for an A/B) wins, and
    this ghmpi comes after it."""
    import shutil

    model_dir, prompts, out = Path(model_dir).resolve(), Path(prompts).resolve(), Path(out).resolve()
    out.unlink(missing_ok=True)  # a complete output would make the job a no-op
    shutil.rmtree(str(out) + ".parts", ignore_errors=True)
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    cmd = [_mpirun(mpirun), *root, "--oversubscribe", "--bind-to", "none", "-n", str(ranks),
           sys.executable, "-m", "ghmpi", "--set", f"model.path={model_dir}",
           "--set", f"io.prompts={prompts}", "--set", f"io.output={out}",
           "--set", f"generation.max_new_tokens={new}", "--set", "generation.ignore_eos=true",
           "--set", "io.overwrite=true", "--set", f"model.dtype={dtype}",
           "--set", "runtime.progress_seconds=1000"]
    for o in overrides:
        cmd += ["--set", o]
    log("ghmpi: " + " ".join(shlex.quote(c) for c in cmd))
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_mpi_yield_when_idle="1", PMIX_MCA_psec="native", **(env or {}))
    here = str(Path(__file__).resolve().parents[2])  # the folder holding this ghmpi package
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), here) if p)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=out.parent)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"ghmpi bench: the job failed with exit status {proc.returncode}")
    keys = ("generated_tokens", "wall_time_s", "tokens_per_s", "generate_time_s",
            "generate_tokens_per_s", "tier1_busy_fraction", "tier2_busy_fraction")
    with h5py.File(out, "r") as f:
        attrs = {k: f.attrs[k] for k in keys if k in f.attrs}
    job = {k: (float(v) if isinstance(v, (float, np.floating)) else int(v)) for k, v in attrs.items()}
    job["process_wall_s"] = wall
    job["ranks"] = ranks
    job["summary"] = [l for l in proc.stdout.splitlines()
                      if l.startswith(("ghmpi: done", "ghmpi: tier", "ghmpi: placement", "ghmpi: hybrid",
                                       "ghmpi: note"))
                      or " micro-batches x " in l]
    return job


def job_size(args: argparse.Namespace) -> tuple[str, int, int, int]:
    """(shape, prompts, tokens per prompt, new tokens): the arguments, else the issue's job on a
    GPU (Llama-3-8B shapes, 256 x 512 -> 128) or a tiny one on a CPU."""
    gpu = torch.cuda.is_available()
    return (args.shape or ("llama3-8b" if gpu else "tiny"), args.prompts or (256 if gpu else 8),
            args.prompt_len or (512 if gpu else 16), args.new or (128 if gpu else 8))


def run(args: argparse.Namespace) -> dict:
    gpu = torch.cuda.is_available()
    shape, N, L, new = job_size(args)
    work = Path(args.workdir)
    model_dir, prompts, ids = make_inputs(work, shape, args.layers, N, L)
    result: dict = {"suite": "job", "shape": shape, "prompts": N, "prompt_len": L, "new": new,
                    "device": torch.cuda.get_device_name() if gpu else "cpu",
                    "torch": torch.__version__}
    if not args.no_hf:
        log("transformers generate ...")
        hf = _hf_generate(model_dir, ids, new, args.dtype)
        result["transformers"] = hf
        log(f"transformers: {hf['tokens_per_s']:.0f} tokens/s")
    out = work / f"out-{shape}-{N}x{L}-{new}-n{args.np}.h5"
    job = run_ghmpi(model_dir, prompts, out, args.np, new, args.dtype, args.overrides, args.mpirun)
    result["ghmpi"] = job
    if "transformers" in result and "generate_tokens_per_s" in job:
        result["ghmpi_over_transformers"] = job["generate_tokens_per_s"] / result["transformers"]["tokens_per_s"]
    return result
