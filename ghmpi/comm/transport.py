"""Moving bytes between ranks: framing, nonblocking sends, polling receives.

Knows nothing of layers or tensors. A message is one contiguous uint8 buffer: an int64 count h,
h int64 header words, then the payload bytes. Bulk data uses the upper-case buffer API
(`Isend`/`Irecv`/`Recv`); every send is nonblocking and its buffer is kept alive until the
request completes, so no rank ever blocks in a send while its peer is blocked too.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import threading
import time
from typing import Callable, Hashable, Sequence

import numpy as np
from mpi4py import MPI

# Tags. A reply to micro-batch m carries TAG_REPLY + m, so each rank can post its receives early.
TAG_WORK = 1  # tier 1 -> tier 2: q/k/v of decode rows and prompt K/V to store
TAG_RING = 2  # slice j -> slice j+1: hidden states of a micro-batch, with its plan
TAG_TOKENS = 3  # last slice -> slice 0: sampled tokens of a micro-batch
TAG_STOP = 4  # shutdown; header word 0 is the exit status
TAG_REPLY = 1000

_I64 = np.dtype(np.int64).itemsize


def frame_size(n_header: int, payload_nbytes: int) -> int:
    """Bytes of a framed message with `n_header` header words and that much payload."""
    return _I64 * (1 + n_header) + payload_nbytes


def write_header(buf: np.ndarray, header: Sequence[int] | np.ndarray) -> int:
    """Write the header words at the start of `buf`; return where the payload begins."""
    header = np.asarray(header, dtype=np.int64)
    buf[:_I64].view(np.int64)[0] = header.size
    end = frame_size(header.size, 0)
    buf[_I64:end].view(np.int64)[:] = header
    return end


def pack(header: Sequence[int] | np.ndarray, payloads: Sequence[np.ndarray] = ()) -> np.ndarray:
    """Frame header words and payload byte arrays into one new uint8 buffer (small messages)."""
    buf = np.empty(frame_size(len(header), sum(p.nbytes for p in payloads)), dtype=np.uint8)
    at = write_header(buf, header)
    for p in payloads:
        buf[at:at + p.nbytes] = p.reshape(-1).view(np.uint8)
        at += p.nbytes
    return buf


def unpack(buf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `pack`: (int64 header words, uint8 payload view)."""
    h = int(buf[:_I64].view(np.int64)[0])
    end = frame_size(h, 0)
    return buf[_I64:end].view(np.int64), buf[end:]


def _host_bytes(nbytes: int) -> np.ndarray:
    return np.empty(nbytes, dtype=np.uint8)


class Outbox:
    """Nonblocking sends whose buffers stay referenced until MPI is done with them.

    Bulk messages go out of preallocated buffers, one per key (a micro-batch and a peer): a key's
    buffer is reused once its previous send has completed, and grows only when a message is
    larger than any before. `alloc` makes those buffers (page-locked ones beside a GPU)."""

    def __init__(self, comm: MPI.Comm, alloc: Callable[[int], np.ndarray] = _host_bytes):
        self.comm = comm
        self.alloc = alloc
        self._pending: list[tuple[MPI.Request, np.ndarray]] = []  # one-off buffers
        self._keyed: dict[Hashable, MPI.Request] = {}
        self._buffers: dict[Hashable, np.ndarray] = {}

    def buffer(self, key: Hashable, nbytes: int) -> np.ndarray:
        """`key`'s send buffer, at least `nbytes` long, free to overwrite. Waiting for the previous
        send cannot deadlock: every peer keeps receiving until it is told to stop."""
        prev = self._keyed.pop(key, None)
        if prev is not None:
            prev.Wait()
        buf = self._buffers.get(key)
        if buf is None or buf.nbytes < nbytes:
            buf = self._buffers[key] = self.alloc(nbytes + nbytes // 4)  # headroom for growth
        return buf[:nbytes]

    def send(self, buf: np.ndarray, dest: int, tag: int, key: Hashable | None = None) -> None:
        req = self.comm.Isend([buf, MPI.BYTE], dest=dest, tag=tag)
        if key is None:
            self._pending.append((req, buf))
        else:
            self._keyed[key] = req

    def poll(self) -> None:
        if self._pending:
            self._pending = [(r, b) for r, b in self._pending if not r.Test()]

    def drain(self, timeout: float = 60.0) -> None:
        """Wait until every send has completed (peers keep receiving until they see our STOP)."""
        deadline = time.monotonic() + timeout
        backoff = Backoff()
        while self._pending or self._keyed:
            self.poll()
            self._keyed = {k: r for k, r in self._keyed.items() if not r.Test()}
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self._pending) + len(self._keyed)} send(s) not received "
                                   f"within {timeout:.0f} s")
            backoff.idle()


class DelayLine:
    """Sends held back `delay` seconds (an emulated network hop), each sent once it is due, in
    order. Used as a context manager, a thread of its own sends what falls due (it wakes only
    then), so a send leaves on time while its owner computes; the owner's `pump` sends what is
    due too, and forgets the sends that have completed. The sends go through an `Outbox` of the
    line's own, touched only under the line's lock."""

    def __init__(self, comm: MPI.Comm, delay: float):
        self.delay = delay
        self._cond = threading.Condition()
        self._held: collections.deque[tuple[float, np.ndarray, int, int]] = collections.deque()
        self._out = Outbox(comm)
        self._thread: threading.Thread | None = None
        self._stopping = False

    def __enter__(self) -> "DelayLine":
        if MPI.Query_thread() == MPI.THREAD_MULTIPLE:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="ghmpi-delay-line",
                                            daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def hold(self, buf: np.ndarray, dest: int, tag: int) -> None:
        with self._cond:
            self._held.append((time.monotonic() + self.delay, buf, dest, tag))
            self._cond.notify()

    def _send_due(self) -> None:
        now = time.monotonic()
        while self._held and self._held[0][0] <= now:
            _, buf, dest, tag = self._held.popleft()
            self._out.send(buf, dest, tag)

    def _run(self) -> None:
        with self._cond:
            while not self._stopping:
                self._send_due()
                wait = self.next_due()
                self._cond.wait(wait)  # until the next is due, or one is held (None: forever)

    def pump(self) -> None:
        """Send what is due; forget the sends that have completed."""
        with self._cond:
            self._send_due()
            self._out.poll()

    def pending(self) -> bool:
        """Something is held, not yet sent."""
        return bool(self._held)

    def next_due(self) -> float | None:
        """Seconds until the next held send is due (None: nothing held)."""
        held = self._held
        return max(0.0, held[0][0] - time.monotonic()) if held else None

    def drain(self, timeout: float = 60.0) -> None:
        """Send everything held when due (within `delay`) and wait until every send has
        completed (`Outbox.drain`). The owner holds nothing more meanwhile, so the line's thread
        sends nothing once the held sends are out."""
        backoff = Backoff()
        while self._held:
            self.pump()
            backoff.idle(self.next_due())
        with self._cond:
            self._out.drain(timeout)


def try_recv(comm: MPI.Comm, source: int = MPI.ANY_SOURCE, tag: int = MPI.ANY_TAG
             ) -> tuple[np.ndarray, int, int] | None:
    """Receive one waiting message of any size into a new buffer, or None if nothing is there
    yet. Returns (buffer, source, tag)."""
    status = MPI.Status()
    if not comm.Iprobe(source=source, tag=tag, status=status):
        return None
    buf = _host_bytes(status.Get_count(MPI.BYTE))
    comm.Recv([buf, MPI.BYTE], source=status.Get_source(), tag=status.Get_tag())
    return buf, status.Get_source(), status.Get_tag()


class Inbox:
    """Messages of any size in arrival order, each received while the one before is served.

    `get` hands out the next message and at once starts receiving the one after it, if its
    envelope is in (a matched probe, then a nonblocking receive into a free buffer): its bytes
    move while the caller works on this one (by the transport's own copy, or by the progress
    thread), so a message that waited in the queue is there when the caller comes back. A buffer
    handed out is the caller's until it gives it back with `done` (a caller that serves one
    message at a time gives each back before its next `get`: two buffers take turns)."""

    def __init__(self, comm: MPI.Comm):
        self.comm = comm
        self._free: list[np.ndarray] = []  # buffers given back, to receive into again
        self._ahead: tuple[np.ndarray, int, int, MPI.Request] | None = None

    def _start(self) -> bool:
        status = MPI.Status()
        msg = self.comm.Improbe(status=status)
        if msg is None:
            return False
        n = status.Get_count(MPI.BYTE)
        fits = [i for i, b in enumerate(self._free) if b.nbytes >= n]
        if fits:  # the smallest free buffer that fits
            base = self._free.pop(min(fits, key=lambda i: self._free[i].nbytes))
        else:  # none fits: a new one, in place of the largest free one (if any)
            if self._free:
                self._free.pop(max(range(len(self._free)), key=lambda i: self._free[i].nbytes))
            base = np.empty(n + n // 4, dtype=np.uint8)
        buf = base[:n]
        self._ahead = (buf, status.Get_source(), status.Get_tag(), msg.Irecv([buf, MPI.BYTE]))
        return True

    def get(self) -> tuple[np.ndarray, int, int] | None:
        """(buffer, source, tag) of the next message, or None if none has arrived yet."""
        if self._ahead is None and not self._start():
            return None
        buf, source, tag, req = self._ahead
        self._ahead = None
        req.Wait()
        self._start()
        return buf, source, tag

    def done(self, buf: np.ndarray) -> None:
        """The caller has finished with a buffer `get` handed out: it may be received into again."""
        self._free.append(buf if buf.base is None else buf.base)

    def close(self) -> None:
        """Nothing to stop (as `NativeInbox.close`): a receive started ahead is the next `get`'s."""


class NativeInbox:
    """`Inbox`'s service from the native progress thread (`progress.cpp`, `ghmpi_inbox_*`): the
    thread takes each message off the wire as soon as its envelope arrives, up to `AHEAD` ahead,
    into buffers lent to it, and its probes move the bytes while this rank computes. `Inbox`
    starts the next receive only when its caller comes back for a message, and a message that
    arrived meanwhile then moves while the caller waits (without single copy, a message larger
    than the eager limit moves only once its receive is posted). Same calls as `Inbox`, plus
    `close`: every receive on the communicator goes through it until then. Made by
    `ProgressThread.inbox`, while the native thread runs."""

    AHEAD = 2  # messages received ahead at most
    FIRST_BYTES = 1 << 20  # the buffers lent at the start (more, larger, as messages need)

    def __init__(self, comm: MPI.Comm, lib: ctypes.CDLL, functions: Sequence[int]):
        self.comm, self._lib = comm, lib
        src_off, tag_off = _status_offsets()
        if lib.ghmpi_inbox_open(*functions, _handle(comm), _handle(MPI.BYTE), MPI.ANY_SOURCE,
                                MPI.ANY_TAG, src_off, tag_off, self.AHEAD) != 0:
            raise RuntimeError("the native inbox is open already")
        self._bufs: dict[int, np.ndarray] = {}  # id -> a buffer lent to the thread
        self._ids: dict[int, int] = {}  # a buffer's address -> its id
        self._out = np.zeros(4, dtype=np.int64)
        self._ids_out = np.zeros(64, dtype=np.int64)
        for _ in range(self.AHEAD + 1):
            self._lend(self.FIRST_BYTES)

    def _lend(self, nbytes: int) -> None:
        buf = np.empty(nbytes, dtype=np.uint8)
        i = int(self._lib.ghmpi_inbox_lend(buf.ctypes.data, nbytes))
        self._bufs[i], self._ids[buf.ctypes.data] = buf, i

    def get(self) -> tuple[np.ndarray, int, int] | None:
        """(buffer, source, tag) of the next message, or None if none has arrived yet."""
        out = self._out
        while True:
            rc = self._lib.ghmpi_inbox_take(out.ctypes.data)
            if rc == 1:
                i, n, source, tag = (int(x) for x in out)
                return self._bufs[i][:n], source, tag
            if rc == 0:
                return None
            if rc != 2:
                raise RuntimeError(f"MPI error {-rc} receiving ahead")
            n = int(out[1])  # the next message needs a buffer this large: lend one
            self._lend(n + n // 4)
            for i in self._ids_out[:self._lib.ghmpi_inbox_retire_below(
                    n, self._ids_out.ctypes.data, self._ids_out.size)]:
                buf = self._bufs.pop(int(i))
                del self._ids[buf.ctypes.data]

    def done(self, buf: np.ndarray) -> None:
        """The caller has finished with a buffer `get` handed out: it may be received into again."""
        self._lib.ghmpi_inbox_release(self._ids[(buf if buf.base is None else buf.base).ctypes.data])

    def close(self) -> None:
        """Stop receiving; an error if messages were taken off the wire and not handed out."""
        left = int(self._lib.ghmpi_inbox_close())
        if left:
            raise RuntimeError(f"{left} messages received ahead were never taken")


def _handle(obj) -> int:
    """An mpi4py object's C handle (mpi4py >= 4: .handle; 3.x: MPI._handleof)."""
    h = getattr(obj, "handle", None)
    return int(h if h is not None else MPI._handleof(obj))


def _status_offsets() -> tuple[int, int]:
    """Byte offsets of MPI_SOURCE and MPI_TAG in this MPI's MPI_Status."""
    status = MPI.Status()
    status.Set_source(123457)
    status.Set_tag(765431)
    words = np.ctypeslib.as_array((ctypes.c_int * (MPI._sizeof(MPI.Status) // 4))
                                  .from_address(MPI._addressof(status))).tolist()
    return 4 * words.index(123457), 4 * words.index(765431)


class Backoff:
    """Idle waiting that stays responsive without busy-spinning an oversubscribed core.

    Spins a few rounds, then sleeps with growing pauses up to `cap` seconds; `reset` after work."""

    def __init__(self, cap: float = 0.002):
        self.cap = cap
        self.rounds = 0

    def reset(self) -> None:
        self.rounds = 0

    def idle(self, cap: float | None = None) -> None:
        """One idle round; `cap` bounds this round's pause (a deadline close by, an answer
        expected soon)."""
        self.rounds += 1
        if self.rounds > 8:
            pause = min(self.cap if cap is None else cap, 1e-5 * (self.rounds - 8))
            if pause > 0:
                time.sleep(pause)


class ProgressThread:
    """Keeps MPI's progress engine turning from a thread while this rank computes.

    A message larger than the eager limit moves only while its sender is inside MPI, unless the
    transport copies it straight out of the sender's memory (CMA, XPMEM; often switched off in
    containers). Tier 2 spends milliseconds in a kernel call and tier 1 in GPU syncs, and a reply
    or a prompt's K/V would wait out that time. This thread probes COMM_SELF every `interval`
    seconds (GHMPI_PROGRESS_US microseconds, default 25; 0: no thread): a probe turns the
    progress engine and touches no request of the main thread. It runs only where MPI was
    initialised with MPI_THREAD_MULTIPLE (mpi4py's default).

    The thread is native where it builds (`kernels.progress_library`, `progress.cpp`: MPI_Iprobe
    of the MPI library mpi4py loaded, called from C++): a Python thread takes the GIL at every
    probe, and the main thread then waits for it as it comes back from each torch op or MPI call
    that released the GIL. Where the native one cannot be had (`native=False`, or
    GHMPI_PROGRESS_NATIVE=0, force that), a Python thread does the same. `kind` says which runs:
    "native", "python" or "off"."""

    def __init__(self, interval: float | None = None, native: bool = True):
        if interval is None:
            interval = float(os.environ.get("GHMPI_PROGRESS_US", "25")) / 1e6
        self.interval = interval
        self.native = native
        self.kind = "off"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._native: ctypes.CDLL | None = None
        self.receiving_ahead = False  # an inbox of this thread's (`inbox`) receives ahead

    def __enter__(self) -> "ProgressThread":
        if self.interval <= 0 or MPI.Query_thread() != MPI.THREAD_MULTIPLE:
            return self
        native = _native_progress() if self.native else None
        if native is not None:
            lib, iprobe, comm = native
            if lib.ghmpi_progress_start(iprobe, comm, MPI.ANY_SOURCE, MPI.ANY_TAG,
                                        int(self.interval * 1e9)) == 0:
                self._native, self.kind = lib, "native"
                return self
        self._thread = threading.Thread(target=self._run, name="ghmpi-mpi-progress", daemon=True)
        self._thread.start()
        self.kind = "python"
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._native is not None:
            self._native.ghmpi_progress_stop()
            self._native = None

    def inbox(self, comm: MPI.Comm) -> "Inbox | NativeInbox":
        """The inbox for `comm`: received ahead by the native thread where it runs and the MPI
        library has what that needs (`NativeInbox`; GHMPI_RECEIVE_AHEAD=0: never), else `Inbox`.
        A `NativeInbox` must be closed before the thread stops."""
        if self._native is not None and os.environ.get("GHMPI_RECEIVE_AHEAD", "").strip() != "0":
            from ghmpi import kernels

            functions = [kernels.mpi_function(f) for f in
                         ("MPI_Improbe", "MPI_Imrecv", "MPI_Test", "MPI_Get_count")]
            if None not in functions:
                self.receiving_ahead = True
                return NativeInbox(comm, self._native, functions)
        return Inbox(comm)

    def describe(self) -> str:
        """One phrase for the job's log: which progress thread runs."""
        if self.kind == "off":
            return "MPI progress: no thread"
        why = ""
        if self.kind == "python" and self.native:
            from ghmpi import kernels

            why = f" (native: {kernels.progress_reason() or 'MPI_Iprobe not found'})"
        ahead = ", receiving ahead" if self.receiving_ahead else ""
        return f"MPI progress: {self.kind} thread every {1e6 * self.interval:g} us{ahead}{why}"

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            MPI.COMM_SELF.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG)


def _native_progress() -> tuple[ctypes.CDLL, int, int] | None:
    """(the native progress library, the address of the loaded MPI library's MPI_Iprobe,
    COMM_SELF's C handle), or None where any cannot be had."""
    from ghmpi import kernels

    lib = kernels.progress_library()
    if lib is None:
        return None
    address = kernels.mpi_function("MPI_Iprobe")
    try:
        comm = _handle(MPI.COMM_SELF)
    except AttributeError:  # an mpi4py without either way to get a handle
        return None
    return None if address is None else (lib, address, comm)


# Open MPI's shared-memory transport copies a big message through 32 KiB fragments unless a
# single-copy mechanism is on (CMA, XPMEM). Containers often turn it off in their environment
# (the GPU machine's image does), and then each tier-2 rank takes the prompts' K/V in at about
# 1 GB/s. CMA ran the job 14 % faster on one H100 host (949 against 829 tokens/s, the
# means of 3 and 4 interleaved runs: bench/results/h100-2026-12-07-session17/) and 2 % faster on
# another, where it still took the prompts' K/V in 2.6-4.3 times faster
# (bench/results/h100-2026-12-07-session18/).
# (Open MPI 5 moved single copy into its smsc framework, which has no such switch.)
SINGLE_COPY_VAR = "OMPI_MCA_btl_vader_single_copy_mechanism"  # Open MPI 4


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def read_process_memory(pid: int, address: int, nbytes: int) -> bytes | None:
    """`nbytes` at `address` of process `pid`, read by cross-memory attach (process_vm_readv, the
    call Open MPI's CMA makes); None where the call fails or is not there."""
    try:
        read = ctypes.CDLL(None, use_errno=True).process_vm_readv
    except (OSError, AttributeError):
        return None
    read.restype = ctypes.c_ssize_t
    into = ctypes.create_string_buffer(nbytes)
    local, remote = _IoVec(ctypes.addressof(into), nbytes), _IoVec(address, nbytes)
    n = read(pid, ctypes.byref(local), ctypes.c_ulong(1), ctypes.byref(remote), ctypes.c_ulong(1),
             ctypes.c_ulong(0))
    return into.raw if n == nbytes else None


def cma_permitted() -> bool:
    """Whether this process may use cross-memory attach (process_vm_readv) as Open MPI's CMA
    does between a node's ranks: the call is not filtered out (a container's seccomp) and Yama
    lets a process name its peers (ptrace_scope 0 or 1; Open MPI's CMA asks for that at start)."""
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            if int(f.read().strip() or 0) > 1:
                return False
    except (OSError, ValueError):
        pass  # no Yama: plain ptrace rules, a rank may read its own user's processes
    probe = ctypes.c_uint64(0x6768_6D70_6900)
    return read_process_memory(os.getpid(), ctypes.addressof(probe), 8) == bytes(probe)


def single_copy_note(environ=os.environ, permitted: Callable[[], bool] = cma_permitted,
                     library: str | None = None) -> str:
    """A hint for the job's log where the environment turns Open MPI 4's single copy off although
    this node permits CMA; "" otherwise (a setting left to Open MPI, or one that asks for a
    mechanism, is the launcher's choice and is not second-guessed). `library`: the MPI library's
    version string (MPI_Get_library_version's, read when None)."""
    library = MPI.Get_library_version() if library is None else library
    if "Open MPI v4" not in library:  # the variable means nothing to other libraries
        return ""
    if environ.get(SINGLE_COPY_VAR, "").strip().lower() != "none" or not permitted():
        return ""
    return (f"{SINGLE_COPY_VAR}=none in the environment: big messages within a node cross in "
            f"32 KiB copies; this node permits CMA, and {SINGLE_COPY_VAR}=cma ran the ring 2-14 % "
            f"faster on H100 hosts (README, Performance)")


class BusyClock:
    """Where a rank's time goes: `working()` around work, `idle()` around waiting; the rest
    (polling, bookkeeping) is neither. Seconds, from time.perf_counter."""

    def __init__(self) -> None:
        self.busy = 0.0
        self.idle_s = 0.0
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def working(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.busy += time.perf_counter() - t

    @contextlib.contextmanager
    def idle(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.idle_s += time.perf_counter() - t

    def figures(self) -> tuple[float, float, float]:
        """(busy s, idle s, wall s since start)."""
        return self.busy, self.idle_s, time.perf_counter() - self.started
