"""A tier-2 rank's cost per message beyond its attention kernel: what sets the ring's pace when
one rank runs a message behind the others (the convoy `bench/trace_summary.py` shows).

Usage: mpirun -n 2 python bench/tier2_overhead.py [--shape llama3-8b] [--rows 18] [--context 576]
                                                  [--messages 400] [--threads 2] [--rounds 5]

Rank 1 is a real `Tier2` (its loop, receive, decode, store, kernel, reply; on its worker thread
where it has one, GHMPI_TIER2_WORKER); rank 0 stands in for tier 1 and keeps two micro-batches'
decode messages (`rows` rows each, one layer) queued at it, as the ring does for its slowest
rank, and counts the replies. Rank 1 first times its attention alone (the native kernel's call,
and `KVCache.decode`, which adds the k/v append, on the same rows and contexts, the two
micro-batches' slots in turn as the messages come), then serves the messages; `rounds` times in
turn, so that a machine's drift touches both alike. Prints the rounds' medians per message: the
kernel alone, KVCache.decode, the whole message (messages / wall time), and what the message
costs beyond the kernel: receive, decode, store, reply, loop.
Both ranks print one line; rank 0's is the result.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from mpi4py import MPI

from ghmpi import kernels
from ghmpi.bench.checkpoint import hf_config
from ghmpi.comm import transport as tp
from ghmpi.comm.topology import Layout
from ghmpi.model.args import ModelArgs
from ghmpi.runtime.faults import FaultInjector
from ghmpi.runtime.tier2 import Tier2, worker_pool
from ghmpi.runtime.wire import WireFormat, Work, reply_tag


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--rows", type=int, default=18, help="decode rows per message")
    ap.add_argument("--context", type=int, default=576)
    ap.add_argument("--messages", type=int, default=400)
    ap.add_argument("--threads", type=int, default=2, help="tier 2's torch threads")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of kernel alone + messages")
    a = ap.parse_args()
    world = MPI.COMM_WORLD
    if world.Get_size() != 2:
        raise SystemExit("run with mpirun -n 2")
    args = ModelArgs.from_config(hf_config(a.shape, 1))
    H, KV, D = args.n_heads, args.n_kv_heads, args.head_dim
    layout = Layout(2, 1, 1, 2, a.rows, 0)
    wire = WireFormat(torch.bfloat16)
    if world.Get_rank() == 1:
        torch.set_num_threads(a.threads)
        t2 = Tier2(world, layout, args, wire, torch.bfloat16, a.context + 8,
                   FaultInjector(1, -1, 0))
        # both micro-batches' slots in turn, as the messages come: one micro-batch's K/V alone
        # could stay in the L3 and time the kernel faster than the messages can run it
        slot_sets = [torch.arange(a.rows), torch.arange(a.rows, 2 * a.rows)]
        pos = torch.full((a.rows,), a.context - 1)
        q, k = torch.randn(a.rows, H, D).bfloat16(), torch.randn(a.rows, KV, D).bfloat16()

        def timed(f) -> float:
            f(slot_sets[0])
            t = time.perf_counter()
            for i in range(50):
                f(slot_sets[i % 2])
            return (time.perf_counter() - t) / 50

        kc, vc = t2.cache.k[0], t2.cache.v[0]

        # a rank with a worker attends there, with its threads
        timer = worker_pool(t2.worker_threads) if t2.worker_threads else None

        def where_it_attends(f):
            return f() if timer is None else timer.submit(f).result()

        for _ in range(a.rounds):  # the kernel alone, then the messages, in turn
            kernel = where_it_attends(lambda: timed(
                lambda slots: kernels.decode_attention_cpu(q, kc, vc, slots, pos + 1)))
            attend = where_it_attends(
                lambda: timed(lambda slots: t2.cache.decode(0, slots, pos, q, k, k)))
            world.send((kernel, attend), dest=0, tag=99)
            t2.run()
        if timer is not None:
            timer.shutdown()
        return
    figures = [serve_round(world, layout, wire, a, H, KV, D) for _ in range(a.rounds)]
    kernel, attend, wall = (statistics.median(f[i] for f in figures) for i in range(3))
    print(f"tier2_overhead: {a.rows} rows x {a.context} positions, {a.threads} threads, median of "
          f"{a.rounds} rounds: kernel {1e3 * kernel:.3f} ms, KVCache.decode {1e3 * attend:.3f} ms, "
          f"message {1e3 * wall:.3f} ms; beyond the kernel {1e3 * (wall - kernel):.3f} ms a "
          f"message ({(wall - kernel) / wall:.0%}); rounds' message times "
          + " ".join(f"{1e3 * f[2]:.3f}" for f in figures), flush=True)


def serve_round(world: MPI.Comm, layout: Layout, wire: WireFormat, a: argparse.Namespace,
                H: int, KV: int, D: int) -> tuple[float, float, float]:
    """Rank 0's side of one round: (kernel s, KVCache.decode s, wall s a message)."""
    kernel, attend = world.recv(source=1, tag=99)
    gen = torch.Generator().manual_seed(0)
    msgs = []
    for mb in range(2):
        slots = list(layout.micro_batch_slots(mb))
        w = Work(mb, 0, slots, [a.context - 1] * a.rows, [], [],
                 torch.randn(a.rows, H, D, generator=gen).bfloat16(),
                 torch.randn(a.rows, KV, D, generator=gen).bfloat16(),
                 torch.randn(a.rows, KV, D, generator=gen).bfloat16(), [], [])
        msgs.append(w.encode(wire))
    out = tp.Outbox(world)
    reply = [np.empty(a.rows * H * D * 2, dtype=np.uint8) for _ in range(2)]
    waits: list[MPI.Request | None] = [None, None]
    sent = done = 0
    t = time.perf_counter()
    while done < a.messages:
        for mb in range(2):  # each micro-batch: reply in -> its next message out at once
            if waits[mb] is not None and waits[mb].Test():
                waits[mb] = None
                done += 1
            if waits[mb] is None and sent < a.messages:
                waits[mb] = world.Irecv([reply[mb], MPI.BYTE], source=1, tag=reply_tag(mb))
                out.send(msgs[mb], 1, tp.TAG_WORK, key=mb)
                sent += 1
        out.poll()
    wall = (time.perf_counter() - t) / a.messages
    out.drain()
    out.send(tp.pack([0]), 1, tp.TAG_STOP, key="stop")
    out.drain()
    return kernel, attend, wall


if __name__ == "__main__":
    main()
