"""The stall watchdog fires after its timeout without beats, even while the main thread is
blocked in a system call, and never while beats come."""

from __future__ import annotations

import os
import threading
import time

from ghmpi.runtime.watchdog import Watchdog


def test_fires_once_with_the_description() -> None:
    fired: list[str] = []
    done = threading.Event()
    w = Watchdog(0.3, lambda: "rank 2 (tier-2 #1)", lambda r: (fired.append(r), done.set()))
    assert done.wait(10)
    time.sleep(0.3)
    assert len(fired) == 1 and w.fired
    assert "no token for" in fired[0] and "runtime.stall_timeout=0.3" in fired[0]
    assert fired[0].endswith("waiting on rank 2 (tier-2 #1)")


def test_beats_keep_it_quiet_and_stop_ends_it() -> None:
    fired: list[str] = []
    w = Watchdog(0.4, lambda: "x", fired.append)
    end = time.monotonic() + 1.5
    while time.monotonic() < end:
        w.beat()
        time.sleep(0.05)
    w.stop()
    time.sleep(0.8)
    assert fired == [] and not w.fired


def test_off_at_zero() -> None:
    w = Watchdog(0, lambda: "x", lambda r: None)
    assert w._thread is None


def test_a_main_thread_blocked_in_a_system_call_does_not_stop_it() -> None:
    r, wfd = os.pipe()
    fired: list[str] = []

    def on_stall(reason: str) -> None:
        fired.append(reason)
        os.write(wfd, b"x")  # what ends the job ends the blocked read here

    Watchdog(0.3, lambda: "a stopped rank", on_stall)
    t0 = time.monotonic()
    assert os.read(r, 1) == b"x"  # blocks in read(2) until the watchdog acts
    assert time.monotonic() - t0 < 10 and len(fired) == 1
    os.close(r)
    os.close(wfd)


def test_a_failing_description_still_ends_the_job() -> None:
    done = threading.Event()
    got: list[str] = []

    def describe() -> str:
        raise RuntimeError("boom")

    Watchdog(0.2, describe, lambda r: (got.append(r), done.set()))
    assert done.wait(10)
    assert "could not tell what it waits on: RuntimeError: boom" in got[0]
