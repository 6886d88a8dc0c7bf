"""Issue 10, through the CLI with real processes and files: a hung rank ends the job (exit 76),
one job per output (exit 2 for the second), storage errors in plain words (exit 74), and resume
that survives moving the model and changing the layout. Every job is bounded by a timeout."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from e2e_jobs import MODEL, ghmpi, read_output, write_job
from ghmpi.io.completions import CompletionStore
from test_resilience import session_pids, start, wait_for_shards

# Long enough that a signal after the first shard lands mid-run; shards per finished prompt.
LONG = dict(topology={"micro_batches": 1, "micro_batch_size": 2},
            io={"flush_every": 1, "flush_seconds": 0.2})
STALL = 4  # seconds: runtime.stall_timeout of these tests


def rank_pids(proc: subprocess.Popen) -> dict[int, int]:
    """world rank -> pid of the job's python ranks."""
    out = {}
    for pid in session_pids(proc, ranks_only=True):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for kv in env:
            if kv.startswith(b"OMPI_COMM_WORLD_RANK="):
                out[int(kv.split(b"=", 1)[1])] = pid
    return out


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def error_lines(err: str) -> list[str]:
    return [l for l in err.splitlines() if l.startswith("ghmpi: error:")]


def stopped_rank_ends_the_job(tmp_path: Path, prompts_file: Path, reference, n: int, victim: int,
                              waited_on: str, **sections) -> None:
    out = tmp_path / "c.h5"
    job = write_job(tmp_path / "job.yaml", prompts_file, out,
                    **{**LONG, "runtime": {"stall_timeout": STALL}, **sections})
    proc = start(n, job)
    try:
        wait_for_shards(out, 1, proc)
        pid = rank_pids(proc)[victim]
        os.kill(pid, signal.SIGSTOP)  # hung in the kernel: sends and answers nothing
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=STALL + 60)
    finally:
        if proc.poll() is None:
            for p in session_pids(proc):
                os.kill(p, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 76, err
    assert time.monotonic() - t0 < STALL + 45
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert "no token for" in lines[0] and f"runtime.stall_timeout={STALL}" in lines[0]
    assert waited_on in lines[0], lines[0]
    assert "completions are saved in" in lines[0] and "run the same job again" in lines[0]
    assert "Traceback" not in err
    time.sleep(1)
    assert gone(pid), "the stopped rank was left behind"
    assert not Path(str(out) + ".lock").exists()  # released for the rerun on any host
    r = ghmpi(n, "-c", str(job), timeout=240)
    assert r.returncode == 0, r.stderr
    assert " 0 already done" not in r.stdout
    assert read_output(out) == reference


def test_a_stopped_tier2_rank_ends_the_job_and_the_rerun_resumes(tmp_path, prompts_file, reference):
    stopped_rank_ends_the_job(tmp_path, prompts_file, reference, n=3, victim=2,
                              waited_on="rank 2 (tier-2 #1)")


def test_a_stopped_later_slice_ends_the_job_and_the_rerun_resumes(tmp_path, prompts_file,
                                                                   reference):
    stopped_rank_ends_the_job(tmp_path, prompts_file, reference, n=3, victim=1,
                              waited_on="rank 1 (tier-1 slice 1)",
                              topology={"slices": 2, "micro_batches": 2, "micro_batch_size": 2},
                              io=LONG["io"])


def test_a_second_job_on_the_same_output_is_refused(tmp_path, prompts_file, reference):
    out = tmp_path / "c.h5"
    job = write_job(tmp_path / "job.yaml", prompts_file, out, **LONG)
    first = start(2, job)
    try:
        wait_for_shards(out, 1, first)
        ranks = rank_pids(first)
        holder = ranks[0]
        os.kill(ranks[1], signal.SIGSTOP)  # hold the first job mid-run, however fast the machine
        try:
            r = ghmpi(2, "-c", str(job), timeout=120)  # a --requeue while the first still runs
        finally:
            os.kill(ranks[1], signal.SIGCONT)
        assert r.returncode == 2, r.stderr
        lines = error_lines(r.stderr)
        assert len(lines) == 1, r.stderr
        assert f"pid {holder}" in lines[0] and "in use by another job" in lines[0]
        assert "started " in lines[0] and "host " in lines[0]
        _, err = first.communicate(timeout=240)
    finally:
        if first.poll() is None:
            for p in session_pids(first):
                os.kill(p, signal.SIGKILL)
    assert first.returncode == 0, err  # undisturbed
    assert read_output(out) == reference
    assert not Path(str(out) + ".lock").exists()


def test_a_lock_left_by_a_killed_job_is_taken_over(tmp_path, prompts_file, reference):
    out = tmp_path / "c.h5"
    job = write_job(tmp_path / "job.yaml", prompts_file, out, **LONG)
    proc = start(2, job)
    wait_for_shards(out, 1, proc)
    for p in session_pids(proc):  # node failure: the lock stays behind, its pid dead
        os.kill(p, signal.SIGKILL)
    proc.communicate()
    assert Path(str(out) + ".lock").exists()
    r = ghmpi(2, "-c", str(job), timeout=240)
    assert r.returncode == 0, r.stderr
    assert "ghmpi: warning: took over" in r.stderr and "no longer runs" in r.stderr
    assert read_output(out) == reference


@pytest.fixture()
def small_fs(tmpfs) -> Path:
    """A tmpfs of 64 KiB (root only): room for a few shards of the job, not all."""
    return tmpfs("64k")


def storage_error_then_resume(err: str, rc: int, out: Path, cause: str) -> None:
    assert rc == 74, err
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert str(out) + ".parts" in lines[0] and cause in lines[0], lines[0]
    assert "completions are safe" in lines[0] and "run the same job again" in lines[0]
    assert "Traceback" not in err and "MPI_ABORT" not in err
    parts = Path(str(out) + ".parts")
    assert not list(parts.glob("*.tmp"))


def test_a_full_filesystem_says_so_and_the_rerun_resumes(small_fs, prompts_file, reference):
    out = small_fs / "c.h5"
    job = write_job(small_fs.parent / "job.yaml", prompts_file, out, **LONG)
    r = ghmpi(3, "-c", str(job), timeout=240)
    storage_error_then_resume(r.stderr, r.returncode, out, "No space left on device (ENOSPC)")
    safe = int(error_lines(r.stderr)[0].split(" of ")[0].rsplit(" ", 1)[1])
    assert CompletionStore(out, len(reference[0]), _job_id(out)).n_done == safe > 0
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_fs)], check=True)
    r = ghmpi(3, "-c", str(job), timeout=240)
    assert r.returncode == 0, r.stderr
    assert f"{safe} already done" in r.stdout
    assert read_output(out) == reference


def _job_id(out: Path) -> str:
    import json
    return json.loads((Path(str(out) + ".parts") / "job.json").read_text())["job_id"]


def test_output_turning_read_only_says_so_and_the_rerun_resumes(tmp_path, prompts_file, reference):
    """Root: the filesystem is remounted read-only mid-run (EROFS). Others: the parts folder
    loses its write permission mid-run (EACCES)."""
    as_root = os.geteuid() == 0
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if as_root and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)],
                                  capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs")
    try:
        out = mnt / "c.h5"
        parts = Path(str(out) + ".parts")
        job = write_job(tmp_path / "job.yaml", prompts_file, out, **LONG)
        proc = start(2, job)
        wait_for_shards(out, 2, proc)
        if as_root:
            subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        else:
            parts.chmod(0o555)
        _, err = proc.communicate(timeout=240)
        storage_error_then_resume(err, proc.returncode, out,
                                  "(EROFS)" if as_root else "(EACCES)")
        if as_root:
            subprocess.run(["mount", "-o", "remount,rw", str(mnt)], check=True)
        else:
            parts.chmod(0o755)
        r = ghmpi(2, "-c", str(job), timeout=240)
        assert r.returncode == 0, r.stderr
        assert " 0 already done" not in r.stdout
        assert read_output(out) == reference
    finally:
        if as_root:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_resume_survives_moving_the_model_and_a_new_layout(tmp_path, prompts_file, reference):
    model = tmp_path / "models" / "a"
    shutil.copytree(MODEL, model)
    out = tmp_path / "c.h5"
    job = write_job(tmp_path / "job.yaml", prompts_file, out,
                    **LONG, model={"path": str(model), "dtype": "float32"})
    proc = start(2, job)
    wait_for_shards(out, 1, proc)
    os.kill(proc.pid, signal.SIGUSR1)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    moved = tmp_path / "elsewhere" / "b"
    moved.parent.mkdir()
    model.rename(moved)
    prompts = tmp_path / "p-copy.h5"
    shutil.copy(prompts_file, prompts)
    base = ["-c", str(job), "--set", f"model.path={moved}", "--set", f"io.prompts={prompts}"]
    r = ghmpi(3, *base, "--set", "generation.temperature=0.7", timeout=120)  # another job
    assert r.returncode == 2 and "another job" in r.stderr, r.stderr
    assert "generation.temperature (default there, 0.7 here)" in r.stderr, r.stderr
    r = ghmpi(3, *base, "--set", "topology.slices=2", "--set", "topology.micro_batch_size=3",
              "--set", "runtime.torch_threads=1", timeout=240)
    assert r.returncode == 0, r.stderr
    assert " 0 already done" not in r.stdout
    assert read_output(out) == reference
