"""One job per output: an exclusive lock on `<output>`, its `<output>.parts/` and the final file.

The lock is a file `<output>.lock` created with `O_CREAT | O_EXCL`, which is atomic on local
filesystems and on the shared ones clusters use (NFSv3+, Lustre, GPFS), unlike `flock`, which
NFS may not propagate between clients. It holds the holder's host, boot id, pid (with the pid's
start time, against pid reuse), start time and a random token, as JSON. The holder renews a lease
by touching the file every `LEASE_S / 4` seconds from a thread, so a rank busy in a long system
call still renews it.

A second job finding the lock takes it over, with a warning, only when the holder is provably
gone: on the same host (same boot) its pid no longer runs, or the lease was not renewed for
`LEASE_S` seconds. Otherwise it refuses with an `OutputInUseError` naming the holder. A takeover
renames the stale lock aside (atomic: of two contenders only one succeeds) and checks that what it
renamed is the stale lock it judged, so a live holder is never displaced.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass

from ghmpi.errors import InputError

__all__ = ["LEASE_S", "OutputLock", "OutputInUseError", "Holder"]

LEASE_S = 120.0  # a lock not renewed for this long is stale (renewed every LEASE_S / 4)


class OutputInUseError(InputError):
    """Another live job holds the output."""


@dataclass(frozen=True)
class Holder:
    host: str
    boot_id: str
    pid: int
    pid_start: str  # /proc/<pid>/stat starttime ('' where unknown)
    started: float  # epoch seconds
    token: str

    @staticmethod
    def parse(text: str) -> "Holder | None":
        try:
            d = json.loads(text)
            return Holder(str(d["host"]), str(d.get("boot_id", "")), int(d["pid"]),
                          str(d.get("pid_start", "")), float(d["started"]), str(d["token"]))
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return f"host {self.host}, pid {self.pid}, started {when}"


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_start(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _pid_alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    return not start or not _pid_start(pid) or _pid_start(pid) == start


class OutputLock:
    """Exclusive ownership of an output path while a job runs. `acquire` first, `release` last."""

    def __init__(self, output: str | os.PathLike, lease_s: float = LEASE_S) -> None:
        self.output = os.fspath(output)
        self.path = self.output + ".lock"
        self.lease_s = float(lease_s)
        self.me = Holder(socket.gethostname(), _boot_id(), os.getpid(), _pid_start(os.getpid()),
                         time.time(), secrets.token_hex(8))
        self.held = False
        self.lost_to: Holder | None = None  # set by the renewer if another job took the lock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- taking it -----------------------------------------------------------------------------

    def acquire(self) -> None:
        """Take the lock, taking over a provably dead holder's; OutputInUseError otherwise."""
        for _ in range(5):  # a few rounds: a contender may take over between our steps
            if self._create():
                self._start_renewing()
                return
            text, mtime = self._read()
            if text is None:
                continue  # vanished between create and read: try again
            holder = Holder.parse(text)
            why = self._stale(holder, mtime)
            if why is None:
                age = max(0.0, time.time() - mtime)
                who = holder.describe() if holder else "an unreadable lock"
                raise OutputInUseError(
                    f"output {self.output} is in use by another job ({who}; lease renewed "
                    f"{age:.0f} s ago, lock {self.path}); wait for it to end, or give this job "
                    f"another io.output (a lock not renewed for {self.lease_s:.0f} s is taken over)")
            if self._take_over(text):
                who = holder.describe() if holder else "an unreadable lock"
                print(f"ghmpi: warning: took over {self.path} from a job that is gone ({who}: "
                      f"{why})", file=sys.stderr, flush=True)
        raise OutputInUseError(f"output {self.output}: could not take the lock {self.path} "
                               "(other jobs keep taking it); is the same job starting repeatedly?")

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise InputError(f"output {self.output}: cannot create the lock {self.path} "
                             f"({e.strerror})") from None
        try:
            os.write(fd, (json.dumps(self.me.__dict__) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        self.held = True
        return True

    def _read(self) -> tuple[str | None, float]:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                return f.read(), os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None, 0.0

    def _stale(self, holder: Holder | None, mtime: float) -> str | None:
        """Why the lock's holder is provably gone, or None if it may be alive."""
        age = time.time() - mtime
        if age > self.lease_s:
            return f"lease not renewed for {age:.0f} s"
        if (holder is not None and holder.host == self.me.host and holder.boot_id == self.me.boot_id
                and not _pid_alive(holder.pid, holder.pid_start)):
            return "that process no longer runs on this host"
        return None

    def _take_over(self, judged: str) -> bool:
        aside = f"{self.path}.stale-{self.me.token}"
        try:
            os.rename(self.path, aside)  # of two contenders only one renames a given file
        except FileNotFoundError:
            return False
        with open(aside, encoding="utf-8", errors="replace") as f:
            got = f.read()
        if got != judged:  # a live lock created after our judgement: put it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            os.unlink(aside)
            return False
        os.unlink(aside)
        return True  # the next round of acquire creates ours

    # ---- holding it ----------------------------------------------------------------------------

    def _start_renewing(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._renew_loop, name="ghmpi-lock-lease",
                                            daemon=True)
            self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            self.renew()

    def renew(self) -> None:
        """Touch the lock (the lease), unless another job has taken it over meanwhile."""
        text, _ = self._read()
        holder = Holder.parse(text) if text else None
        if holder is None or holder.token != self.me.token:
            if self.lost_to is None:
                self.lost_to = holder
                who = holder.describe() if holder else "nobody"
                print(f"ghmpi: warning: the lock {self.path} is no longer this job's (now: {who}); "
                      "was this job stopped for longer than the lease?", file=sys.stderr, flush=True)
            return
        try:
            os.utime(self.path)
        except OSError:
            pass  # a filesystem hiccup: the next renewal tries again

    def release(self) -> None:
        """Stop renewing and remove the lock if it is still ours. Idempotent."""
        self._stop.set()
        if not self.held:
            return
        self.held = False
        text, _ = self._read()
        holder = Holder.parse(text) if text else None
        if holder is not None and holder.token == self.me.token:
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
