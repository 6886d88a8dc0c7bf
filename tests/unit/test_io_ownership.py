"""One job per output: the lock file, its lease, and taking over from a job that is gone."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ghmpi.io.ownership import Holder, OutputInUseError, OutputLock, _boot_id


def _write_lock(path: Path, **fields) -> None:
    holder = {"host": socket.gethostname(), "boot_id": _boot_id(), "pid": os.getpid(),
              "pid_start": "", "started": time.time() - 60, "token": "someone-else"}
    holder.update(fields)
    path.write_text(json.dumps(holder))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    return proc.pid


def test_exclusive_then_free(tmp_path: Path) -> None:
    out = tmp_path / "c.h5"
    a = OutputLock(out)
    a.acquire()
    lock = Path(str(out) + ".lock")
    held = Holder.parse(lock.read_text())
    assert held.pid == os.getpid() and held.host == socket.gethostname()
    b = OutputLock(out)
    with pytest.raises(OutputInUseError) as e:
        b.acquire()
    msg = str(e.value)
    assert f"host {socket.gethostname()}, pid {os.getpid()}, started " in msg and "UTC" in msg
    assert "io.output" in msg
    assert Holder.parse(lock.read_text()).token == held.token  # the holder is undisturbed
    a.release()
    assert not lock.exists()
    with OutputLock(out):  # free again
        assert lock.exists()
    assert not lock.exists()


def test_takes_over_a_dead_pid_on_this_host(tmp_path: Path, capsys) -> None:
    out = tmp_path / "c.h5"
    pid = _dead_pid()
    _write_lock(Path(str(out) + ".lock"), pid=pid)
    with OutputLock(out) as lock:
        assert Holder.parse(Path(lock.path).read_text()).token == lock.me.token
    err = capsys.readouterr().err
    assert "ghmpi: warning: took over" in err and f"pid {pid}" in err and "no longer runs" in err
    assert not list(tmp_path.glob("*.stale-*"))


def test_takes_over_a_lease_not_renewed(tmp_path: Path, capsys) -> None:
    out = tmp_path / "c.h5"
    path = Path(str(out) + ".lock")
    _write_lock(path, host="node-that-died", boot_id="other")
    old = time.time() - 3600
    os.utime(path, (old, old))
    with OutputLock(out):
        pass
    assert "lease not renewed for 3600 s" in capsys.readouterr().err


def test_refuses_a_live_holder_elsewhere(tmp_path: Path) -> None:
    out = tmp_path / "c.h5"
    path = Path(str(out) + ".lock")
    _write_lock(path, host="gpu-node-7", boot_id="other", pid=4242)  # fresh lease, other host
    with pytest.raises(OutputInUseError, match="host gpu-node-7, pid 4242"):
        OutputLock(out).acquire()
    _write_lock(path, pid=os.getpid())  # this host, a running process (ourselves)
    with pytest.raises(OutputInUseError):
        OutputLock(out).acquire()
    path.write_text("")  # being written by a contender right now: not stale yet
    with pytest.raises(OutputInUseError, match="unreadable lock"):
        OutputLock(out).acquire()


def test_the_lease_is_renewed_by_a_thread(tmp_path: Path, capsys) -> None:
    out = tmp_path / "c.h5"
    lock = OutputLock(out, lease_s=0.4)  # renewed every 0.1 s
    lock.acquire()
    path = Path(lock.path)
    old = time.time() - 100
    os.utime(path, (old, old))
    deadline = time.monotonic() + 10
    while path.stat().st_mtime < time.time() - 5:
        assert time.monotonic() < deadline, "the lease was not renewed"
        time.sleep(0.05)
    # Another job took the lock (this one looked dead): the renewer notices and says so.
    _write_lock(path, host="other-node", boot_id="x", token="theirs")
    deadline = time.monotonic() + 10
    while lock.lost_to is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    lock.release()
    assert Holder.parse(path.read_text()).token == "theirs"  # release leaves theirs alone
    assert "no longer this job's" in capsys.readouterr().err
