"""Tier 1: one pipeline slice of layers on a GPU (or CPU), many micro-batches in flight.

Per layer a micro-batch runs pre-attention, ships q/k/v of its decode rows to the tier-2 ranks
owning those slots (with the new prompts' K/V for their caches, and q/k/v of the later chunks of
long prompts on those slots), and, while those answer, the rank works on other micro-batches: it
always advances the ready one that is furthest along. When the replies are in, the layer's
post-attention runs together with the next layer's pre-attention (`_segment`; one CUDA graph per
layer for decode passes on a GPU). Whole prompts and first chunks are prefilled here in one packed
causal call; a later chunk attends its cached prefix where the slot's KV lives. With tier 2 the
prompts are prefilled in a lane of passes of their own, whose layers run on a GPU beside the
micro-batches' (on a low-priority stream) and whose messages go out when their copies are done,
so the host never waits on them (`_ship`). Only q/k/v and
attention outputs cross tiers, the residual stream stays on this device. After the slice's last
layer the hidden states go to the next slice; the last slice samples and the tokens return to
slice 0, closing the ring.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from mpi4py import MPI

from ghmpi.comm import transport as tp
from ghmpi.comm.topology import LOCAL, Layout
from ghmpi.model.attention import warm_up_cuda
from ghmpi.model.kvcache import KVCache
from ghmpi.model.llama import Transformer
from ghmpi.runtime.cudagraph import DecodeGraphs, LayerGraphs
from ghmpi.runtime.driver import Driver
from ghmpi.runtime import trace
from ghmpi.runtime.faults import FaultInjector
from ghmpi.runtime.draws import choose, decode_draws, encode_draws, prompt_logprobs
from ghmpi.runtime.passplan import PassPlan, attend_local, build_plan
from ghmpi.runtime.scheduler import Draws, Row
from ghmpi.runtime.wire import (Copies, Shipment, WireFormat, Work, packed_qkv, reply_tag,
                                rows_from_header, rows_header)


@dataclass
class _Route:
    """A pass's traffic with tier 2, the same every layer (`Tier1._route`)."""

    shipment: Shipment  # the messages' headers
    owners: list[int]  # their destinations
    keys: tuple[list[tuple], list[tuple]]  # their send buffers' keys, for even and odd layers
    buffers: tuple[list[Callable[[int], np.ndarray]], ...]  # those send buffers
    replies: list[tuple[int, int, int]]  # (owner, start, end) bytes of the reply buffer
    reply_bytes: int
    waiting_on: list[int]  # the owners that reply
    replied: list[slice]  # the token spans the replies fill, in order (merged)


_NONE3 = (torch.empty(0), torch.empty(0), torch.empty(0))  # a route's Works carry no tensors


@dataclass
class Pass:
    """A micro-batch on its way through this slice."""

    mb: int
    plan: PassPlan
    x: torch.Tensor  # (n, dim) residual stream, n = sum of the rows' token counts
    layer: int  # global index of the next layer to run (or of the one awaiting replies)
    o: torch.Tensor | None = None  # (n, n_heads*head_dim) attention output being assembled, or,
    #                                once it is, awaiting the post-attention of layer - 1
    waits: list[MPI.Request] = field(default_factory=list)  # tier-2 replies to this layer
    waiting_on: list[int] = field(default_factory=list)  # their ranks
    replied: list[slice] = field(default_factory=list)  # token spans the replies fill, in order
    route: _Route | None = None  # its traffic with tier 2, worked out at its first layer
    staged: tuple | None = None  # the prefill lane: (messages, their keys, `Copies`) to send

    @property
    def rows(self) -> list[Row]:
        return self.plan.rows


REPLY_POLL_S = 1e-4  # longest pause while micro-batches wait on tier-2 replies


def _merged(spans: list[slice]) -> list[slice]:
    """Adjacent spans joined (the owners' decode rows follow each other in the batch)."""
    out: list[slice] = []
    for s in spans:
        if out and out[-1].stop == s.start:
            out[-1] = slice(out[-1].start, s.stop)
        else:
            out.append(s)
    return out


class Tier1:
    def __init__(self, world: MPI.Comm, layout: Layout, j: int, model: Transformer,
                 wire: WireFormat, kv_dtype: torch.dtype, max_len: int,
                 logprobs: int | None, faults: FaultInjector, driver: Driver | None = None):
        """Slice j's worker; slice 0 also gets the `driver` (scheduler and ring ends).
        `logprobs`: top log-probabilities per token the last slice returns (0: the chosen token's
        only; None: none). How each row samples travels with the row (`Row.params`)."""
        self.world, self.layout, self.j, self.model, self.wire = world, layout, j, model, wire
        self.args = model.args
        self.layers = layout.slice_layers(j)
        self.first, self.last = j == 0, j == layout.slices - 1
        self.device = model.device
        self.logprobs, self.faults = logprobs, faults
        self.driver = driver
        # Pass ids below this are micro-batches; the prefill lane's, where the job has one, is it
        self.lane = layout.n_micro_batches
        self.outbox = tp.Outbox(world, alloc=wire.alloc)  # preallocated (pinned on a GPU)
        self.replies: dict[int, np.ndarray] = {}  # mb -> its replies' receive buffer
        # Slots whose KV cache stays here (hybrid mode, or no tier 2 at all), packed densely.
        local = layout.local_slots()
        self.local_index = np.full(layout.n_slots, -1, dtype=np.int64)
        self.local_index[local] = np.arange(len(local))
        cuda_graphs = (self.device.type == "cuda"
                       and os.environ.get("GHMPI_CUDA_GRAPHS", "1") != "0")
        # The single tier on a GPU replays its decode passes as CUDA graphs (one spare slot
        # absorbs the padding rows of a bucket).
        graphs = (cuda_graphs and layout.slices == 1
                  and (layout.n_tier2 == 0 or layout.gpu_micro_batches > 0))
        self.cache = (KVCache(list(self.layers), len(local) + graphs, max_len,
                              self.args.n_kv_heads, self.args.head_dim, kv_dtype, self.device)
                      if local else None)
        self.graphs = self.layer_graphs = None
        if self.device.type == "cuda":
            warm_up_cuda(self.args, model.dtype, self.device)
        if graphs and local:
            self.graphs = DecodeGraphs(model, self.cache, layout.max_micro_batch_size, len(local))
            self.graphs.capture_all()
        # Passes that wait on tier 2 (or run through several slices) replay the work between
        # two attentions per layer instead.
        if cuda_graphs and (layout.n_tier2 or layout.slices > 1):
            t0 = time.perf_counter()
            self.layer_graphs = LayerGraphs(model, self.layers, layout.max_micro_batch_size)
            self.layer_graphs.capture_all()
            if self.first:
                print(f"ghmpi: tier 1: {len(self.layer_graphs.graphs)} layer graphs captured in "
                      f"{time.perf_counter() - t0:.1f} s", flush=True)
        # GPU micro-batches' graph steps in flight: (pass, its logits, the step's end event)
        self.inflight: list[tuple[Pass, torch.Tensor, torch.cuda.Event]] = []
        # On a GPU beside tier 2, the segments and copies of tier-2-served micro-batches run on a
        # high-priority stream; work that should only fill the GPU's spare time runs on
        # low-priority ones, so a tier-2 micro-batch's layer runs between its kernels instead of
        # after it: GPU micro-batches' graph steps (hybrid), and the prefill lane's layers, whose
        # copies to the wire this rank does not wait for (`_ship`).
        self.stream = self.step_stream = self.lane_stream = None
        if self.device.type == "cuda" and layout.n_tier2:
            self.stream = torch.cuda.Stream(self.device, priority=-1)
            self.lane_stream = torch.cuda.Stream(self.device, priority=0)
            if self.graphs is not None:
                self.step_stream = torch.cuda.Stream(self.device, priority=0)
        self.owner = np.array(layout.owners(j), dtype=np.int64)
        self.group = layout.tier2_group(j)
        self.ready: list[Pass] = []
        self.staging: list[Pass] = []  # lane passes whose layer's messages are being copied
        self.waiting: list[Pass] = []
        self.clock = tp.BusyClock()

    # -- passes ------------------------------------------------------------------------------
    def _on(self, mb: int):
        """The stream pass mb's device work runs on: the prefill lane's own, else the current."""
        if mb == self.lane and self.lane_stream is not None:
            return torch.cuda.stream(self.lane_stream)
        return contextlib.nullcontext()

    def _new_pass(self, mb: int, rows: list[Row], x: torch.Tensor | None) -> Pass:
        with self._on(mb):
            plan = build_plan(rows, self.owner, self.local_index, self.device)
            if x is None:  # slice 0: embed the tokens
                x = self.model.embed(torch.from_numpy(plan.tokens).to(self.device,
                                                                      non_blocking=True))
            return Pass(mb, plan, x, self.layers.start)

    def _start_layer(self, p: Pass) -> None:
        """post-attention of the layer before -> pre-attention -> attend (ship tier 2 its share
        first, then the local attention while tier 2 works); the post-attention waits until
        every reply is in (`_finish_layer`) and runs with the next layer's pre-attention."""
        self.faults.step()
        with self._on(p.mb):
            p.x, (q, k, v) = self._segment(p)  # (n, H, D), (n, KV, D) x2
            p.o = torch.empty(q.shape[0], self.args.n_heads * self.args.head_dim,
                              dtype=q.dtype, device=q.device)
            self._ship(p, q, k, v)
            attend_local(self.cache, p.plan, p.layer, q, k, v, p.o)
        self._park(p)

    def _park(self, p: Pass) -> None:
        """After a layer's shipping: wait for its staged copies (the lane), or for its replies,
        or, with neither, finish the layer now."""
        if p.staged is not None:
            self.staging.append(p)
        elif p.waits:
            self.waiting.append(p)
        else:
            self._finish_layer(p)

    def _segment(self, p: Pass) -> tuple[torch.Tensor, tuple | None]:
        """The work between two attentions: post-attention of layer p.layer - 1 (when its output
        p.o is pending), then pre-attention of p.layer (unless the slice ends there) -> (the
        residual stream after it, (q, k, v) or None). A decode pass on a GPU replays it as one
        CUDA graph."""
        if self.layer_graphs is not None and LayerGraphs.eligible(p.plan):
            return self.layer_graphs.run(p.layer, p.x, p.o, p.plan.positions)
        x = p.x if p.o is None else self.model.post_attention(p.layer - 1, p.x, p.o)
        if p.layer == self.layers.stop:
            return x, None
        return x, self.model.pre_attention(p.layer, x, p.plan.positions)

    def _ship(self, p: Pass, q, k, v) -> None:
        """Send each tier-2 owner one message with its decode rows' q/k/v, the prompts' K/V and
        its prompt chunks' q/k/v. All messages' payloads leave the device together, straight
        into their send buffers, synchronised once (which also retires the last layer's copy out
        of this micro-batch's reply buffer, so its receives can be posted again). What is the
        same every layer (headers, reply offsets) is worked out once per pass (`_route`); each
        message has two send buffers, taken in turn by even and odd layers.

        The prefill lane's copies are not waited for: its layer's GPU work, long beside a decode
        micro-batch's, runs on a stream of its own while this rank serves the micro-batches, and
        the messages go out (`_post`) once the copies are done (`_loop`)."""
        if not p.plan.remote:
            return
        r = p.route or self._route(p)
        trace.mark("ship", p.mb, p.layer, p.plan.n_rows, p.plan.n)
        qkv = packed_qkv(q, k, v)  # every owner's decode rows: one run of it
        payloads = [Work.wire_parts(qkv[sh.dec_span], [k[a:b] for a, b in sh.fill_spans],
                                    [v[a:b] for a, b in sh.fill_spans],
                                    [q[a:b] for a, b in sh.chunk_spans],
                                    [k[a:b] for a, b in sh.chunk_spans],
                                    [v[a:b] for a, b in sh.chunk_spans])
                    for sh in p.plan.remote]
        lane = p.mb == self.lane
        msgs = r.shipment.frames(self.wire, p.layer, payloads, r.buffers[p.layer % 2],
                                 wait=not lane)
        p.staged = (msgs, r.keys[p.layer % 2], Copies(self.device) if lane else None)
        if lane:
            trace.mark("staged", p.mb, p.layer, p.plan.n_rows, p.plan.n)
        else:
            self._post(p)

    def _post(self, p: Pass) -> None:
        """Post the receives of p's replies (they land one after the other in its reply buffer:
        rows of the spans in `p.replied`, in order), then send the staged messages."""
        r, (msgs, keys, _) = p.route, p.staged
        p.staged = None
        reply = self._reply_buffer(p.mb, r.reply_bytes)
        for (owner, a, b) in r.replies:  # post the receives before the requests go out
            p.waits.append(self.world.Irecv([reply[a:b], MPI.BYTE], source=owner,
                                            tag=reply_tag(p.mb)))
        p.waiting_on, p.replied = r.waiting_on, r.replied
        for owner, key, msg in zip(r.owners, keys, msgs):
            self.outbox.send(msg, owner, tp.TAG_WORK, key=key)
        trace.mark("shipped", p.mb, p.layer, p.plan.n_rows, p.plan.n)

    def _route(self, p: Pass) -> "_Route":
        remote = p.plan.remote
        works = [Work(p.mb, p.layer, sh.dec_slots, sh.dec_pos, sh.fill_slots,
                      [b - a for a, b in sh.fill_spans], *_NONE3, [], [], sh.fill_copies,
                      chunk_slots=sh.chunk_slots, chunk_pos=sh.chunk_pos,
                      chunk_len=[b - a for a, b in sh.chunk_spans]) for sh in remote]
        shipment = Shipment(works)
        keys = tuple([("work", p.mb, sh.owner, parity) for sh in remote] for parity in (0, 1))
        replies, at = [], 0
        for sh, n in zip(remote, shipment.n_reply):
            if n:
                replies.append((sh.owner, at, at + n * self.row_bytes))
                at += n * self.row_bytes
        p.route = _Route(
            shipment, [sh.owner for sh in remote], keys,
            tuple([lambda n, key=key: self.outbox.buffer(key, n) for key in ks] for ks in keys),
            replies, at, [o for o, _, _ in replies],
            _merged([s for sh, n in zip(remote, shipment.n_reply) if n for s in sh.reply_spans]))
        return p.route

    @property
    def row_bytes(self) -> int:
        """Bytes of one row of attention output on the wire."""
        return self.args.n_heads * self.args.head_dim * self.wire.itemsize

    def _reply_buffer(self, mb: int, nbytes: int) -> np.ndarray:
        """The first `nbytes` of the receive buffer for tier 2's replies to micro-batch mb: a
        micro-batch waits on at most one layer at a time, so one buffer suffices. It holds a
        full micro-batch of decode rows from the start and grows when a pass's prompt chunks on
        tier-2 slots ask for more (at most the pass's prefill budget more), so pinned memory goes
        to chunk rows only where chunks happen. Replacing it is safe: `_post` asks once the copy
        of the messages is done, so no copy out of the old buffer (queued on the same stream
        before them) is pending."""
        buf = self.replies.get(mb)
        if buf is None or buf.nbytes < nbytes:
            buf = self.replies[mb] = self.wire.alloc(
                max(nbytes, self.layout.max_micro_batch_size * self.row_bytes))
        return buf[:nbytes]

    def _replies_in(self, p: Pass) -> bool:
        return MPI.Request.Testall(p.waits)

    def _finish_layer(self, p: Pass) -> None:
        with self._on(p.mb):
            if p.waits:  # every reply's rows in one copy to the device, then to their spans
                rows = sum(span.stop - span.start for span in p.replied)
                o = self.wire.from_bytes(self.replies[p.mb], (rows, p.o.shape[1]), self.device)
                at = 0
                for span in p.replied:  # decode rows only: one span
                    p.o[span] = o[at:at + span.stop - span.start]
                    at += span.stop - span.start
                p.waits, p.waiting_on, p.replied = [], [], []
            p.layer += 1  # p.o now awaits its post-attention (`_segment`)
            if p.layer < self.layers.stop:
                self.ready.append(p)
            else:
                p.x, _ = self._segment(p)
                p.o = None
                self._leave_slice(p)

    def _leave_slice(self, p: Pass) -> None:
        if not self.last:
            key = ("ring", p.mb)
            msg = self.wire.frame(rows_header(p.mb, p.rows), [p.x], lambda n: self.outbox.buffer(key, n))
            self.outbox.send(msg, self.j + 1, tp.TAG_RING, key=key)
            return
        self._sample(p, self.model.classify(p.x[p.plan.last_tokens]))

    def _sample(self, p: Pass, logits: torch.Tensor) -> None:
        """logits (rows, vocab) float32 -> the next token of every draw (ghmpi/runtime/draws.py:
        each row's own settings and random stream, one draw per sample sharing a prefill, and
        log-probabilities when asked), to slice 0."""
        d = choose(logits, p.rows, self.logprobs)
        trace.mark("sample", p.mb, p.layer, p.plan.n_rows, p.plan.n)
        if any(r.prompt_logprobs for r in p.rows):
            d.prompt_logprobs = prompt_logprobs(self.model.classify, p.x, p.rows)
        if self.first:
            self._commit(p.mb, d)
        else:
            self.outbox.send(encode_draws(p.mb, d), 0, tp.TAG_TOKENS)

    # -- slice 0: the driver's side of the ring ----------------------------------------------
    def _launch(self, mb: int) -> None:
        rows = self.driver.plan(mb)
        if rows:
            self.ready.append(self._new_pass(mb, rows, None))

    def _commit(self, mb: int, draws: Draws) -> None:
        """mb's tokens are in: its next pass, and any other that now has rows (with a prefill
        lane, a micro-batch idles until the lane's pass hands it sequences, and the lane until a
        slot frees)."""
        self.driver.commit(mb, draws)
        self._launch(mb)
        if self.driver.lane is not None:
            for other in self.driver.passes:
                if other not in self.driver.home:
                    self._launch(other)

    # -- the loop ----------------------------------------------------------------------------
    def _poll_messages(self) -> int | None:
        """Take in ring, token and stop messages. Returns an exit status on STOP."""
        tags = (tp.TAG_STOP, tp.TAG_RING) if not self.first else (tp.TAG_TOKENS,)
        while True:
            msg = next((m for m in (tp.try_recv(self.world, tag=t) for t in tags) if m), None)
            if msg is None:
                return None
            buf, source, tag = msg
            header, payload = tp.unpack(buf)
            if tag == tp.TAG_STOP:
                return int(header[0])
            if tag == tp.TAG_RING:
                mb, rows = rows_from_header(header)
                n = sum(r.ntok for r in rows)
                with self._on(mb):
                    x = self.wire.from_bytes(payload, (n, self.args.dim), self.device)
                self.ready.append(self._new_pass(mb, rows, x))
            elif tag == tp.TAG_TOKENS:
                self._commit(*decode_draws(header, payload))
            else:
                raise RuntimeError(f"unexpected message tag {tag} from rank {source}")

    def run(self) -> int:
        """Serve until done (slice 0 decides) and return the job's exit status. Messages move
        while this rank waits on its GPU (`tp.ProgressThread`)."""
        with tp.ProgressThread(None if self.layout.world_size > 1 else 0), \
                torch.cuda.stream(self.stream) if self.stream else contextlib.nullcontext():
            return self._loop()

    def _launch_graph(self, p: Pass) -> None:
        """A GPU micro-batch's decode step: one graph replay, not waited for; it is sampled once
        its end event has passed (`_loop`), so the host serves tier-2 micro-batches meanwhile."""
        for _ in self.layers:
            self.faults.step()
        with (torch.cuda.stream(self.step_stream) if self.step_stream
              else contextlib.nullcontext()):
            logits = self.graphs.run(p.rows, self.local_index)
            if self.layout.n_micro_batches > 1:  # the bucket's buffer serves its next replay
                logits = logits.clone()
            done = torch.cuda.Event()
            done.record()
        self.inflight.append((p, logits, done))
        trace.mark("launch", p.mb, rows=p.plan.n_rows)

    def _sample_finished_steps(self) -> bool:
        """Sample the GPU steps that have finished and launch those micro-batches' next steps at
        once (the GPU idles on them until then); whether there were any. The loop looks between
        every piece of tier-2-served work, so a GPU step waits at most one such piece."""
        finished = [g for g in self.inflight if g[2].query()]
        for g in finished:
            self.inflight.remove(g)
            torch.cuda.current_stream().wait_event(g[2])
            self._sample(g[0], g[1])
        if finished:
            for p in [p for p in self.ready if DecodeGraphs.eligible(p.plan)]:
                self.ready.remove(p)
                self._launch_graph(p)
        return bool(finished)

    def _loop(self) -> int:
        if self.first:
            for mb in self.driver.passes:
                self._launch(mb)
        backoff = tp.Backoff()
        status = None
        while status is None:
            t_iter = time.perf_counter()
            busy = self._post_staged()
            still = []
            for p in self.waiting:
                if self._replies_in(p):
                    trace.mark("replied", p.mb, p.layer, p.plan.n_rows, p.plan.n)
                    self._finish_layer(p)
                    busy = True
                    if self.inflight:
                        self._sample_finished_steps()
                else:
                    still.append(p)
            self.waiting = still
            if self.inflight and self._sample_finished_steps():
                busy = True
            if self.layout.world_size > 1:
                status = self._poll_messages()
            if self.ready:
                # A GPU micro-batch's graph pass first (it never waits on tier 2), then the pass
                # furthest along: it frees its slots (and the ring) soonest.
                p = self._next_ready()
                if self.graphs is not None and DecodeGraphs.eligible(p.plan):
                    self._launch_graph(p)
                else:
                    self._start_layer(p)
                if self.inflight:
                    self._sample_finished_steps()
                busy = True
            self.outbox.poll()
            if self.first:
                self.driver.tick()
                status = self.driver.verdict()  # set once nothing is out on the ring
                if status is not None:
                    self._stop_all(status)
                    break
            if busy:
                backoff.reset()
            elif self.inflight and not self.waiting and not self.ready:
                self.inflight[0][2].synchronize()  # nothing but a GPU step to wait for
                busy = True
            else:  # idle; while replies are due, look again soon (a late look stalls the ring)
                backoff.idle(REPLY_POLL_S if self.waiting or self.inflight or self.staging
                             else None)
            # an iteration that did work is busy time (its GPU work is synchronised on the way:
            # replies, shipping, sampling); one that found nothing to do is idle time
            if busy:
                self.clock.busy += time.perf_counter() - t_iter
            else:
                self.clock.idle_s += time.perf_counter() - t_iter
        if not self.first:
            self._stop_tier2(status)
        return status

    def _post_staged(self) -> bool:
        """Send the lane's messages whose copies are done (the lane then waits on its replies,
        or is ready for its next layer); whether there were any."""
        done = [p for p in self.staging if p.staged[2].done()]
        for p in done:
            self.staging.remove(p)
            self._post(p)
            self._park(p)
        return bool(done)

    def _next_ready(self) -> Pass:
        if self.graphs is not None:
            for p in self.ready:
                if DecodeGraphs.eligible(p.plan):
                    self.ready.remove(p)
                    return p
        # the prefill lane's layers when no micro-batch's are ready: it fills the GPU's idle time
        p = max(self.ready, key=lambda q: (q.mb < self.lane, q.layer))
        self.ready.remove(p)
        return p

    def _stop_all(self, status: int) -> None:
        for j in range(1, self.layout.slices):
            self.outbox.send(tp.pack([status]), j, tp.TAG_STOP)
        self._stop_tier2(status)

    def _stop_tier2(self, status: int) -> None:
        # Our earlier WORK messages are ahead of STOP on each link (MPI keeps per-pair order);
        # tier 2 leaves once every slice it serves has said STOP.
        for r in self.group:
            self.outbox.send(tp.pack([status]), r, tp.TAG_STOP)
        self.outbox.drain()

    # -- the stall watchdog's question (runs on its thread: reads state, completes nothing) -----
    def waiting_on(self) -> str:
        """The ranks this slice waits on: tier-2 replies not in, sends not taken, micro-batches
        out on the ring (slice 0: launched, tokens not back)."""
        def outstanding(req: MPI.Request) -> bool:
            try:
                return not req.Get_status()  # does not complete or free the request
            except Exception:
                return True

        def role(r: int) -> str:
            return f"rank {r} ({self.layout.role(r)})"

        replies: dict[int, set[int]] = {}
        for p in list(self.waiting):
            for req, owner in list(zip(p.waits, p.waiting_on)):
                if outstanding(req):
                    replies.setdefault(owner, set()).add(p.mb)
        sends: dict[int, set[int]] = {}
        for key, req in list(self.outbox._keyed.items()):
            if outstanding(req):
                dest = key[2] if key[0] == "work" else self.j + 1
                sends.setdefault(dest, set()).add(key[1])
        said = []
        for r in sorted(set(replies) | set(sends)):
            what = ([f"attention replies of micro-batch(es) {sorted(replies[r])}"] if r in replies
                    else []) + ([f"to take our message(s) of micro-batch(es) {sorted(sends[r])}"]
                                if r in sends else [])
            said.append(f"{role(r)}: {' and '.join(what)}")
        here = {p.mb for p in list(self.ready) + list(self.staging) + list(self.waiting)}
        ring = sorted(set(self.driver.home if self.driver else ()) - here)
        if self.first and ring and self.layout.slices > 1:
            later = range(1, self.layout.slices)
            said.append(f"micro-batch(es) {ring} out on the ring, tokens not back from "
                        f"{', '.join(role(r) for r in later)} (or the tier-2 ranks they wait on)")
        return "; ".join(said) or "nothing outstanding on this rank (rank 0 itself is stuck)"
