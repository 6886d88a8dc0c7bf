"""The tier protocol at any world size: framing round trips, and real tier-2 ranks answering
attention requests (decode rows and prompt chunks) exactly as a local KV cache would. Run under
mpirun with --with-mpi."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from mpi4py import MPI

from ghmpi.comm import transport as tp
from ghmpi.comm.topology import Layout
from ghmpi.model.kvcache import KVCache
from ghmpi.runtime.faults import FaultInjector
from ghmpi.runtime.tier2 import Tier2
from ghmpi.runtime.wire import WireFormat, Work, reply_tag


def _recv(comm, source, tag):
    backoff = tp.Backoff()
    while (msg := tp.try_recv(comm, source=source, tag=tag)) is None:
        backoff.idle()
    return msg


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ring_round_trip_of_framed_tensors(dtype):
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    wire = WireFormat(dtype)
    g = torch.Generator().manual_seed(rank)
    mine = torch.randn(rank + 2, 3, generator=g).to(dtype)
    out = tp.Outbox(comm)
    out.send(tp.pack([rank, *mine.shape], [wire.to_bytes([mine])]), (rank + 1) % size, tp.TAG_RING)
    buf, source, tag = _recv(comm, (rank - 1) % size, tp.TAG_RING)
    header, payload = tp.unpack(buf)
    got = wire.from_bytes(payload, tuple(int(x) for x in header[1:]), "cpu")
    left = (rank - 1) % size
    expect = torch.randn(left + 2, 3, generator=torch.Generator().manual_seed(left)).to(dtype)
    assert int(header[0]) == left == source and tag == tp.TAG_RING
    assert torch.equal(got, expect)
    out.drain()
    comm.Barrier()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("slices,weighted", [(1, False), (2, False), (1, True)])
def test_tier2_ranks_attend_like_a_local_cache(slices, weighted):
    """World rank 0 drives the protocol for every slice; the other tier-2 ranks run the real loop.
    Ranks 1..slices-1 (if any) only idle as the other tier-1 slices would. `weighted`: slots dealt
    to the tier-2 ranks by unequal weights (as by their threads)."""
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if size <= slices:
        pytest.skip("needs at least one tier-2 rank")
    args = SimpleNamespace(n_heads=4, n_kv_heads=2, head_dim=8)
    weights = tuple(1 + i % 2 for i in range(size - slices)) if weighted else ()
    lay = Layout(size, slices, n_layers=2 * slices, micro_batches=2, micro_batch_size=3,
                 hybrid_slots=0, tier2_weights=weights)
    wire = WireFormat(torch.float32)
    max_len = 16
    if not lay.is_tier1(rank):
        status = Tier2(comm, lay, args, wire, torch.float32, max_len, FaultInjector(rank, -1, 0)).run()
        assert status == 0
        comm.Barrier()
        return
    if rank != 0:
        comm.Barrier()
        return
    g = torch.Generator().manual_seed(0)
    ref = KVCache(list(range(lay.n_layers)), lay.n_slots, max_len, 2, 8, torch.float32)
    out = tp.Outbox(comm)
    H, KV, D = 4, 2, 8
    lengths = {s: 2 + s % 4 for s in range(lay.n_slots)}
    for j in range(slices):
        for layer in lay.slice_layers(j):
            for s, L in lengths.items():  # prompt K/V to the owners
                k, v = torch.randn(L, KV, D, generator=g), torch.randn(L, KV, D, generator=g)
                ref.write(layer, s, 0, k, v)
                out.send(Work(0, layer, [], [], [s], [L], torch.empty(0, H, D),
                              torch.empty(0, KV, D), torch.empty(0, KV, D), [k], [v]).encode(wire),
                         lay.owner(s, j), tp.TAG_WORK)
    for step in range(3):
        for j in range(slices):
            for layer in lay.slice_layers(j):
                for mb in range(lay.micro_batches):
                    slots = list(lay.micro_batch_slots(mb))
                    pos = [lengths[s] + step for s in slots]
                    q = torch.randn(len(slots), H, D, generator=g)
                    k = torch.randn(len(slots), KV, D, generator=g)
                    v = torch.randn(len(slots), KV, D, generator=g)
                    expect = ref.decode(layer, torch.tensor(slots), torch.tensor(pos), q, k, v)
                    got = torch.empty_like(expect)
                    by_owner = {}
                    for i, s in enumerate(slots):
                        by_owner.setdefault(lay.owner(s, j), []).append(i)
                    reqs = []
                    for owner, rows in by_owner.items():
                        buf = np.empty(len(rows) * H * D * 4, dtype=np.uint8)
                        reqs.append((comm.Irecv([buf, MPI.BYTE], source=owner, tag=reply_tag(mb)),
                                     buf, rows))
                        out.send(Work(mb, layer, [slots[i] for i in rows], [pos[i] for i in rows],
                                      [], [], q[rows], k[rows], v[rows], [], []).encode(wire),
                                 owner, tp.TAG_WORK)
                    for req, buf, rows in reqs:
                        req.Wait()
                        got[rows] = wire.from_bytes(buf, (len(rows), H * D), "cpu")
                    torch.testing.assert_close(got, expect, rtol=0, atol=1e-6)
    # Prompt chunks beside decode rows: every even slot continues its prompt with a chunk of 3
    # tokens at its next position; its owner stores and attends it over the slot's prefix and
    # replies with the decode rows' outputs, then the chunks' rows.
    for j in range(slices):
        for layer in lay.slice_layers(j):
            for mb in range(lay.micro_batches):
                by_owner = {}
                for s in lay.micro_batch_slots(mb):
                    by_owner.setdefault(lay.owner(s, j), []).append(s)
                reqs = []
                for owner, mine in by_owner.items():
                    dec, chk = [s for s in mine if s % 2], [s for s in mine if s % 2 == 0]
                    dpos, cpos = [lengths[s] + 3 for s in dec], [lengths[s] + 3 for s in chk]
                    q, k, v = (torch.randn(len(dec), h, D, generator=g) for h in (H, KV, KV))
                    qc, kc, vc = ([torch.randn(3, h, D, generator=g) for _ in chk]
                                  for h in (H, KV, KV))
                    expect = [ref.decode(layer, torch.tensor(dec), torch.tensor(dpos), q, k, v)
                              ] if dec else []
                    expect += [ref.prefill_chunk(layer, *a) for a in zip(chk, cpos, qc, kc, vc)]
                    work = Work(mb, layer, dec, dpos, [], [], q, k, v, [], [], chunk_slots=chk,
                                chunk_pos=cpos, chunk_len=[3] * len(chk), qc=qc, kc=kc, vc=vc)
                    buf = np.empty(work.n_reply * H * D * 4, dtype=np.uint8)
                    reqs.append((comm.Irecv([buf, MPI.BYTE], source=owner, tag=reply_tag(mb)),
                                 buf, torch.cat(expect)))
                    out.send(work.encode(wire), owner, tp.TAG_WORK)
                for req, buf, expect in reqs:
                    req.Wait()
                    got = wire.from_bytes(buf, tuple(expect.shape), "cpu")
                    torch.testing.assert_close(got, expect, rtol=0, atol=1e-6)
    # STOP from "every slice": rank 0 speaks for all of them here
    for r in range(lay.slices, size):
        for _ in lay.slices_served(r):
            out.send(tp.pack([0]), r, tp.TAG_STOP)
    out.drain()
    comm.Barrier()


@pytest.mark.mpi(min_size=2)
def test_reused_send_buffer_is_never_overwritten_in_flight():
    """Many large messages through one keyed buffer to a slow receiver: every one arrives whole."""
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    n_msgs, size = 20, 1 << 20  # 1 MiB: past the eager limit, so sends complete only on receipt
    if rank == 0:
        out = tp.Outbox(comm)
        for i in range(n_msgs):
            buf = out.buffer("k", size)
            buf[:] = i % 251
            out.send(buf, 1, tp.TAG_WORK, key="k")
        out.drain()
    elif rank == 1:
        import time

        for i in range(n_msgs):
            time.sleep(0.01)  # slow receiver: the sender must wait before reusing its buffer
            buf, _, _ = _recv(comm, 0, tp.TAG_WORK)
            assert buf.nbytes == size and (buf == i % 251).all(), i
    comm.Barrier()
