"""The four scenarios of issue 10, run as a cluster user would (tiny model, 160 prompts, 4 ranks).

    PYTHONPATH=. python bench/issue10_scenarios.py [stall|stall-slice|twice|full|move ...]

Prints one `== scenario: ...` line per scenario followed by what the user saw (exit status,
`ghmpi:` lines, whether a rerun resumed). `full` needs root (it mounts a small tmpfs). Every job
is bounded by a timeout: a job still running when it expires is reported as such and killed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import h5py  # noqa: E402

from ghmpi.io.prompts import PromptFile, write_prompts  # noqa: E402

PY = sys.executable
MPIRUN = os.environ.get("MPIRUN") or str(Path(PY).parent / "mpirun")
HANG_WAIT = float(os.environ.get("HANG_WAIT", "90"))  # how long a hang is watched before killing
# STALL_TIMEOUT=default HANG_WAIT=400 shows the default runtime.stall_timeout (300 s) at work


def has_key(key: str) -> bool:
    from ghmpi import config
    section, name = key.split(".")
    return name in [f.name for f in config.fields(config.SECTIONS[section])]


def env() -> dict[str, str]:
    e = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
             OMPI_MCA_mpi_yield_when_idle="1", PMIX_MCA_psec="native", PYTHONUNBUFFERED="1")
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def start(n: int, *args: str) -> subprocess.Popen:
    cmd = [MPIRUN, "--oversubscribe", "-n", str(n), PY, "-m", "ghmpi", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def session_ranks(proc: subprocess.Popen) -> dict[int, int]:
    """world rank -> pid of the job's python ranks."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            sid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[3])
            environ = (d / "environ").read_bytes().split(b"\0")
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if sid != proc.pid or b"python" not in argv[0]:
            continue
        for kv in environ:
            if kv.startswith(b"OMPI_COMM_WORLD_RANK="):
                out[int(kv.split(b"=")[1])] = int(d.name)
    return out


def kill_session(proc: subprocess.Popen) -> None:
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[3]) == proc.pid:
                    os.kill(int(d.name), signal.SIGKILL)
            except (OSError, IndexError, ValueError):
                pass


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int | None, str, str, float]:
    t0 = time.monotonic()
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err, time.monotonic() - t0
    except subprocess.TimeoutExpired:
        kill_session(proc)
        out, err = proc.communicate()
        return None, out, err, time.monotonic() - t0


def ghmpi_lines(text: str, limit: int = 6) -> list[str]:
    keep = [l for l in text.splitlines()
            if (l.startswith("ghmpi:") and "progress:" not in l and "resolved config" not in l)
            or "MPI_ABORT" in l or "Traceback" in l or "Error" in l]
    return [l[:800] for l in keep[-limit:]]


def report(name: str, rc: int | None, out: str, err: str, seconds: float) -> None:
    state = f"exit {rc}" if rc is not None else f"STILL RUNNING after {seconds:.0f} s (killed)"
    print(f"  {name}: {state} after {seconds:.1f} s")
    for l in ghmpi_lines(out + "\n" + err):
        print(f"    | {l}")


def wait_for_shard(out: Path, proc: subprocess.Popen, timeout: float = 180) -> bool:
    parts = Path(str(out) + ".parts")
    deadline = time.monotonic() + timeout
    while not list(parts.glob("shard-*.h5")):
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def job_args(tmp: Path, out: Path, *extra: str, model: Path | None = None) -> list[str]:
    return ["--set", f"model.path={model or REPO / 'data' / 'tiny-llama'}", "--set", "model.dtype=float32",
            "--set", f"io.prompts={tmp / 'prompts.h5'}", "--set", f"io.output={out}",
            "--set", "io.flush_every=8", "--set", "io.flush_seconds=0.5",
            "--set", "runtime.progress_seconds=1000", *extra]


STALL = os.environ.get("STALL_TIMEOUT", "20")  # seconds; "default": the config's default (300)


def stall_args() -> list[str]:
    if STALL == "default" or not has_key("runtime.stall_timeout"):
        return []
    return ["--set", f"runtime.stall_timeout={STALL}"]


def scenario_stall(tmp: Path, slices: int, victim: int) -> None:
    what = "tier-2 rank 2" if slices == 1 else f"later slice (rank {victim}, topology.slices={slices})"
    print(f"== scenario: a hung rank: SIGSTOP {what} after the first shard"
          f"{f' (runtime.stall_timeout={STALL})' if stall_args() else ''}")
    out = tmp / f"stall{slices}" / "c.h5"
    out.parent.mkdir()
    args = job_args(tmp, out, "--set", f"topology.slices={slices}", *stall_args())
    proc = start(4, *args)
    if not wait_for_shard(out, proc):
        report("run", *finish(proc, 5))
        return
    ranks = session_ranks(proc)
    os.kill(ranks[victim], signal.SIGSTOP)
    stopped_at = time.monotonic()
    rc, o, e, _ = finish(proc, HANG_WAIT)
    report("run", rc, o, e, time.monotonic() - stopped_at)
    time.sleep(1.0)
    try:
        state = Path(f"/proc/{ranks[victim]}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        state = "gone"
    if state in ("gone", "Z"):
        print(f"  rank {victim} (pid {ranks[victim]}) ended with the job")
    else:
        os.kill(ranks[victim], signal.SIGKILL)
        print(f"  rank {victim} (pid {ranks[victim]}) was left behind (state {state}): killed it")
    rc, o, e, s = finish(start(4, *args), 300)
    report("rerun", rc, o, e, s)


def scenario_twice(tmp: Path) -> None:
    print("== scenario: the same job started twice at once")
    out = tmp / "twice" / "c.h5"
    out.parent.mkdir()
    args = job_args(tmp, out)
    a = start(4, *args)
    time.sleep(0.5)
    b = start(4, *args)
    report("first", *finish(a, 300))
    report("second", *finish(b, 300))
    if out.exists():
        with h5py.File(out) as f:
            print(f"  output: {f['finish_reason'].shape[0]} completions")


def scenario_full(tmp: Path) -> None:
    print("== scenario: output on a full filesystem (a 192 KiB tmpfs)")
    mnt = tmp / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(mnt)]).returncode:
        print("  skipped: cannot mount a tmpfs (needs root)")
        return
    try:
        out = mnt / "c.h5"
        args = job_args(tmp, out, "--set", "io.flush_every=1")
        report("run", *finish(start(4, *args), 300))
        parts = Path(str(out) + ".parts")
        shards = sorted(parts.glob("shard-*.h5")) if parts.is_dir() else []
        print(f"  {len(shards)} shards, {sum(1 for _ in parts.glob('*.tmp')) if parts.is_dir() else 0} "
              f"*.tmp left in {parts.name}")
        subprocess.run(["mount", "-o", "remount,size=16m", str(mnt)], check=True)
        report("rerun with space", *finish(start(4, *args), 300))
        ref = tmp / "full-ref" / "c.h5"
        ref.parent.mkdir()
        finish(start(4, *job_args(tmp, ref, "--set", "io.flush_every=1")), 300)
        if out.exists() and ref.exists():
            with h5py.File(out) as f, h5py.File(ref) as g:
                same = all(f[k].shape == g[k].shape and (f[k][:] == g[k][:]).all()
                           for k in ("tokens", "offsets", "finish_reason"))
            print(f"  output equals an uninterrupted run's: {same}")
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def scenario_move(tmp: Path) -> None:
    print("== scenario: resume after moving the model folder (and after changing the layout)")
    model_a, model_b = tmp / "models" / "a", tmp / "models" / "b"
    shutil.copytree(REPO / "data" / "tiny-llama", model_a)
    out = tmp / "move" / "c.h5"
    out.parent.mkdir()
    proc = start(4, *job_args(tmp, out, model=model_a))
    if wait_for_shard(out, proc):
        os.kill(proc.pid, signal.SIGUSR1)
    report("run, stopped with SIGUSR1", *finish(proc, 120))
    model_a.rename(model_b)
    rc, o, e, s = finish(start(4, *job_args(tmp, out, "--set", "topology.slices=2",
                                            "--set", "generation.temperature=0.5",
                                            model=model_b)), 300)
    report("rerun, model moved, temperature 0.5 (must refuse)", rc, o, e, s)
    rc, o, e, s = finish(start(4, *job_args(tmp, out, "--set", "topology.slices=2",
                                            model=model_b)), 300)
    report("rerun, model moved, 2 slices", rc, o, e, s)


def main() -> None:
    which = sys.argv[1:] or ["stall", "stall-slice", "twice", "full", "move"]
    tmp = Path(tempfile.mkdtemp(prefix="issue10-"))
    with PromptFile(REPO / "data" / "prompts.h5") as pf:
        shipped = [t for _, t, _ in pf.iter_prompts()]
    write_prompts(tmp / "prompts.h5", [shipped[i % len(shipped)] for i in range(160)])
    rev = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h %s"],
                         capture_output=True, text=True).stdout.strip()
    print(f"ghmpi at {rev[:90]}")
    try:
        for w in which:
            {"stall": lambda: scenario_stall(tmp, 1, 2),
             "stall-slice": lambda: scenario_stall(tmp, 2, 1),
             "twice": lambda: scenario_twice(tmp),
             "full": lambda: scenario_full(tmp),
             "move": lambda: scenario_move(tmp)}[w]()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
