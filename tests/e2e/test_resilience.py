"""A job that fails, is stopped or is killed loses nothing it finished, and resumes exactly."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from e2e_jobs import MODEL, ghmpi, mpi_env, mpirun, read_output, write_job

# A job long enough (2 slots, 96 new tokens per prompt) that a signal or kill sent after the first
# shard lands mid-run even on a fast, idle machine; shards are written per finished prompt.
LONG = dict(topology={"micro_batches": 1, "micro_batch_size": 2},
            generation={"max_new_tokens": 96},
            io={"flush_every": 1, "flush_seconds": 0.2})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, prompts_file):
    """The long job run once without interruption: what every resumed run must reproduce."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    out = tmp / "c.h5"
    r = ghmpi(1, "-c", str(write_job(tmp / "job.yaml", prompts_file, out, **LONG)))
    assert r.returncode == 0, r.stderr
    return read_output(out)


def start(n: int, job: Path) -> subprocess.Popen:
    cmd = [mpirun(), "--oversubscribe", "-n", str(n), sys.executable, "-m", "ghmpi", "-c", str(job)]
    return subprocess.Popen(cmd, env=mpi_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def wait_for_shards(out: Path, at_least: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    parts = Path(str(out) + ".parts")
    deadline = time.monotonic() + timeout
    while len(list(parts.glob("shard-*.h5"))) < at_least:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no shard appeared"
        time.sleep(0.05)


def session_pids(proc: subprocess.Popen, ranks_only: bool = False) -> list[int]:
    """Processes of the job's session (launcher, its daemons, ranks: prterun gives each rank a
    process group of its own, so killpg would miss them). ranks_only: the python ranks."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            sid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[3])
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if sid != proc.pid:
            continue
        if not ranks_only or (b"ghmpi" in argv and b"python" in argv[0] and int(d.name) != proc.pid):
            pids.append(int(d.name))
    return pids


@pytest.mark.parametrize("worker", ["0", "1"], ids=["inline", "worker"])
def test_injected_tier2_failure_ends_the_job_quickly(tmp_path, prompts_file, worker, monkeypatch):
    """A tier-2 rank fails while serving (on its worker thread, too): the job ends at once, with
    the rank named."""
    monkeypatch.setenv("GHMPI_TIER2_WORKER", worker)
    out = tmp_path / "c.h5"
    job = write_job(tmp_path / "job.yaml", prompts_file, out, faults={"rank": 2, "after_steps": 30},
                    runtime={"torch_threads": 2})
    proc = start(3, job)
    failed_at, err = None, []
    for line in proc.stderr:  # stream: time the end of the job from the moment the rank fails
        err.append(line)
        if failed_at is None and "failed: InjectedFault" in line:
            failed_at = time.monotonic()
    proc.wait(timeout=120)
    ended = time.monotonic() - failed_at
    err = "".join(err)
    assert proc.returncode not in (0, None)
    assert "rank 2 (tier-2 #1) failed: InjectedFault" in err
    assert ended < 30, ended  # the other ranks are aborted, not left waiting
    assert not out.exists()


def test_sigusr1_stops_cleanly_and_the_rerun_resumes(tmp_path, prompts_file, uninterrupted):
    out = tmp_path / "c.h5"
    job = write_job(tmp_path / "job.yaml", prompts_file, out, **LONG)
    proc = start(3, job)
    wait_for_shards(out, 1, proc)
    os.kill(proc.pid, signal.SIGUSR1)  # mpirun forwards SIGUSR1 to every rank
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    assert time.monotonic() - t0 < 20
    assert "run the same job again to resume" in err
    assert not out.exists()
    r = ghmpi(3, "-c", str(job))
    assert r.returncode == 0, r.stderr
    assert "already done" in r.stdout and " 0 already done" not in r.stdout
    assert read_output(out) == uninterrupted


def test_sigterm_to_every_rank_like_scancel_stops_cleanly(tmp_path, prompts_file, uninterrupted):
    out = tmp_path / "c.h5"
    job = write_job(tmp_path / "job.yaml", prompts_file, out, **LONG)
    proc = start(2, job)
    wait_for_shards(out, 1, proc)
    pids = session_pids(proc, ranks_only=True)
    assert len(pids) == 2, pids
    for pid in pids:  # Slurm signals every task, not a launcher
        os.kill(pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    assert "interrupted by SIGTERM" in err
    r = ghmpi(2, "-c", str(job))
    assert r.returncode == 0, r.stderr
    assert read_output(out) == uninterrupted


def test_sigkill_at_random_moments_then_resume_gives_the_same_file(tmp_path, prompts_file,
                                                                  uninterrupted):
    out = tmp_path / "c.h5"
    job = write_job(tmp_path / "job.yaml", prompts_file, out, **LONG)
    rng = random.Random(1234)
    kills = 0
    for attempt in range(3):
        proc = start(3, job)
        wait_for_shards(out, 1 + attempt, proc)
        time.sleep(rng.uniform(0.0, 0.5))
        if proc.poll() is None:
            for pid in session_pids(proc):  # the whole job, launcher and ranks, at once
                os.kill(pid, signal.SIGKILL)
            kills += 1
        proc.communicate()
    assert kills == 3
    assert not out.exists()
    r = ghmpi(3, "-c", str(job))
    assert r.returncode == 0, r.stderr
    assert read_output(out) == uninterrupted
