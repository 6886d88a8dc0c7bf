"""Stop requests: SIGTERM (scancel) and SIGUSR1 (Slurm's --signal before the time limit).

Installed first thing in `run`, before torch and MPI are imported, so a signal that arrives while
a rank is still starting is remembered rather than killing it (the default action of both). The
job then stops admitting prompts, saves what is finished and exits with EXIT_INTERRUPTED."""

from __future__ import annotations

import signal

_received: int | None = None


def _handle(signum: int, frame: object) -> None:
    global _received
    _received = signum


def install() -> None:
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _handle)


def received() -> int | None:
    """The stop signal received so far, if any."""
    return _received
