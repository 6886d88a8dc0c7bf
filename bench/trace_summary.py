"""Where the ring's time goes, from a job's GHMPI_TRACE folder (ghmpi/runtime/trace.py).

Usage: python bench/trace_summary.py DIR [TIER1_RANKS]   (TIER1_RANKS: 1 unless given)

Splits the job at the last layer that carried prompt tokens, and again where a micro-batch's
decode rows first thin out (the tail: the sequences admitted first finish first;
`ghmpi/bench/phases.py`), and prints, for the prefill phase, the full decode phase and the tail:
the tokens sampled (the last slice's passes; set against `bench pipeline`'s capacities, the
decode phase's rate says what the ring does once every sequence decodes), tier 1's time per
layer visit (`ship` -> `shipped`: staging and sending; for the prefill lane `ship` -> `staged`,
and apart from it `staged` -> `shipped`: its GPU work and copies, which the host does not wait
on), the round trip (`shipped` -> `replied`)
and the turnaround (`replied` -> that micro-batch's next `ship`); each micro-batch's pace (and a
GPU micro-batch's step and the host's gap before its next launch); each tier-2 rank's receive
time and bytes (`got`), serve time (`recv` -> `served`, its spread) and busy fraction (receiving
and serving); and the ring's round trips against the ranks (see `steps`)."""

from __future__ import annotations

import statistics as st
import sys
from pathlib import Path

from ghmpi.bench import phases


def ms(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"mean {1e3 * st.mean(xs):.2f} ms, median {1e3 * st.median(xs):.2f}, n {len(xs)}"


def gc_pauses(events: list) -> str:
    """'; gc N pauses, ...': the garbage collector's pauses among the events, or ''."""
    pauses = [(layer, rows / 1e6) for t, ev, mb, layer, rows, tok in events if ev == "gc"]
    if not pauses:
        return ""
    return (f"; gc {len(pauses)} pauses, {1e3 * sum(p for _, p in pauses):.1f} ms, longest "
            f"{1e3 * max(p for _, p in pauses):.2f} ms, {sum(g == 2 for g, _ in pauses)} full")


def tier1(events: list) -> None:
    ship, staged, waiting, last_reply = {}, {}, {}, {}
    own, lane, trip, turn = [], [], [], []
    for t, ev, mb, layer, rows, tok in events:
        if ev == "ship":
            ship[mb] = t
            if mb in last_reply:
                turn.append(t - last_reply.pop(mb))
        elif ev == "staged" and mb in ship:
            own.append(t - ship.pop(mb))
            staged[mb] = t
        elif ev == "shipped" and (mb in ship or mb in staged):
            if mb in staged:
                lane.append(t - staged.pop(mb))
            else:
                own.append(t - ship.pop(mb))
            waiting[mb] = t
        elif ev == "replied" and mb in waiting:
            trip.append(t - waiting.pop(mb))
            last_reply[mb] = t
    print(f"  tier 1: stage+send {ms(own)}")
    if lane:
        print(f"  tier 1: prefill lane staged->shipped (GPU work and copies) {ms(lane)}")
    print(f"  tier 1: round trip shipped->replied {ms(trip)}")
    print(f"  tier 1: turnaround replied->next ship {ms(turn)}{gc_pauses(events)}")


def passes(events: list) -> None:
    """Per micro-batch: the time between its passes' samples (its pace); for GPU micro-batches
    (graph steps, `launch`) also launch -> sample (the step, including any wait to be looked
    at) and sample -> next launch (the host's gap, the GPU idle for that micro-batch)."""
    last, launched, step, gap, period = {}, {}, {}, {}, {}
    for t, ev, mb, layer, rows, tok in events:
        if ev == "launch":
            if mb in last:
                gap.setdefault(mb, []).append(t - last[mb])
            launched[mb] = t
        elif ev == "sample":
            if mb in launched:
                step.setdefault(mb, []).append(t - launched.pop(mb))
            if mb in last:
                period.setdefault(mb, []).append(t - last[mb])
            last[mb] = t
    for mb in sorted(period):
        extra = (f"; launch->sample {ms(step[mb])}; sample->launch {ms(gap.get(mb, []))}"
                 if mb in step else "")
        print(f"  micro-batch {mb}: pass every {ms(period[mb])}{extra}")


def tier2(rank: int, events: list, span: float) -> None:
    serve, recv, nbytes, busy, got = [], [], [], 0.0, None
    for t, ev, mb, layer, rows, tok in events:
        if ev == "got":
            recv.append(rows / 1e6)
            nbytes.append(tok)
            busy += rows / 1e6
        elif ev == "recv":
            got = t
        elif ev == "served" and got is not None:
            serve.append(t - got)
            busy += t - got
    mb = (f", {st.mean(nbytes) / 1e6:.2f} MB each" if nbytes else "") + gc_pauses(events)
    spread = (f" (sd {1e3 * st.pstdev(serve):.2f}, p10-p90 {1e3 * pct(serve, 10):.2f}-"
              f"{1e3 * pct(serve, 90):.2f})" if serve else "")
    print(f"  tier 2 rank {rank}: receive {ms(recv)}{mb}; serve {ms(serve)}{spread}; busy "
          f"{busy / max(span, 1e-9):.0%}")


def pct(xs: list[float], p: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(len(xs) * p / 100))]


def steps(t1: list, t2: dict[int, list], lo: float, hi: float) -> None:
    """Tier 1's layer round trips matched with each tier-2 rank's serving of them (the k-th
    visit of a (micro-batch, layer) on each side): when the last rank finished after the
    shipping, how long its reply then took to be in, how far the last rank trailed the median
    one, how long after the shipping the last rank began its message (about a message's serve
    time when it was a message behind, a convoy), which rank was last how often, and each
    rank's idle gaps (finished one message, the next not yet arrived), for the round trips
    shipped in [lo, hi)."""
    trips, shipped, seen = [], {}, {}
    for t, ev, mb, layer, rows, tok in t1:
        if ev == "shipped":  # every message is served (and counted there), replied or not
            k = seen[mb, layer] = seen.get((mb, layer), 0) + 1
            shipped[mb, layer] = (t, k)
        elif ev == "replied" and (mb, layer) in shipped:
            ts, k = shipped.pop((mb, layer))
            trips.append((mb, layer, k, ts, t))
    served: dict[int, dict] = {}
    began: dict[int, dict] = {}  # when the rank began serving it (`recv`)
    idle: dict[int, float] = {}
    for r, events in t2.items():
        n, m, done = {}, {}, None
        served[r], began[r] = {}, {}
        idle[r] = 0.0
        for t, ev, mb, layer, rows, tok in events:
            if ev == "got":
                start = t - rows / 1e6
                if done is not None and start > done and lo <= done < hi:
                    idle[r] += start - done
            elif ev == "recv":
                k = m[mb, layer] = m.get((mb, layer), 0) + 1
                began[r][mb, layer, k] = t
            elif ev == "served":
                k = n[mb, layer] = n.get((mb, layer), 0) + 1
                served[r][mb, layer, k] = t
                done = t
    last, reply, trail, late, who = [], [], [], [], {}
    trips = [x for x in trips if lo <= x[3] < hi]
    for mb, layer, k, ts, tr in trips:
        ends = {r: s[(mb, layer, k)] for r, s in served.items() if (mb, layer, k) in s}
        if not ends:
            continue
        slowest = max(ends, key=ends.get)
        last.append(ends[slowest] - ts)
        reply.append(tr - ends[slowest])
        trail.append(ends[slowest] - st.median(ends.values()))
        if (mb, layer, k) in began[slowest]:  # > a message: it was still serving the one before
            late.append(began[slowest][mb, layer, k] - ts)
        who[slowest] = who.get(slowest, 0) + 1
    if not last:
        return
    span = hi - lo
    print(f"  ring: shipped->last rank served {ms(last)}; last served->replied {ms(reply)}; "
          f"last rank behind the median one {ms(trail)}; the last rank began it after the "
          f"shipping {ms(late)}")
    print("  ring: last rank (times): " + ", ".join(f"{r}: {who[r]}" for r in sorted(who))
          + "; idle between messages: "
          + ", ".join(f"{r}: {idle[r] / max(span, 1e-9):.0%}" for r in sorted(idle)))


def main() -> None:
    folder = Path(sys.argv[1])
    n_t1 = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    ranks = phases.load(folder)
    cuts = phases.phases(ranks)
    t0, end = cuts[0][1], cuts[-1][2]
    for name, lo, hi in cuts:
        n = phases.sampled(ranks, lo, hi)
        print(f"{name} phase: {hi - lo:.1f} s (of {end - t0:.1f} s traced); {n} tokens "
              f"sampled, {n / max(hi - lo, 1e-9):.0f} tokens/s")
        tier1([e for e in ranks[0] if lo <= e[0] < hi])
        passes([e for e in ranks[0] if lo <= e[0] < hi])
        for r in sorted(k for k in ranks if k >= n_t1):
            tier2(r, [e for e in ranks[r] if lo <= e[0] < hi], hi - lo)
        if n_t1 == 1:
            steps(ranks[0], {r: ranks[r] for r in ranks if r >= n_t1}, lo, hi)


if __name__ == "__main__":
    main()
