"""Where the ring's time goes, from a job's GHMPI_TRACE folder (ghmpi/runtime/trace.py).

Usage: python bench/trace_summary.py DIR [TIER1_RANKS]   (TIER1_RANKS: 1 unless given)

Splits the job at the last layer that carried prompt tokens (prefill) and prints, for the decode
phase after it: tier 1's time per layer visit (`ship` -> `shipped`: staging and sending),
the round trip (`shipped` -> `replied`) and the turnaround (`replied` -> that micro-batch's next
`ship`), and each tier-2 rank's serve time (`recv` -> `served`) and busy fraction."""

from __future__ import annotations

import json
import statistics as st
import sys
from collections import defaultdict
from pathlib import Path


def ms(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"mean {1e3 * st.mean(xs):.2f} ms, median {1e3 * st.median(xs):.2f}, n {len(xs)}"


def main() -> None:
    folder = Path(sys.argv[1])
    n_t1 = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    ranks = {int(p.stem[4:]): json.loads(p.read_text()) for p in folder.glob("rank*.json")}
    t0 = min(e[0] for ev in ranks.values() for e in ev if ev)
    t1 = ranks[0]
    pre = [e[0] for e in t1 if e[1] == "ship" and e[5] > e[4]]
    start = max(pre) if pre else t0
    end = max(e[0] for e in t1)
    print(f"job traced {end - t0:.1f} s; prefill until {start - t0:.1f} s; decode phase "
          f"{end - start:.1f} s")
    dec = [e for e in t1 if e[0] > start]
    ship, shipped, replied = {}, [], []
    turn, trip, own = [], [], []
    last_reply: dict[int, float] = {}
    for t, ev, mb, layer, rows, tok in dec:
        if ev == "ship":
            ship[mb] = t
            if mb in last_reply:
                turn.append(t - last_reply.pop(mb))
        elif ev == "shipped" and mb in ship:
            own.append(t - ship[mb])
            shipped.append((mb, t))
            ship[mb + 10**6] = t
        elif ev == "replied" and mb + 10**6 in ship:
            trip.append(t - ship.pop(mb + 10**6))
            last_reply[mb] = t
    print(f"tier 1: stage+send {ms(own)}")
    print(f"tier 1: round trip shipped->replied {ms(trip)}")
    print(f"tier 1: turnaround replied->next ship {ms(turn)}")
    samples = [t for t, ev, *_ in dec if ev == "sample"]
    print(f"tier 1: {len(samples)} samples in the decode phase")
    for r in sorted(k for k in ranks if k >= n_t1):
        ev = [e for e in ranks[r] if e[0] > start]
        serve, gaps, busy = [], [], 0.0
        got = None
        last = None
        for t, name, *_ in ev:
            if name == "recv":
                got = t
                if last is not None:
                    gaps.append(t - last)
            elif name == "served" and got is not None:
                serve.append(t - got)
                busy += t - got
                last = t
        print(f"tier 2 rank {r}: serve {ms(serve)}; gap to next {ms(gaps)}; busy "
              f"{busy / max(end - start, 1e-9):.0%} of the decode phase")


if __name__ == "__main__":
    main()
