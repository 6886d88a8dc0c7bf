"""MPI plumbing that runs in one process (no mpirun): the progress thread."""


def test_progress_thread_runs_only_when_asked():
    """The MPI progress thread (ghmpi/comm/transport.py) starts with an interval and
    MPI_THREAD_MULTIPLE, probes until told to stop, and is not started with interval 0."""
    from mpi4py import MPI

    from ghmpi.comm.transport import ProgressThread

    with ProgressThread(0) as off:
        assert off._thread is None
    with ProgressThread(1e-4) as on:
        if MPI.Query_thread() == MPI.THREAD_MULTIPLE:
            assert on._thread is not None and on._thread.is_alive()
    assert on._thread is None or not on._thread.is_alive()
