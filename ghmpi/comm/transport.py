"""Moving bytes between ranks: framing, nonblocking sends, polling receives.

Knows nothing of layers or tensors. A message is one contiguous uint8 buffer: an int64 count h,
h int64 header words, then the payload bytes. Bulk data uses the upper-case buffer API
(`Isend`/`Irecv`/`Recv`); every send is nonblocking and its buffer is kept alive until the
request completes, so no rank ever blocks in a send while its peer is blocked too.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
from mpi4py import MPI

# Tags. A reply to micro-batch m carries TAG_REPLY + m, so each rank can post its receives early.
TAG_WORK = 1  # tier 1 -> tier 2: q/k/v of decode rows and prompt K/V to store
TAG_RING = 2  # slice j -> slice j+1: hidden states of a micro-batch, with its plan
TAG_TOKENS = 3  # last slice -> slice 0: sampled tokens of a micro-batch
TAG_STOP = 4  # shutdown; header word 0 is the exit status
TAG_REPLY = 1000

_I64 = np.dtype(np.int64).itemsize


def pack(header: Sequence[int] | np.ndarray, payloads: Sequence[np.ndarray] = ()) -> np.ndarray:
    """Frame header words and payload byte arrays into one uint8 buffer."""
    header = np.asarray(header, dtype=np.int64)
    sizes = [p.nbytes for p in payloads]
    buf = np.empty(_I64 * (1 + header.size) + sum(sizes), dtype=np.uint8)
    buf[:_I64].view(np.int64)[0] = header.size
    buf[_I64:_I64 * (1 + header.size)].view(np.int64)[:] = header
    at = _I64 * (1 + header.size)
    for p, n in zip(payloads, sizes):
        buf[at:at + n] = p.reshape(-1).view(np.uint8)
        at += n
    return buf


def unpack(buf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `pack`: (int64 header words, uint8 payload view)."""
    h = int(buf[:_I64].view(np.int64)[0])
    end = _I64 * (1 + h)
    return buf[_I64:end].view(np.int64), buf[end:]


class Outbox:
    """Nonblocking sends whose buffers stay referenced until MPI is done with them."""

    def __init__(self, comm: MPI.Comm):
        self.comm = comm
        self._pending: list[tuple[MPI.Request, np.ndarray]] = []

    def send(self, buf: np.ndarray, dest: int, tag: int) -> None:
        req = self.comm.Isend([buf, MPI.BYTE], dest=dest, tag=tag)
        self._pending.append((req, buf))

    def poll(self) -> None:
        if self._pending:
            self._pending = [(r, b) for r, b in self._pending if not r.Test()]

    def drain(self, timeout: float = 60.0) -> None:
        """Wait until every send has completed (peers keep receiving until they see our STOP)."""
        deadline = time.monotonic() + timeout
        backoff = Backoff()
        while self._pending:
            self.poll()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self._pending)} send(s) not received within {timeout:.0f} s")
            backoff.idle()


def try_recv(comm: MPI.Comm, source: int = MPI.ANY_SOURCE, tag: int = MPI.ANY_TAG
             ) -> tuple[np.ndarray, int, int] | None:
    """Receive one waiting message of any size, or None if nothing is there yet.

    Returns (buffer, source, tag)."""
    status = MPI.Status()
    if not comm.Iprobe(source=source, tag=tag, status=status):
        return None
    buf = np.empty(status.Get_count(MPI.BYTE), dtype=np.uint8)
    comm.Recv([buf, MPI.BYTE], source=status.Get_source(), tag=status.Get_tag())
    return buf, status.Get_source(), status.Get_tag()


class Backoff:
    """Idle waiting that stays responsive without busy-spinning an oversubscribed core.

    Spins a few rounds, then sleeps with growing pauses up to `cap` seconds; `reset` after work."""

    def __init__(self, cap: float = 0.002):
        self.cap = cap
        self.rounds = 0

    def reset(self) -> None:
        self.rounds = 0

    def idle(self) -> None:
        self.rounds += 1
        if self.rounds > 8:
            time.sleep(min(self.cap, 1e-5 * (self.rounds - 8)))
