"""The stall watchdog: a job that stops producing tokens ends, with a reason, instead of hanging.

A rank stopped by the kernel (SIGSTOP, an NFS stall, a swapping node, a stuck driver) sends and
answers nothing, and MPI has no timeout: every other rank would wait for it until the batch
system's time limit. Rank 0 knows when tokens stop coming. The watchdog is a thread, so it runs
even while rank 0's own loop is blocked in a system call or an MPI wait: the loop calls `beat()`
whenever a token is produced; when `timeout_s` seconds pass without one, the thread asks
`describe()` what the job is waiting on and hands that to `on_stall`, which persists the finished
work and ends the whole job (see `ghmpi.runtime.job`). Knows nothing of MPI itself.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable

__all__ = ["Watchdog"]


class Watchdog:
    """`Watchdog(timeout_s, describe, on_stall)`: `beat()` on progress, `stop()` when done.

    timeout_s <= 0 turns it off (no thread). `on_stall(reason)` runs once, on the watchdog's
    thread; `reason` says how long nothing happened and what `describe()` returned."""

    def __init__(self, timeout_s: float, describe: Callable[[], str],
                 on_stall: Callable[[str], None]) -> None:
        self.timeout_s = float(timeout_s)
        self.describe, self.on_stall = describe, on_stall
        self.fired = False
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, name="ghmpi-stall-watchdog",
                                            daemon=True)
            self._thread.start()

    def beat(self) -> None:
        """Progress was made (a token): the clock starts again. Cheap: one float store."""
        self._last = time.monotonic()

    def stop(self) -> None:
        """No more watching (the loop ended); an `on_stall` already running is not interrupted."""
        self._stop.set()

    def idle_seconds(self) -> float:
        return time.monotonic() - self._last

    def _watch(self) -> None:
        check = min(1.0, max(self.timeout_s / 10, 0.05))  # seconds between looks
        while not self._stop.wait(check):
            idle = self.idle_seconds()
            if idle < self.timeout_s:
                continue
            try:
                what = self.describe()
            except Exception as e:  # describing must never keep the job from ending
                what = f"(could not tell what it waits on: {type(e).__name__}: {e})"
            self.fired = True
            try:
                self.on_stall(f"no token for {idle:.0f} s (runtime.stall_timeout="
                              f"{self.timeout_s:g}); waiting on {what}")
            except BaseException as e:  # noqa: BLE001 -- a thread's exception would be lost
                print(f"ghmpi: error: the stall watchdog failed to end the job: "
                      f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
            return
