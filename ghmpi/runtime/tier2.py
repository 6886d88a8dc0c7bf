"""Tier 2: a CPU rank holding the KV cache of its slots, computing their attention.

It holds no weights. It serves every message in arrival order: store a new prompt's K/V, append
one decode step's k/v and attend over the slot's context, or store a later chunk of a long prompt
and attend it over the slot's prefix, then send the outputs back nonblocking (decode rows, then
chunk rows). It never blocks in a send, so it can never deadlock with tier 1.

A rank of many threads (`WORKER_THREADS` or more) serves on a worker thread that takes all its
threads but one: the main thread keeps that one to receive and decode the next messages and answer
the served ones, in order, while the worker stores and attends. Otherwise that work would hold
every thread of the rank idle once per message. The worker serves the messages in arrival order,
as the main thread would.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import os
import statistics
import time
from typing import Callable

import numpy as np
import torch
from mpi4py import MPI

from ghmpi import kernels
from ghmpi.comm import transport as tp
from ghmpi.comm.topology import Layout
from ghmpi.model.args import ModelArgs
from ghmpi.model.kvcache import KVCache
from ghmpi.runtime import trace
from ghmpi.runtime.faults import FaultInjector
from ghmpi.runtime.wire import WireFormat, Work, reply_tag


# A rank with this many threads or more serves on a worker thread. Measured on a 16-core host
# (bench/results/h200-2026-12-03-session9/): ranks of 7 and 14 threads gained 5-11 % that way,
# ranks of 3-4 lost 11 % (the thread given to the main thread is a quarter of their compute).
WORKER_THREADS = 6
WORKER_POLL_S = 1e-4  # while the worker serves, how often to look for the next message
_WORKER_ENV = "GHMPI_TIER2_WORKER"  # "1": always (2+ threads), "0": never, else by thread count


def worker_threads(threads: int, setting: str | None = None) -> int:
    """Torch threads of the worker of a rank of `threads` threads (0: no worker, the rank serves
    inline); `setting`: GHMPI_TIER2_WORKER's value (read from the environment when None)."""
    setting = (os.environ.get(_WORKER_ENV, "") if setting is None else setting).strip()
    if threads < 2 or setting == "0":
        return 0
    return threads - 1 if setting == "1" or threads >= WORKER_THREADS else 0


def worker_pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    """One thread whose torch ops use `threads` threads (the setting is per thread): where a
    tier-2 rank with a worker stores and attends."""
    return concurrent.futures.ThreadPoolExecutor(
        1, "ghmpi-attention", initializer=lambda: torch.set_num_threads(threads))


def attention_rate(args: ModelArgs, kv_dtype: torch.dtype,
                   together: Callable[[], None] = lambda: None, rounds: int = 3,
                   seconds: float = 0.2, rows: int = 64, context: int = 512) -> float:
    """KV bytes a second this rank's attention reads, on its threads and cores as they are: the
    median of `rounds` runs of the decode kernel (`KVCache.decode`'s path), `seconds` each, over
    `rows` rows of `context` positions of a cache of the model's heads (head-major, as tier 2 keeps
    it; 134 MB for Llama-3-8B's, so that a node's ranks together read more than a last-level cache
    holds). Every tier-2 rank of a node runs it at once (the job's `_weigh_tier2`), so each shares
    the memory bandwidth as it will when it serves: `together()` (a barrier of those ranks) starts
    each round, after every rank has warmed up (its pages, its thread pool, the kernel's library),
    so that no rank measures while another is still warming."""
    cache = KVCache([0], rows, context, args.n_kv_heads, args.head_dim, kv_dtype, "cpu")
    for t in (cache.k[0], cache.v[0]):
        t.fill_(0.01)  # the kernel's speed does not depend on the values
    q = torch.full((rows, args.n_heads, args.head_dim), 0.01).to(kv_dtype)
    slots, lengths = torch.arange(rows), torch.full((rows,), context)
    per_call = 2 * rows * context * args.n_kv_heads * args.head_dim * cache.k[0].element_size()
    kernels.decode_attention_cpu(q, cache.k[0], cache.v[0], slots, lengths)  # warm
    rates = []
    for _ in range(rounds):
        together()
        calls, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds or calls < 3:
            kernels.decode_attention_cpu(q, cache.k[0], cache.v[0], slots, lengths)
            calls += 1
        rates.append(calls * per_call / elapsed)
    return statistics.median(rates)


class Tier2:
    def __init__(self, world: MPI.Comm, layout: Layout, args: ModelArgs, wire: WireFormat,
                 kv_dtype: torch.dtype, max_len: int, faults: FaultInjector,
                 reply_delay_s: float = 0.0):
        self.world, self.layout, self.args, self.wire, self.faults = world, layout, args, wire, faults
        rank = world.Get_rank()
        self.served = layout.slices_served(rank)
        layers = [l for j in self.served for l in layout.slice_layers(j)]
        owned = layout.owned_slots(rank)
        self.index = np.full(layout.n_slots, -1, dtype=np.int64)  # slot -> row of our cache
        self.index[owned] = np.arange(len(owned))
        # The cache is committed now (every page zeroed), while tier 1 loads its weights: a page
        # fault every few KiB of the prompts' K/V would otherwise stall the job's prefill.
        # GHMPI_KV_COMMIT=0 leaves the pages to be committed as they are first written.
        commit = os.environ.get("GHMPI_KV_COMMIT", "1").strip() != "0"
        t = time.perf_counter()
        self.cache = KVCache(layers, max(len(owned), 1), max_len, args.n_kv_heads, args.head_dim,
                             kv_dtype, "cpu", commit=commit)
        n = worker_threads(torch.get_num_threads())
        if rank == layout.slices:  # the first tier-2 rank says which attention path runs
            size = self.cache.nbytes
            size = f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
            print(f"ghmpi: tier 2: {kernels.describe()}"
                  f"{f', on a worker thread with {n} of them' if n else ''}; KV cache {size} a "
                  f"rank, {'committed' if commit else 'allocated'} in "
                  f"{time.perf_counter() - t:.1f} s{' (huge pages)' if self.cache.huge_pages else ''}",
                  flush=True)
        self.outbox = tp.Outbox(world)
        # an emulated network hop: replies leave this long after they are ready, on time even
        # while the rank computes (the delay line's thread sends them)
        self.delayed = tp.DelayLine(world, reply_delay_s) if reply_delay_s else None
        self.busy = tp.BusyClock()
        # the next messages arrive while this one is served (made by `run`, with the progress
        # thread that receives them ahead where it can)
        self.inbox: tp.Inbox | tp.NativeInbox | None = None
        self.worker_threads = n  # the worker's, started by `run`
        self.worker: concurrent.futures.ThreadPoolExecutor | None = None
        # messages queued for the worker, in order: (Work, its future, source, buffer)
        self.pending: collections.deque[tuple[Work, concurrent.futures.Future, int, np.ndarray]] \
            = collections.deque()

    def _serve(self, buf: np.ndarray, source: int) -> None:
        """Serve a message here, or queue it for the worker (which reads its buffer: the buffer
        goes back to the inbox once the message is answered)."""
        a = self.args
        w = Work.decode(self.wire, buf, a.n_heads, a.n_kv_heads, a.head_dim)
        trace.mark("recv", w.mb, w.layer, len(w.dec_slots), w.n_reply + int(sum(w.fill_len)))
        if self.worker is None:
            self._answer(w, self._work(w), source, buf)
        else:
            self.pending.append((w, self.worker.submit(self._work, w), source, buf))

    def _work(self, w: Work) -> list[torch.Tensor]:
        """Store the message's prompts' K/V, attend what it asks back (`_attend`)."""
        with self.busy.working():  # the worker's time, where it serves, is the rank's busy time
            self.faults.step()  # on the worker too: its failures reach the main thread
            self._store_fills(w)
            return self._attend(w) if w.n_reply else []

    def _answer(self, w: Work, outs: list[torch.Tensor], source: int, buf: np.ndarray) -> None:
        """Send a message's outputs back (none: it asked for nothing); give its buffer back."""
        if outs:
            self._reply(self.wire.to_bytes(outs), source, reply_tag(w.mb))
        trace.mark("served", w.mb, w.layer)
        self.inbox.done(buf)

    def _answer_served(self, wait: float = 0.0) -> None:
        """Answer the messages the worker has served, in order, waiting up to `wait` seconds for
        the first."""
        while self.pending:
            w, job, source, buf = self.pending[0]
            if not job.done():
                if not wait or not concurrent.futures.wait([job], wait).done:
                    return
                wait = 0.0  # waited once
            self.pending.popleft()
            self._answer(w, job.result(), source, buf)

    def _store_fills(self, w: Work) -> None:
        at = 0
        for slot, length in zip(w.fill_slots, w.fill_len):
            length = int(length)
            self.cache.write(w.layer, int(self.index[slot]), 0, w.kf[at:at + length],
                             w.vf[at:at + length])
            at += length

    def _attend(self, w: Work) -> list[torch.Tensor]:
        """The outputs the message asks back, in its reply's order: (n_dec, H*D) of the decode
        rows, then (len, H*D) of each prompt chunk."""
        outs = []
        if len(w.dec_slots):
            slots = torch.from_numpy(self.index[w.dec_slots])
            positions = torch.from_numpy(np.ascontiguousarray(w.dec_pos))
            # In the activations' dtype, as the model would on one GPU (SDPA accumulates in
            # float32); upcasting a bf16 cache would copy every context first (~7x slower).
            outs.append(self.cache.decode(w.layer, slots, positions, w.q, w.k, w.v))
        at = 0
        for slot, start, length in zip(w.chunk_slots, w.chunk_pos, w.chunk_len):
            s = slice(at, at + int(length))
            outs.append(self.cache.prefill_chunk(w.layer, int(self.index[slot]), int(start),
                                                 w.qc[s], w.kc[s], w.vc[s]))
            at = s.stop
        return outs

    def _reply(self, reply: np.ndarray, dest: int, tag: int) -> None:
        if self.delayed is not None:
            self.delayed.hold(reply, dest, tag)
        else:
            self.outbox.send(reply, dest, tag)

    def run(self) -> int:
        """Serve until every slice we serve has sent STOP; return the job's exit status. Replies
        move while the attention kernel runs (`tp.ProgressThread`)."""
        n, threads = self.worker_threads, torch.get_num_threads()
        if n:  # the worker's torch ops use n threads, ours one
            self.worker = worker_pool(n)
            torch.set_num_threads(1)
        try:
            with tp.ProgressThread() as progress, self.delayed or contextlib.nullcontext():
                self.inbox = progress.inbox(self.world)
                if self.world.Get_rank() == self.layout.slices:  # the first tier-2 rank
                    print(f"ghmpi: tier 2: {progress.describe()}", flush=True)
                    if note := tp.single_copy_note():
                        print(f"ghmpi: note: {note}", flush=True)
                try:
                    status = self._loop()
                except BaseException:
                    with contextlib.suppress(RuntimeError):
                        self.inbox.close()
                    raise
                self.inbox.close()  # before the thread stops; nothing was left in it
                return status
        finally:
            if self.worker is not None:
                self.worker.shutdown(wait=True, cancel_futures=True)
                self.worker = None
                torch.set_num_threads(threads)

    def _loop(self) -> int:
        stops, status = 0, 0
        backoff = tp.Backoff()
        delayed = self.delayed
        while stops < len(self.served) or self.pending or (delayed and delayed.pending()):
            if delayed is not None:
                delayed.pump()
            t = time.perf_counter()
            msg = self.inbox.get()
            if msg is not None:
                trace.mark("got", rows=int(1e6 * (time.perf_counter() - t)), tokens=msg[0].nbytes)
            self._answer_served()
            self.outbox.poll()
            if msg is None:
                if self.pending:  # the worker serves: answer as it finishes, look for more
                    self._answer_served(WORKER_POLL_S)
                    continue
                with self.busy.idle():  # never past a held reply's time
                    backoff.idle(delayed.next_due() if delayed else None)
                continue
            backoff.reset()
            buf, source, tag = msg
            if tag == tp.TAG_STOP:
                stops += 1
                status = int(tp.unpack(buf)[0][0])
                self.inbox.done(buf)
            elif tag == tp.TAG_WORK:
                self._serve(buf, source)
            else:
                raise RuntimeError(f"unexpected message tag {tag} from rank {source}")
        self.outbox.drain()
        if delayed is not None:
            delayed.drain()
        return status
