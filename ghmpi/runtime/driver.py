"""Slice 0's side of the ring: the scheduler, the passes out on the ring, the end of the job.

The slice worker (`Tier1`) runs layers; the driver decides what each micro-batch's next pass
feeds, takes the sampled tokens back, hands finished sequences to the job, and says when the job
is over (or stopped). It never touches tensors or MPI.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ghmpi.comm.topology import LOCAL
from ghmpi.errors import EXIT_INTERRUPTED, EXIT_OK
from ghmpi.runtime.passplan import order_rows
from ghmpi.runtime.scheduler import Draws, Row, Scheduler


class Driver:
    def __init__(self, scheduler: Scheduler, owner: np.ndarray,
                 on_finished: Callable[[list], None],
                 should_drain: Callable[[], bool] = lambda: False,
                 tick: Callable[[int], None] = lambda generated: None):
        self.scheduler = scheduler
        self.owner = owner  # slot -> world rank of its KV (LOCAL on tier 1), for order_rows
        self.on_finished, self.should_drain, self._tick = on_finished, should_drain, tick
        self.home: set[int] = set()  # micro-batches out on the ring
        self.plans: dict[int, list[Row]] = {}  # rows of each micro-batch's pass in flight
        self.generated = 0  # tokens sampled
        self.chunked = [0, 0]  # prompts prefilled in chunks on tier-1 slots, on tier-2 slots

    def plan(self, mb: int) -> list[Row]:
        """Rows of micro-batch mb's next pass (empty: nothing left for it)."""
        rows = order_rows(self.scheduler.plan(mb), self.owner)
        if rows:
            self.plans[mb] = rows
            self.home.add(mb)
        for r in rows:
            if r.prefill and r.start == 0 and not r.final:  # a long prompt's first chunk
                self.chunked[int(self.owner[r.slot] != LOCAL)] += 1
        return rows

    def commit(self, mb: int, draws: Draws) -> None:
        """The tokens of mb's pass are back: apply them, hand over what finished."""
        rows = self.plans.pop(mb)
        self.home.discard(mb)
        self.generated += len(draws.tokens)
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
