"""CompletionStore: persistence, resume, job identity, SIGKILL crash safety, final layout."""

from __future__ import annotations

import os
import inspect
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from ghmpi.errors import InputError
from ghmpi.io.completions import (FINISH_LENGTH, FINISH_STOP, CompletionFile, CompletionStore,
                                  read_completions)

REPO = Path(__file__).resolve().parents[2]


def fake_completion(i: int) -> tuple[np.ndarray, int]:
    """Deterministic completion of prompt i: 0..40 ids (some empty), alternating reasons."""
    rng = np.random.default_rng(i)
    n = int(rng.integers(0, 41))
    return rng.integers(0, 50_000, n).astype(np.int32), (FINISH_STOP if i % 3 else FINISH_LENGTH)


def datasets(path: Path) -> dict[str, bytes]:
    """Raw bytes of each dataset plus dtype/shape/chunks/filters: what must be identical."""
    with h5py.File(path, "r") as f:
        return {k: (f[k][:].tobytes(), str(f[k].dtype), f[k].shape, f[k].chunks,
                    f[k].compression, f[k].shuffle) for k in f}


def run_in_order(out: Path, n: int, order: list[int], job: str = "job-A", **kw) -> None:
    with CompletionStore(out, n, job, **kw) as store:
        for i in order:
            store.add(i, *fake_completion(i))
        store.finalize({"note": "test", "wall_s": 1.5, "n": n})


def test_final_layout_in_prompt_order(tmp_path: Path) -> None:
    out = tmp_path / "c.h5"
    n = 300
    order = list(range(n))
    random.Random(0).shuffle(order)
    run_in_order(out, n, order, flush_every=37)
    assert not (tmp_path / "c.h5.parts").exists()
    assert not (tmp_path / "c.h5.tmp").exists()
    with h5py.File(out, "r") as f:
        assert f["tokens"].dtype == np.int32 and f["offsets"].dtype == np.int64
        assert f["finish_reason"].dtype == np.uint8 and f["finish_reason"].shape == (n,)
        assert f["offsets"].shape == (n + 1,) and f["offsets"][0] == 0
        assert f["tokens"].compression == "gzip" and f["tokens"].shuffle
        assert f.attrs["job_id"] == "job-A" and f.attrs["note"] == "test"
        assert f.attrs["wall_s"] == 1.5 and f.attrs["n"] == n
    tokens, reasons = read_completions(out)
    for i in range(n):
        exp, reason = fake_completion(i)
        assert np.array_equal(tokens[i], exp) and reasons[i] == reason


def test_flush_policy_and_resume(tmp_path: Path) -> None:
    out = tmp_path / "c.h5"
    store = CompletionStore(out, 10, "j", flush_every=4, flush_seconds=1e9)
    for i in range(6):
        store.add(i, *fake_completion(i))
    assert store.wait(timeout=30)  # the writer thread has the shard on disk
    assert store.n_done == 4  # one shard of 4 written, 2 still buffered
    shards = sorted(p.name for p in (tmp_path / "c.h5.parts").iterdir())
    assert shards == ["job.json", "shard-00000000.h5"]
    del store  # "killed": the two buffered completions are lost
    store = CompletionStore(out, 10, "j", flush_every=4, flush_seconds=1e9)
    assert store.done.tolist() == [True] * 4 + [False] * 6
    with pytest.raises(ValueError, match="already"):
        store.add(2, [1], FINISH_STOP)
    with pytest.raises(ValueError, match="out of range"):
        store.add(10, [1], FINISH_STOP)
    with pytest.raises(ValueError, match="finish_reason"):
        store.add(5, [1], 7)
    store.flush_seconds = 0.0  # now every add flushes at once
    store.add(4, *fake_completion(4))
    assert store.wait(timeout=30) and store.n_done == 5
    with pytest.raises(RuntimeError, match="not done"):
        store.finalize({})


def test_resumed_equals_uninterrupted(tmp_path: Path) -> None:
    n = 120
    a, b = tmp_path / "a" / "c.h5", tmp_path / "b" / "c.h5"
    a.parent.mkdir(), b.parent.mkdir()
    run_in_order(a, n, list(range(n)), flush_every=1000)
    order = list(range(n))
    random.Random(1).shuffle(order)
    for lo, hi in ((0, 30), (30, 31), (31, 90)):  # three runs, each ends with a flush
        with CompletionStore(b, n, "job-A", flush_every=7) as store:
            for i in order[lo:hi]:
                store.add(i, *fake_completion(i))
    store = CompletionStore(b, n, "job-A", flush_every=7)
    assert store.n_done == 90
    for i in np.flatnonzero(~store.done).tolist():
        store.add(i, *fake_completion(i))
    store.finalize({"note": "test", "wall_s": 1.5, "n": n})
    assert datasets(a) == datasets(b)
    assert a.read_bytes() == b.read_bytes()  # with equal attributes, the very same file
    assert CompletionStore(b, n, "job-A").complete


def test_job_identity(tmp_path: Path) -> None:
    out = tmp_path / "c.h5"
    run_in_order(out, 5, list(range(5)))
    before = out.read_bytes()
    again = CompletionStore(out, 5, "job-A")
    assert again.complete and again.n_done == 5
    again.finalize({})  # no-op
    assert out.read_bytes() == before
    with pytest.raises(InputError, match="belongs to another job.*io.overwrite: true"):
        CompletionStore(out, 5, "job-B")
    assert not (tmp_path / "c.h5.parts").exists()  # nothing created by a refused store
    # overwrite: the old output survives until the new job finalizes
    store = CompletionStore(out, 3, "job-B", overwrite=True)
    assert not store.complete and store.n_done == 0
    store.add(0, [5], FINISH_STOP)
    store.flush()
    assert out.read_bytes() == before
    store.add(1, [6], FINISH_STOP)
    store.add(2, [], FINISH_LENGTH)
    store.finalize({})
    tokens, reasons = read_completions(out)
    assert [t.tolist() for t in tokens] == [[5], [6], []] and reasons.tolist() == [1, 1, 2]


def test_overwrite_discards_other_parts(tmp_path: Path) -> None:
    out = tmp_path / "c.h5"
    with CompletionStore(out, 4, "old") as s:
        s.add(0, [1, 2], FINISH_STOP)
    with pytest.raises(InputError, match="partial results of another job.*io.overwrite: true"):
        CompletionStore(out, 4, "new")
    s = CompletionStore(out, 4, "new", overwrite=True)
    assert s.n_done == 0
    assert sorted(p.name for p in (tmp_path / "c.h5.parts").iterdir()) == ["job.json"]
    # Same job id but a different prompt count is another job too.
    with pytest.raises(InputError, match="another job"):
        CompletionStore(out, 5, "new")
    # A parts folder with an unreadable job.json: adopted while empty, foreign once it has shards.
    (tmp_path / "c.h5.parts" / "job.json").write_text("{trunc")
    assert CompletionStore(out, 4, "third").n_done == 0
    with CompletionStore(out, 4, "third") as s:
        s.add(1, [3], FINISH_STOP)
    (tmp_path / "c.h5.parts" / "job.json").write_text("{trunc")
    with pytest.raises(InputError, match="partial results of another job"):
        CompletionStore(out, 4, "third")


def test_complete_output_leaves_other_jobs_parts_alone(tmp_path: Path) -> None:
    out = tmp_path / "c.h5"
    run_in_order(out, 3, [0, 1, 2])
    with CompletionStore(out, 2, "job-B", overwrite=True) as s:  # B runs, is stopped
        s.add(0, [1], FINISH_STOP)
    assert CompletionStore(out, 3, "job-A").complete  # A again: nothing to do...
    assert (tmp_path / "c.h5.parts" / "shard-00000000.h5").exists()  # ...and B's work is kept
    assert CompletionStore(out, 2, "job-B", overwrite=True).n_done == 1


def test_folder_checks(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        CompletionStore(tmp_path / "nope" / "c.h5", 3, "j")
    (tmp_path / "dir.h5").mkdir()
    with pytest.raises(InputError, match="is a folder"):
        CompletionStore(tmp_path / "dir.h5", 3, "j")
    (tmp_path / "x.h5.parts").write_text("")
    with pytest.raises(InputError, match="in the way"):
        CompletionStore(tmp_path / "x.h5", 3, "j")
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        with pytest.raises(InputError, match="not writable"):
            CompletionStore(ro / "c.h5", 3, "j")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.h5", "x.h5.parts"] + (
        ["ro"] if os.geteuid() != 0 else [])
    # A foreign, non-ghmpi file at the output path is "another job".
    (tmp_path / "other.h5").write_bytes(b"not hdf5")
    with pytest.raises(InputError, match="another job"):
        CompletionStore(tmp_path / "other.h5", 3, "j")


def test_ignores_tmp_and_unreadable_shards(tmp_path: Path) -> None:
    out = tmp_path / "c.h5"
    with CompletionStore(out, 6, "j", flush_every=2) as s:
        for i in range(4):
            s.add(i, [i], FINISH_STOP)
    parts = tmp_path / "c.h5.parts"
    (parts / "shard-00000002.h5.tmp").write_bytes(b"half a shard")
    (parts / "shard-00000005.h5").write_bytes(b"garbage")  # damaged on disk
    s = CompletionStore(out, 6, "j", flush_every=1)
    assert s.done.tolist() == [True] * 4 + [False] * 2
    assert s.ignored_shards == ["shard-00000005.h5"]
    assert not (parts / "shard-00000002.h5.tmp").exists()
    s.add(4, [4], FINISH_STOP)  # numbering continues past the damaged shard
    assert s.wait(timeout=30)
    assert (parts / "shard-00000006.h5").exists()
    s.add(5, [5], FINISH_LENGTH)
    s.finalize({})
    tokens, reasons = read_completions(out)
    assert [t.tolist() for t in tokens] == [[i] for i in range(6)]
    assert reasons.tolist() == [1] * 5 + [2]


def test_completion_file_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        CompletionFile(tmp_path / "none.h5")
    (tmp_path / "bad.h5").write_text("x")
    with pytest.raises(InputError, match="not a readable HDF5"):
        CompletionFile(tmp_path / "bad.h5")
    with h5py.File(tmp_path / "partial.h5", "w") as f:
        f["tokens"] = np.zeros(3, np.int32)
    with pytest.raises(InputError, match="finish_reason"):
        CompletionFile(tmp_path / "partial.h5")


WRITER = """
import sys, time
import numpy as np
from ghmpi.io.completions import FINISH_LENGTH, FINISH_STOP, CompletionStore
{fake_completion}
out, n = sys.argv[1], int(sys.argv[2])
store = CompletionStore(out, n, "crash-job", flush_every=2, flush_seconds=1e9)
print("ready", flush=True)
for i in range(n):
    if not store.done[i]:
        time.sleep(0.002)  # pace the writer: kills land mid-stream however fast the disk
        store.add(i, *fake_completion(i))
store.finalize({{"note": "test"}})
"""


def test_sigkill_at_random_times(tmp_path: Path) -> None:
    """A writer SIGKILLed mid-stream (>= 3 times) leaves only whole shards; resuming completes
    with the same datasets as an uninterrupted run."""
    n = 200
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(fake_completion=inspect.getsource(fake_completion)))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "crash" / "c.h5"
    out.parent.mkdir()
    rng = random.Random(1234)

    def start() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, str(script), str(out), str(n)], env=env,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        return proc

    kills, progress = 0, []
    for _ in range(20):
        proc = start()
        time.sleep(rng.uniform(0.02, 0.1))  # <= 50 prompts at 2 ms each
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=30)
        if out.exists() or kills == 3:
            break
        # Every persisted shard is whole: a fresh store reads them all and ignores none.
        store = CompletionStore(out, n, "crash-job")
        assert store.ignored_shards == []
        progress.append(store.n_done)
        del store
    assert kills >= 3, f"only {kills} kills landed"
    assert progress == sorted(progress) and progress[-1] < n, progress
    proc = start()  # resume to the end (or clean up after a kill that hit the final rename)
    assert proc.wait(timeout=120) == 0, "the resumed writer failed"
    assert out.exists()
    ref = tmp_path / "ref" / "c.h5"
    ref.parent.mkdir()
    run_in_order(ref, n, list(range(n)), job="crash-job")
    assert datasets(out) == datasets(ref)
    assert not (tmp_path / "crash" / "c.h5.parts").exists()


# ---- the writer thread: bounded, and storage errors in plain words ---------------------------

def test_a_slow_disk_blocks_add_instead_of_growing_memory(tmp_path: Path, monkeypatch) -> None:
    import threading

    from ghmpi.io import shards

    gate = threading.Event()
    real = shards.write_shard

    def slow(path, batch):  # the disk answers only when the test opens the gate
        gate.wait(30)
        return real(path, batch)

    monkeypatch.setattr(shards, "write_shard", slow)
    store = CompletionStore(tmp_path / "c.h5", 20, "j", flush_every=1, queue_shards=2)
    added = []

    def producer() -> None:
        for i in range(6):
            store.add(i, [i], FINISH_STOP)
            added.append(i)

    t = threading.Thread(target=producer, daemon=True)
    t.start()
    time.sleep(0.5)
    # one shard with the writer, two queued: the fourth add waits for the disk
    assert added == [0, 1, 2], added
    gate.set()
    t.join(30)
    assert added == list(range(6))
    store.close()
    assert CompletionStore(tmp_path / "c.h5", 20, "j").n_done == 6


def test_a_failed_write_is_reported_and_leaves_only_whole_shards(tmp_path: Path, monkeypatch) -> None:
    import errno

    from ghmpi.errors import StorageError

    out = tmp_path / "c.h5"
    store = CompletionStore(out, 10, "j", flush_every=2)
    for i in range(4):
        store.add(i, [i], FINISH_STOP)
    store.flush()
    real_rename = os.rename

    def no_quota(src, dst):  # the quota runs out at the next shard's rename
        if str(src).endswith(".h5.tmp"):
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", no_quota)
    for i in range(4, 8):
        store.add(i, [i], FINISH_STOP)
    with pytest.raises(StorageError) as e:
        store.flush()
    msg = str(e.value)
    assert "cannot write shard" in msg and "shard-00000002.h5" in msg and "(EDQUOT)" in msg
    assert store.n_done == 4 and store.lost == 4
    parts = tmp_path / "c.h5.parts"
    assert sorted(p.name for p in parts.iterdir()) == ["job.json", "shard-00000000.h5",
                                                       "shard-00000001.h5"]
    monkeypatch.setattr(os, "rename", real_rename)
    store.close_writer()
    again = CompletionStore(out, 10, "j")  # the rerun resumes from the whole shards
    assert again.n_done == 4 and again.ignored_shards == []


def test_h5py_write_failure_text_gives_the_errno() -> None:
    from ghmpi.io.shards import os_error

    e = os_error(RuntimeError("Disable slist on flush dest failure failed (file write failed: "
                               "time = x, filename = 'a', errno = 28, error message = 'No space')"))
    assert e.errno == 28 and e.strerror == os.strerror(28)


@pytest.fixture()
def tiny_fs(tmpfs) -> Path:
    """A 96 KiB tmpfs (root only): a real full filesystem."""
    return tmpfs("96k")


def test_full_filesystem(tiny_fs: Path) -> None:
    from ghmpi.errors import StorageError

    out = tiny_fs / "c.h5"
    n = 400
    store = CompletionStore(out, n, "j", flush_every=5)
    with pytest.raises(StorageError, match=r"No space left on device \(ENOSPC\)"):
        for i in range(n):
            store.add(i, *fake_completion(i))
        store.flush()
    store.close_writer()
    assert 0 < store.n_done < n
    assert not list((tiny_fs / "c.h5.parts").glob("*.tmp"))  # removed: the space is back
    subprocess.run(["mount", "-o", "remount,size=8m", str(tiny_fs)], check=True)
    again = CompletionStore(out, n, "j", flush_every=50)
    assert again.n_done == store.n_done and again.ignored_shards == []
    for i in np.flatnonzero(~again.done).tolist():
        again.add(i, *fake_completion(i))
    again.flush()
    filler = tiny_fs / "filler"  # another user fills the disk before the final file is written
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    with pytest.raises(StorageError, match=r"cannot write the final file .*c\.h5\.tmp.*ENOSPC"):
        again.finalize({})
    assert not out.exists() and not (tiny_fs / "c.h5.tmp").exists()
    assert CompletionStore(out, n, "j").n_done == n  # every shard still whole
    filler.unlink()
    again.finalize({})
    tokens, reasons = read_completions(out)
    for i in range(n):
        assert np.array_equal(tokens[i], fake_completion(i)[0])
