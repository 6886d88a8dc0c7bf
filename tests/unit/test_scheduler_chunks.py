"""Chunked prefill in the scheduler (plain data): a prompt longer than a pass's budget is fed in
chunks on any slot (tier 1 or tier 2: the scheduler does not know), beside the decode rows, and
only its last chunk's draw counts. Prompts with several samples sharing a prefill, or asking
prompt log-probabilities, still go whole."""

import numpy as np

from ghmpi.runtime.scheduler import Request, Scheduler


def make(prompts, budget, **kw):
    reqs = [(i, np.arange(1, n + 1, dtype=np.int32), 3) for i, n in enumerate(prompts)]
    return Scheduler(reqs, [range(2)], 3, [], [], False, 1000, budget, **kw)


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


def test_the_first_admission_of_a_pass_is_chunked_too():
    s = make([10], budget=4)
    rows = s.plan(0)  # alone in its pass, it is still cut to the budget
    assert [(r.start, r.ntok, r.final) for r in rows] == [(0, 4, False)]
    s.commit(rows, [99])
    rows = s.plan(0)
    assert [(r.start, r.ntok, r.final) for r in rows] == [(4, 4, False)]
    s.commit(rows, [99])
    rows = s.plan(0)
    assert [(r.start, r.ntok, r.final) for r in rows] == [(8, 2, True)]
    s.commit(rows, [5])
    assert s.active[0].generated == [5]


def test_shared_prefills_and_prompt_logprobs_go_whole():
    two = Request(0, np.arange(1, 11, dtype=np.int32), 3, samples=(0, 1))
    s = Scheduler([two], [range(2)], 3, [], [], False, 1000, 4)
    rows = s.plan(0)  # two samples share one prefill: the prompt goes whole, alone in its pass
    assert [(r.start, r.ntok, r.final, r.copies) for r in rows] == [(0, 10, True, ((1, 1),))]
    s = make([10], budget=4, prompt_logprobs=True)
    rows = s.plan(0)
    assert [(r.start, r.ntok, r.final) for r in rows] == [(0, 10, True)]
