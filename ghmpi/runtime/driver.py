"""Slice 0's side of the ring: the scheduler, the passes out on the ring, the end of the job.

The slice worker (`Tier1`) runs layers; the driver decides what each micro-batch's next pass
feeds, takes the sampled tokens back, hands finished sequences to the job, and says when the job
is over (or stopped). It never touches tensors or MPI.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from ghmpi.comm.topology import LOCAL
from ghmpi.errors import EXIT_INTERRUPTED, EXIT_OK
from ghmpi.runtime.passplan import order_rows
from ghmpi.runtime.scheduler import Draws, Row, Scheduler


class TailGuard:
    """Hybrid layouts: when a micro-batch served by tier 2 stops taking new prompts.

    A sequence moves at its micro-batch's pace, and a micro-batch that waits on tier 2 every
    layer is several times slower than one held wholly on the GPU. A prompt given to it late
    in the job finishes after the GPU micro-batches would have finished everything left on
    their own, so it makes the job later. Each micro-batch's passes are timed (a running mean
    of the seconds per pass and of the tokens each samples). A tier-2-served micro-batch takes
    new prompts only while a sequence's expected life there (max_new_tokens passes) is within
    the time the GPU micro-batches alone would need for what is left: the samples not yet
    admitted (max_new_tokens each) and the tokens their own sequences still have to make, at
    their measured tokens per second (prefill passes included). A sequence's life on tier 2 is
    counted in decode passes (those without prompt tokens, when there have been any): the
    passes that refill a micro-batch with prompts are slower and come once per life. Until both
    paces are measured it takes prompts only while more samples wait than the GPU micro-batches
    hold twice over. A micro-batch that finds nothing to admit and has no sequence left stays
    idle for the rest of the job.
    """

    EMA = 0.2  # weight of the newest pass in the running means

    def __init__(self, scheduler: Scheduler, gpu: list[bool], samples: int,
                 clock: Callable[[], float] = time.perf_counter):
        self.s, self.gpu, self.samples, self.clock = scheduler, gpu, samples, clock
        self.gpu_mbs = [m for m, g in enumerate(gpu) if g]
        self.gpu_slots = [slot for m in self.gpu_mbs for slot in scheduler.slots_of[m]]
        self.started: dict[int, float] = {}
        self.seconds: dict[int, float] = {}  # micro-batch -> running mean of seconds per pass
        self.decode_seconds: dict[int, float] = {}  # the same over passes without prompt tokens
        self.draws: dict[int, float] = {}  # micro-batch -> running mean of tokens per pass
        self.tokens = [0, 0]  # tokens sampled by GPU micro-batches, by tier-2-served ones
        self.closed_with: int | None = None  # samples left when tier 2 first took no prompt

    def planned(self, mb: int) -> None:
        self.started[mb] = self.clock()

    def committed(self, mb: int, draws: int, prefill: bool) -> None:
        dt = self.clock() - self.started.pop(mb)
        self._mean(self.seconds, mb, dt)
        self._mean(self.draws, mb, draws)
        if not prefill:
            self._mean(self.decode_seconds, mb, dt)
        self.tokens[not self.gpu[mb]] += draws

    def _mean(self, means: dict[int, float], mb: int, x: float) -> None:
        means[mb] = x if mb not in means else (1 - self.EMA) * means[mb] + self.EMA * x

    @property
    def left(self) -> int:
        """Samples not admitted yet."""
        return self.samples - self.s.admitted_samples

    def gpu_alone_s(self) -> float | None:
        """Seconds the GPU micro-batches alone would need for what is left (None: unmeasured)."""
        if not all(m in self.seconds for m in self.gpu_mbs):
            return None
        rate = sum(self.draws[m] / max(self.seconds[m], 1e-9) for m in self.gpu_mbs)
        s = self.s
        tokens = self.left * s.max_new_tokens + sum(
            seq.max_new - len(seq.generated)
            for seq in (s.active.get(slot) for slot in self.gpu_slots) if seq is not None)
        return tokens / max(rate, 1e-9)

    def admits(self, mb: int) -> bool:
        if self.gpu[mb]:
            return True
        left = self.left
        alone = self.gpu_alone_s()
        if alone is None or mb not in self.seconds:
            ok = left > 2 * len(self.gpu_slots)
        else:
            pace = self.decode_seconds.get(mb, self.seconds[mb])
            ok = self.s.max_new_tokens * pace <= alone
        if not ok and self.closed_with is None and left > 0:
            self.closed_with = left
        return ok

    def line(self) -> str:
        gpu, t2 = self.tokens
        closed = ("" if self.closed_with is None else
                  f"; tier 2 took no more prompts with {self.closed_with} samples left, the GPU "
                  f"micro-batches alone finishing them sooner")
        return (f"hybrid: {gpu} tokens sampled by GPU micro-batches, {t2} by tier-2-served "
                f"ones{closed}")


class Driver:
    def __init__(self, scheduler: Scheduler, owner: np.ndarray,
                 on_finished: Callable[[list], None],
                 should_drain: Callable[[], bool] = lambda: False,
                 tick: Callable[[int], None] = lambda generated: None,
                 guard: TailGuard | None = None, lane: int | None = None):
        """`guard`: hybrid layouts' TailGuard (it gates the scheduler's admissions); `lane`: the
        pass id of the prefill lane (`Scheduler.plan_lane`; None: no lane), after the
        micro-batches' ids."""
        self.scheduler = scheduler
        self.lane = lane
        self.guard = guard
        if guard is not None:
            scheduler.admits = guard.admits
        self.owner = owner  # slot -> world rank of its KV (LOCAL on tier 1), for order_rows
        self.on_finished, self.should_drain, self._tick = on_finished, should_drain, tick
        self.home: set[int] = set()  # micro-batches out on the ring
        self.plans: dict[int, list[Row]] = {}  # rows of each micro-batch's pass in flight
        self.generated = 0  # tokens sampled
        self.chunked = [0, 0]  # prompts prefilled in chunks on tier-1 slots, on tier-2 slots

    @property
    def passes(self) -> list[int]:
        """Ids of every pass that can be out on the ring: the micro-batches, then the lane."""
        n = len(self.scheduler.slots_of)
        return [*range(n), *([] if self.lane is None else [self.lane])]

    def plan(self, mb: int) -> list[Row]:
        """Rows of micro-batch mb's (or the lane's) next pass (empty: nothing for it now)."""
        lane = mb == self.lane
        rows = order_rows(self.scheduler.plan_lane() if lane else self.scheduler.plan(mb),
                          self.owner)
        if rows:
            self.plans[mb] = rows
            self.home.add(mb)
            if self.guard is not None and not lane:
                self.guard.planned(mb)
        for r in rows:
            if r.prefill and r.start == 0 and not r.final:  # a long prompt's first chunk
                self.chunked[int(self.owner[r.slot] != LOCAL)] += 1
        return rows

    def commit(self, mb: int, draws: Draws) -> None:
        """The tokens of mb's pass are back: apply them, hand over what finished."""
        rows = self.plans.pop(mb)
        self.home.discard(mb)
        self.generated += len(draws.tokens)
        if self.guard is not None and mb != self.lane:
            self.guard.committed(mb, len(draws.tokens), any(r.prefill for r in rows))
        elif self.guard is not None:  # the lane's first tokens: tier-2-served micro-batches'
            self.guard.tokens[1] += len(draws.tokens)
        finished = self.scheduler.commit(rows, draws)
        if finished:
            self.on_finished(finished)
        if self.should_drain():
            self.scheduler.draining = True

    def tick(self) -> None:
        self._tick(self.generated)

    def verdict(self) -> int | None:
        """The job's exit status once no micro-batch is out on the ring, else None."""
        if self.home:
            return None
        s = self.scheduler
        if s.draining or s.queue_empty:
            done = s.queue_empty and not s.active
            return EXIT_INTERRUPTED if s.draining and not done else EXIT_OK
        # A free slot always admits a prompt, so prompts left here would mean a silent spin.
        raise RuntimeError("scheduler stalled with prompts left and nothing in flight")
