"""A traced job's phases (`ghmpi/bench/phases.py`) from rank 0's shipping events."""

from ghmpi.bench.phases import phases


def ship(t, mb, rows, tokens=None):
    return [t, "ship", mb, 0, rows, rows if tokens is None else tokens]


def test_phases_in_pass_prefill():
    """Prompts prefilled inside the micro-batches' passes: the decode phase starts after the last
    layer shipped with prompt tokens, once both micro-batches ship their full rows; the tail
    where a micro-batch's rows first thin out."""
    ev = [ship(0, 0, 2, 10), ship(1, 1, 2, 10), ship(2, 0, 4, 12), ship(3, 1, 4, 12),
          ship(4, 0, 4), ship(5, 1, 4), ship(6, 0, 4), ship(7, 1, 3), ship(8, 0, 1)]
    assert phases({0: ev}) == [("prefill", 0, 5), ("decode", 5, 7), ("tail", 7, 8)]


def test_phases_with_a_prefill_lane():
    """The lane (id 2) ships prompts only; its last prompts join micro-batch 1 a pass later: the
    decode phase starts once every micro-batch ships its full rows."""
    ev = [ship(0, 2, 4, 40), ship(1, 0, 2), ship(2, 2, 4, 40), ship(3, 0, 2), ship(4, 1, 2),
          ship(5, 0, 4), ship(6, 1, 4), ship(7, 0, 4), ship(8, 1, 4), ship(9, 0, 2), ship(10, 1, 1)]
    assert phases({0: ev}) == [("prefill", 0, 6), ("decode", 6, 9), ("tail", 9, 10)]
