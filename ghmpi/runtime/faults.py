"""Fault injection for tests: make one rank fail after a number of steps."""

from __future__ import annotations


class InjectedFault(RuntimeError):
    pass


class FaultInjector:
    def __init__(self, rank: int, fail_rank: int, after_steps: int):
        self.armed = fail_rank == rank
        self.after_steps = after_steps
        self.steps = 0

    def step(self) -> None:
        """Count one unit of work (a layer started on tier 1, a message served on tier 2)."""
        if self.armed:
            self.steps += 1
            if self.steps > self.after_steps:
                raise InjectedFault(f"injected fault after {self.after_steps} steps (faults.rank)")
