"""A traced job's phases (GHMPI_TRACE=dir, `ghmpi/runtime/trace.py`): prefill, full decode and
tail, and the tokens sampled in each.

The job is cut where every micro-batch first ships its full decode rows after the last layer
shipped with prompt tokens in it, and again where a micro-batch's decode rows first thin out
(the tail: the sequences admitted first finish first).
The decode phase's rate is what the ring does once every sequence decodes: the figure to set
against `bench pipeline`'s capacities, which count decode work only. Used by `bench pipeline`
and by bench/trace_summary.py.
"""

from __future__ import annotations

import json
from pathlib import Path

Events = list[list]  # (seconds since the epoch, event, micro-batch, layer, rows, tokens)


def load(folder: str | Path) -> dict[int, Events]:
    """rank -> its trace events."""
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in Path(folder).glob("rank*.json")}


def phases(ranks: dict[int, Events]) -> list[tuple[str, float, float]]:
    """[(name, start, end)] of the prefill, decode and tail phases, from rank 0's shipping."""
    ring = [e[0] for ev in ranks.values() for e in ev if e[1] != "gc"]  # gc: start-up to exit
    if not ring:  # nothing traced
        return [("prefill", 0.0, 0.0), ("decode", 0.0, 0.0), ("tail", 0.0, 0.0)]
    t0, end = min(ring), max(ring)
    ships = sorted(e for e in ranks.get(0, []) if e[1] == "ship")
    pre = [e[0] for e in ships if e[5] > e[4]]
    cut = max(pre) if pre else t0
    decode = [e for e in ships if e[0] >= cut and e[5] == e[4]]  # decode-only passes' layers
    full: dict[int, int] = {}  # micro-batch -> its decode passes' most rows
    for e in decode:
        full[e[2]] = max(full.get(e[2], 0), e[4])
    # With a prefill lane the last prompts join their micro-batch a pass after their prefill:
    # the decode phase starts once every micro-batch has shipped its full rows.
    reached: dict[int, float] = {}
    for e in decode:
        if e[4] == full[e[2]]:
            reached.setdefault(e[2], e[0])
    start = max([cut, *reached.values()])
    thin = [e[0] for e in decode if e[0] >= start and e[4] < full[e[2]]]
    tail = min(thin) if thin else end
    return [("prefill", t0, start), ("decode", start, tail), ("tail", tail, end)]


def sampled(ranks: dict[int, Events], lo: float, hi: float) -> int:
    """Tokens sampled in [lo, hi) (the last slice's passes, on whichever tier-1 rank)."""
    return sum(e[4] for ev in ranks.values() for e in ev if e[1] == "sample" and lo <= e[0] < hi)


def rates(folder: str | Path) -> dict[str, dict[str, float]]:
    """{phase: {seconds, tokens, tokens_per_s}} of a traced job."""
    ranks = load(folder)
    out = {}
    for name, lo, hi in phases(ranks):
        n = sampled(ranks, lo, hi)
        out[name] = {"seconds": hi - lo, "tokens": n,
                     "tokens_per_s": n / (hi - lo) if hi > lo else 0.0}
    return out
