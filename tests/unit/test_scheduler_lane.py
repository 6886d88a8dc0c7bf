"""The prefill lane in the scheduler (plain data): the micro-batches' passes only decode; the
lane's passes admit prompts into their free slots in turn, in chunks where a prompt is longer
than the budget, and a sequence joins its micro-batch once its first token is sampled."""

import numpy as np

from ghmpi.runtime.scheduler import Request, Scheduler


def make(prompts, budget, slots=((0, 1), (2, 3)), max_new=3):
    reqs = [(i, np.arange(1, n + 1, dtype=np.int32), max_new) for i, n in enumerate(prompts)]
    s = Scheduler(reqs, [range(a, b + 1) for a, b in slots], max_new, [], [], False, 1000, 1000)
    s.lane_mbs, s.lane_tokens = list(range(len(slots))), budget
    return s


def test_lane_admits_and_micro_batches_decode_only():
    s = make([3, 3, 3, 3, 3], budget=6)
    assert s.plan(0) == [] and s.plan(1) == []  # nothing decodes yet; they admit nothing
    rows = s.plan_lane()  # micro-batch 0's free slots first, then 1's, while the budget lasts
    assert [(r.slot, r.index, r.prefill) for r in rows] == [(0, 0, True), (1, 1, True)]
    assert s.plan(0) == []  # their first tokens are not sampled yet
    rows2 = s.plan_lane()  # the next pass starts at micro-batch 1
    assert [(r.slot, r.index) for r in rows2] == [(2, 2), (3, 3)]
    assert s.commit(rows, [7, 8]) == []
    rows = s.plan(0)
    assert [(r.slot, r.start, r.prefill, list(r.tokens)) for r in rows] == [
        (0, 3, False, [7]), (1, 3, False, [8])]
    assert s.plan(1) == []  # its sequences are still in the lane's pass
    assert s.plan_lane() == []  # no free slot left
    s.commit(rows2, [5, 6])
    assert [r.slot for r in s.plan(1)] == [2, 3]


def test_lane_feeds_long_prompts_in_chunks():
    s = make([10, 2], budget=4, slots=((0, 1),))
    rows = s.plan_lane()
    assert [(r.slot, r.start, r.ntok, r.final) for r in rows] == [(0, 0, 4, False)]
    s.commit(rows, [99])
    assert s.plan(0) == []  # still the lane's
    rows = s.plan_lane()  # its next chunk first; nothing else fits
    assert [(r.slot, r.start, r.ntok, r.final) for r in rows] == [(0, 4, 4, False)]
    s.commit(rows, [99])
    rows = s.plan_lane()  # the last 2 tokens, then prompt 1 in the budget left
    assert [(r.slot, r.start, r.ntok, r.final) for r in rows] == [(0, 8, 2, True), (1, 0, 2, True)]
    s.commit(rows, [4, 5])
    assert [(r.slot, list(r.tokens)) for r in s.plan(0)] == [(0, [4]), (1, [5])]


def test_lane_keeps_shared_prefills_whole_and_stops_when_draining():
    two = Request(0, np.arange(1, 11, dtype=np.int32), 3, samples=(0, 1))
    s = Scheduler([two], [range(2)], 3, [], [], False, 1000, 1000)
    s.lane_mbs, s.lane_tokens = [0], 4
    rows = s.plan_lane()
    assert [(r.slot, r.ntok, r.copies) for r in rows] == [(0, 10, ((1, 1),))]
    s.commit(rows, [3, 4])
    assert [r.slot for r in s.plan(0)] == [0, 1]
    s = make([3], budget=6)
    s.draining = True
    assert s.plan_lane() == []
