"""What the MPI progress thread costs a tier-2 rank's attention kernel, in one process.

Usage: python bench/progress_cost.py [--threads 2] [--rows 18] [--context 576] [--calls 100]
                                     [--rounds 3]

Pins itself to `threads` CPUs (as the job's placement pins a tier-2 rank) and times the native
kernel (a decode message's worth: `rows` rows of `context` positions, Llama-3-8B heads, bf16,
four slot sets in turn so the KV comes from memory as in the job) with no progress thread, with
the native one probing every 25 and 100 us, and with the Python one (what runs where the native
one does not build) every 25 us. Rounds interleave the variants. Prints ms a call and the ratio
to no thread, per variant (median over rounds).

Session 13 measured it on the H200 host's Xeon: 1.10x at 25 us and 1.06x at 100 us on 2 threads
pinned to 2 CPUs, level on 16 (bench/results/h200-2026-12-07-session13/a/). A thread that probed
only while this rank's own sends and receives could be moving cost 1.06x there, and the job ran
slower with it (715 and 744 tokens/s against 767 and 758), so the thread probes all the time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from ghmpi import kernels
from ghmpi.comm import transport as tp


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=18)
    ap.add_argument("--context", type=int, default=576)
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))[:a.threads]
    os.sched_setaffinity(0, cpus)
    torch.set_num_threads(a.threads)
    H, KV, D, B = 32, 8, 128, a.rows
    kc = torch.randn(4 * B, a.context + 8, KV, D).bfloat16()
    vc = torch.randn_like(kc)
    q = torch.randn(B, H, D).bfloat16()
    lengths = torch.full((B,), a.context)
    sets = [torch.arange(B) + B * i for i in range(4)]

    def calls() -> float:
        kernels.decode_attention_cpu(q, kc, vc, sets[0], lengths)
        t = time.perf_counter()
        for i in range(a.calls):
            kernels.decode_attention_cpu(q, kc, vc, sets[i % 4], lengths)
        return (time.perf_counter() - t) / a.calls

    variants = {"none": (0.0, True), "native-25us": (25e-6, True),
                "native-100us": (100e-6, True), "python-25us": (25e-6, False)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(a.rounds):
        for name, (interval, native) in variants.items():
            with tp.ProgressThread(interval, native):
                times[name].append(calls())
    base = statistics.median(times["none"])
    print(f"progress_cost: {kernels.describe()}; {a.threads} threads on CPUs {cpus}, {B} rows x "
          f"{a.context} positions, median of {a.rounds} rounds:")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"  {name:15s} {1e3 * m:.3f} ms a call, {m / base:.2f}x no thread; rounds "
              + " ".join(f"{1e3 * t:.3f}" for t in ts))


if __name__ == "__main__":
    main()
