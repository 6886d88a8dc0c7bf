"""MPI plumbing that runs in one process (no mpirun): the progress thread."""


def test_progress_thread_runs_only_when_asked():
    """The MPI progress thread (ghmpi/comm/transport.py) starts with an interval and
    MPI_THREAD_MULTIPLE, native where it builds (a Python one when told so), probes until told
    to stop, and is not started with interval 0."""
    from mpi4py import MPI

    from ghmpi import kernels
    from ghmpi.comm.transport import ProgressThread

    with ProgressThread(0) as off:
        assert off.kind == "off" and off._thread is None and off._native is None
    if MPI.Query_thread() != MPI.THREAD_MULTIPLE:
        return
    with ProgressThread(1e-4, native=False) as python:
        assert python.kind == "python" and python._thread.is_alive()
        assert python.describe() == "MPI progress: python thread every 100 us"
    assert not python._thread.is_alive()
    with ProgressThread(1e-4) as native:
        expected = "native" if kernels.progress_library() is not None else "python"
        assert native.kind == expected, kernels.progress_reason()
        assert native.describe().startswith(f"MPI progress: {expected} thread every 100 us")
    assert native._native is None and (native._thread is None or not native._thread.is_alive())


def test_inbox_never_receives_into_a_buffer_still_out():
    """`transport.Inbox` (self-sends on COMM_SELF): a message's buffer keeps its bytes while the
    caller holds it, however many messages come after; one given back with `done` is received
    into again."""
    import numpy as np
    from mpi4py import MPI

    from ghmpi.comm.transport import Inbox, Outbox

    comm, out = MPI.COMM_SELF, Outbox(MPI.COMM_SELF)
    inbox = Inbox(comm)
    for i in range(4):
        out.send(np.full(1000 + i, i, dtype=np.uint8), 0, 7)
    held = []
    for i in range(3):  # the fourth is being received ahead meanwhile
        buf, source, tag = inbox.get()
        assert (source, tag, buf.nbytes) == (0, 7, 1000 + i)
        held.append(buf)
    for i, buf in enumerate(held):  # none was written over
        assert (buf == i).all()
    inbox.done(held[0])
    out.send(np.full(900, 9, dtype=np.uint8), 0, 7)
    assert inbox.get()[0].nbytes == 1003
    last = inbox.get()[0]  # received into the buffer given back, the only free one that fits
    assert (last == 9).all() and last.base is held[0].base
    out.drain()


def test_native_inbox_receives_ahead_in_order():
    """`transport.NativeInbox` (the native progress thread receiving ahead; self-sends on
    COMM_SELF): messages come out in the order sent, with their sizes and tags, each in a buffer
    nobody receives into while the caller holds it; a message larger than every buffer lent gets
    a new one; closing with a message taken off the wire and not handed out is an error."""
    import time

    import numpy as np
    import pytest
    from mpi4py import MPI

    from ghmpi.comm.transport import NativeInbox, Outbox, ProgressThread

    if MPI.Query_thread() != MPI.THREAD_MULTIPLE:
        pytest.skip("no MPI_THREAD_MULTIPLE")
    comm, out = MPI.COMM_SELF, Outbox(MPI.COMM_SELF)
    sizes = [1000, 3 << 20, 70, 2 << 20, 5, 4 << 20]  # two larger than the first buffers
    with ProgressThread(1e-5) as progress:
        inbox = progress.inbox(comm)
        if progress.kind != "native":
            assert not isinstance(inbox, NativeInbox)
            pytest.skip("no native progress thread here")
        assert isinstance(inbox, NativeInbox) and "receiving ahead" in progress.describe()
        for i, n in enumerate(sizes):
            out.send(np.full(n, i, dtype=np.uint8), 0, 10 + i, key=i)
        held = []
        deadline = time.monotonic() + 20
        while len(held) < len(sizes) and time.monotonic() < deadline:
            msg = inbox.get()
            if msg is None:
                continue
            buf, source, tag = msg
            i = len(held)
            assert (source, tag, buf.nbytes) == (0, 10 + i, sizes[i])
            held.append(buf)
            if i % 2:  # give some back at once: they are received into again
                assert (buf == i).all()
                inbox.done(buf)
        assert len(held) == len(sizes)
        for i, buf in enumerate(held):
            if not i % 2:  # those still held were never written over
                assert (buf == i).all()
        out.drain()
        inbox.close()
        inbox = progress.inbox(comm)  # a message left in it when it closes
        out.send(np.zeros(10, dtype=np.uint8), 0, 99)
        out.drain()
        time.sleep(0.05)  # the thread receives it ahead
        with pytest.raises(RuntimeError, match="never taken"):
            inbox.close()


def test_attention_worker_only_for_ranks_of_many_threads():
    """A tier-2 rank attends on a worker thread with all its threads but one when it has
    WORKER_THREADS or more (or GHMPI_TIER2_WORKER=1 and at least 2), never with the setting 0."""
    from ghmpi.runtime.tier2 import WORKER_THREADS, worker_threads

    assert worker_threads(WORKER_THREADS, "") == WORKER_THREADS - 1 and WORKER_THREADS > 2
    assert worker_threads(14, "") == 13
    assert worker_threads(WORKER_THREADS - 1, "") == 0
    assert worker_threads(2, "1") == 1 and worker_threads(1, "1") == 0
    assert worker_threads(14, "0") == 0


def test_delay_line_sends_on_time_while_its_owner_computes():
    """`transport.DelayLine` (an emulated network hop, tier 2's `runtime.reply_delay_ms`): a held
    send is not sent before its delay; once due, its own thread sends it while the owner does not
    pump (it computes); without the thread, `pump` and `drain` send it."""
    import time

    import numpy as np
    from mpi4py import MPI

    from ghmpi.comm.transport import DelayLine

    comm = MPI.COMM_SELF

    def arrived() -> bool:
        return comm.Iprobe(source=0, tag=5)

    def take() -> np.ndarray:
        buf = np.empty(16, dtype=np.uint8)
        comm.Recv([buf, MPI.BYTE], source=0, tag=5)
        return buf

    line = DelayLine(comm, 0.05)
    if MPI.Query_thread() == MPI.THREAD_MULTIPLE:
        with line:
            line.hold(np.full(16, 1, dtype=np.uint8), 0, 5)
            assert not arrived() and line.pending() and 0 < line.next_due() <= 0.05
            time.sleep(0.2)  # the owner computes: it does not pump
            assert arrived() and not line.pending()
        assert (take() == 1).all()
    line.hold(np.full(16, 2, dtype=np.uint8), 0, 5)
    line.pump()
    assert not arrived()  # not due yet
    time.sleep(0.06)
    line.pump()
    assert arrived() and (take() == 2).all()
    line.hold(np.full(16, 3, dtype=np.uint8), 0, 5)
    assert line.pending()
    line.drain()  # sends it once due
    assert not line.pending() and line.next_due() is None
    assert arrived() and (take() == 3).all()


def test_single_copy_note_only_where_the_environment_turns_cma_off_and_the_node_permits_it():
    """The tier-2 log's hint (transport.single_copy_note): said where Open MPI 4's single copy is
    set to none in the environment and this node permits CMA; not where the setting is left to
    Open MPI, asks for a mechanism, CMA is not permitted, or the library is not Open MPI 4. Where
    `cma_permitted` says yes, a real cross-memory read of another process works (a child, which
    Yama lets its parent read)."""
    import subprocess
    import sys

    from ghmpi.comm.transport import (SINGLE_COPY_VAR as var, cma_permitted, read_process_memory,
                                      single_copy_note)

    v4 = "Open MPI v4.1.6, package: Open MPI"
    assert var in single_copy_note({var: "none"}, lambda: True, v4)
    assert "=cma" in single_copy_note({var: " None "}, lambda: True, v4)
    assert single_copy_note({var: "none"}, lambda: False, v4) == ""
    assert single_copy_note({var: "cma"}, lambda: True, v4) == ""
    assert single_copy_note({}, lambda: True, v4) == ""
    assert single_copy_note({var: "none"}, lambda: True, "Open MPI v5.0.11") == ""
    assert single_copy_note({var: "none"}, lambda: True, "MPICH Version: 4.2.0") == ""

    child = subprocess.Popen(
        [sys.executable, "-c", "import ctypes, sys; x = ctypes.c_uint64(0x1234567887654321); "
         "print(ctypes.addressof(x), flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        got = read_process_memory(child.pid, int(child.stdout.readline()), 8)
    finally:
        child.communicate("")
    # permitted for this process: a child's memory reads too (the converse need not hold: root
    # may read its child where Yama keeps a node's ranks from reading each other)
    assert got == (0x1234567887654321).to_bytes(8, sys.byteorder) or not cma_permitted()
