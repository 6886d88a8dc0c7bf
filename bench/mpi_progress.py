"""Does a message move while its sender is busy outside MPI? (2 ranks, one node)

Rank 0 posts Isend of N bytes, then computes for W ms without entering MPI, then waits on the
send. Rank 1 waits in Recv. Printed: how long rank 1's Recv took from rank 0's Isend (clocks of
one host), per size and busy time. A transfer that needs the sender inside MPI (rendezvous without
single-copy) takes about W; one that does not (eager, or CMA single copy) takes the copy time.
Last, the same with ghmpi's progress thread (ghmpi.comm.transport.ProgressThread) on rank 0 while
it waits W ms in a call that releases the GIL, as a kernel or a GPU sync does.

Usage: mpirun -n 2 python bench/mpi_progress.py   (Open MPI MCA settings from the environment)
"""

from __future__ import annotations

import os
import time

import numpy as np
from mpi4py import MPI

from ghmpi.comm.transport import ProgressThread


def busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    x = 0
    while time.perf_counter() < end:
        x += 1


def main() -> None:
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    rows = []
    for nbytes in (16 << 10, 150 << 10, 2500 << 10):
        buf = np.ones(nbytes, dtype=np.uint8)
        for work_ms, thread in ((0.0, False), (3.0, False), (3.0, True)):
            times = []
            for _ in range(20):
                comm.Barrier()
                if rank == 0:
                    t = time.time()
                    req = comm.Isend([buf, MPI.BYTE], dest=1, tag=7)
                    if thread:
                        with ProgressThread():
                            time.sleep(work_ms / 1e3)
                    else:
                        busy(work_ms / 1e3)
                    req.Wait()
                    comm.send(t, dest=1, tag=8)
                else:
                    comm.Recv([buf, MPI.BYTE], source=0, tag=7)
                    t_end = time.time()
                    times.append(t_end - comm.recv(source=0, tag=8))
            if rank == 1:
                rows.append((nbytes, work_ms, thread, float(np.median(times)) * 1e3))
    if rank == 1:
        mca = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items())
                       if k.startswith(("OMPI_MCA_btl", "OMPI_MCA_pml")))
        print(f"settings: {mca or 'defaults'}")
        for nbytes, work_ms, thread, ms in rows:
            how = "in a GIL-free call, progress thread on" if thread else "computing"
            print(f"  {nbytes / 1e3:7.0f} kB, sender {how} {work_ms:.0f} ms: received after "
                  f"{ms:.2f} ms")


if __name__ == "__main__":
    main()
