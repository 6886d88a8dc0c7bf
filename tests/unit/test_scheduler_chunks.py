"""Chunked prefill in the scheduler (plain data): a prompt longer than a pass's budget is fed in
chunks on tier-1 slots, beside the decode rows, and only its last chunk's draw counts."""

import numpy as np

from ghmpi.runtime.scheduler import Scheduler


def make(prompts, budget, chunk_slots=frozenset({0, 1})):
    reqs = [(i, np.arange(1, n + 1, dtype=np.int32), 3) for i, n in enumerate(prompts)]
    return Scheduler(reqs, [range(2)], 3, [], [], False, 1000, budget, chunk_slots=chunk_slots)


def test_long_prompt_is_fed_in_chunks_beside_decodes():
    s = make([4, 10], budget=4)
    rows = s.plan(0)  # prompt 0 whole (4 tokens); no budget left for prompt 1
    assert [(r.slot, r.start, r.ntok, r.prefill, r.final) for r in rows] == [(0, 0, 4, True, True)]
    assert s.commit(rows, [7]) == []
    rows = s.plan(0)  # prompt 0 decodes, prompt 1 is admitted with a first chunk of 4
    assert [(r.slot, r.start, r.ntok, r.prefill, r.final) for r in rows] == [
        (0, 4, 1, False, True), (1, 0, 4, True, False)]
    s.commit(rows, [8, 99])  # the chunk's draw is dropped
    assert s.active[1].generated == []
    rows = s.plan(0)
    assert [(r.slot, r.start, r.ntok, r.final) for r in rows] == [(0, 5, 1, True), (1, 4, 4, False)]
    done = s.commit(rows, [9, 99])
    assert [(f.index, f.tokens) for f in done] == [(0, [7, 8, 9])]  # prompt 0 had max_new 3
    rows = s.plan(0)  # the last 2 tokens: its draw is the first generated token
    assert [(r.slot, r.start, r.ntok, r.final) for r in rows] == [(1, 8, 2, True)]
    assert list(rows[0].tokens) == [9, 10]
    s.commit(rows, [11])
    assert s.active[1].generated == [11]


def test_tier2_slots_take_a_long_prompt_whole():
    s = make([10], budget=4, chunk_slots=frozenset())
    rows = s.plan(0)  # the first admission of a pass goes in whole, as before
    assert [(r.start, r.ntok, r.final) for r in rows] == [(0, 10, True)]
