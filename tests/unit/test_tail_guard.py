"""Hybrid layouts' tail guard (plain data, a fake clock): a micro-batch served by tier 2 takes new
prompts only while a sequence's life there fits in the time the GPU micro-batches alone need for
what is left; a job the GPU holds whole never waits on a tier-2 straggler."""

import numpy as np

from ghmpi.runtime.driver import Driver, TailGuard
from ghmpi.runtime.scheduler import Draws, Scheduler


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def make(n_prompts, max_new=10, gpu_slots=4, t2_slots=2):
    reqs = [(i, np.array([1, 2, 3], dtype=np.int32), None) for i in range(n_prompts)]
    s = Scheduler(reqs, [range(gpu_slots), range(gpu_slots, gpu_slots + t2_slots)], max_new,
                  [], [], True, 1000, 1000)
    clock = Clock()
    guard = TailGuard(s, [True, False], n_prompts, clock)
    finished = []
    d = Driver(s, np.zeros(gpu_slots + t2_slots, dtype=np.int64), finished.extend, guard=guard)
    return s, d, guard, clock, finished


def step(d, clock, mb, seconds):
    """One pass of micro-batch mb taking `seconds`; False when it had nothing to run."""
    rows = d.plan(mb)
    if not rows:
        return False
    clock.t += seconds
    d.commit(mb, Draws(np.full(sum(len(r.draws) for r in rows), 7, dtype=np.int64)))
    return True


def test_a_job_the_gpu_holds_whole_gives_tier_2_nothing():
    s, d, guard, clock, finished = make(6)
    assert step(d, clock, 0, 0.01)  # the GPU micro-batch admits 4 of the 6
    assert not step(d, clock, 1, 0.1)  # 2 wait, fewer than twice the GPU's 4 slots: idle
    while step(d, clock, 0, 0.01):
        pass
    assert len(finished) == 6 and s.queue_empty and not s.active
    assert d.verdict() == 0
    assert guard.tokens == [60, 0]
    assert guard.line().endswith("tier 2 took no more prompts with 2 samples left, the GPU "
                                 "micro-batches alone finishing them sooner")


def test_tier_2_takes_prompts_while_the_gpu_alone_would_need_longer():
    s, d, guard, clock, finished = make(200)
    assert step(d, clock, 0, 0.01)  # GPU: 4 tokens per 10 ms = 400 tokens/s
    assert step(d, clock, 1, 0.1)  # tier 2: a sequence lives 10 passes x 0.1 s = 1 s there
    # 194 samples left x 10 tokens at 400 tokens/s: ~5 s of GPU work, more than 1 s: admit
    assert guard.admits(1)
    gpu_alone = guard.gpu_alone_s()
    assert 4.8 < gpu_alone < 5.0
    # run until the queue is nearly drained: tier 2 stops taking prompts before the end
    while not s.queue_empty:
        step(d, clock, 0, 0.01)
        if s.queue_empty:
            break
        if guard.admits(1) is False:
            break
        step(d, clock, 1, 0.1)
    left = guard.left
    assert not guard.admits(1) and left * 10 / 400 < 1.0 + 0.1  # what is left fits the GPU
    while step(d, clock, 0, 0.01) | step(d, clock, 1, 0.1):
        pass
    assert len(finished) == 200 and d.verdict() == 0
    assert guard.tokens[1] > 0 and sum(guard.tokens) == 2000


def test_without_gpu_micro_batches_every_micro_batch_admits():
    reqs = [(i, np.array([1, 2], dtype=np.int32), None) for i in range(3)]
    s = Scheduler(reqs, [range(2), range(2, 4)], 5, [], [], True, 1000, 1000)
    Driver(s, np.zeros(4, dtype=np.int64), lambda f: None)
    assert s.admits(0) and s.admits(1)


def test_a_sequence_life_on_tier_2_is_counted_in_decode_passes():
    s, d, guard, clock, finished = make(40, max_new=10)
    assert step(d, clock, 0, 0.01)  # GPU: 400 tokens/s
    assert step(d, clock, 1, 2.0)  # tier 2's prefill pass is slow (2 s)
    assert step(d, clock, 1, 0.05)  # its decode passes are not: a life of 10 x 0.05 s
    # 34 samples left x 10 tokens + the GPU's own 36 to come at 400 tokens/s: ~0.94 s >= 0.5 s
    assert guard.admits(1)
    assert guard.seconds[1] > 1.0 and abs(guard.decode_seconds[1] - 0.05) < 1e-9
