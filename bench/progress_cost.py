"""What the MPI progress thread costs a tier-2 rank's attention kernel, in one process.

Usage: python bench/progress_cost.py [--threads 2] [--rows 18] [--context 576] [--calls 100]
                                     [--rounds 3]

Pins itself to `threads` CPUs (as the job's placement pins a tier-2 rank) and times the native
kernel (a decode message's worth: `rows` rows of `context` positions, Llama-3-8B heads, bf16,
four slot sets in turn so the KV comes from memory as in the job) with no progress thread, with
one probing all the time every 25 and 100 us, and with an on-demand one (`ProgressThread(...,
on_demand=True)`) told of a decode message's traffic before each call (a message in, a reply
out), as tier 2 tells it. Rounds interleave the variants. Prints ms a call and the ratio to no
thread, per variant (median over rounds).
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
    message = B * (H + 2 * KV) * D * 2  # bytes in (q, k, v) and out (the outputs)
    reply = B * H * D * 2

    def calls(progress: tp.ProgressThread | None) -> float:
        kernels.decode_attention_cpu(q, kc, vc, sets[0], lengths)
        t = time.perf_counter()
        for i in range(a.calls):
            if progress is not None and progress.on_demand:
                tp.traffic(message)
                tp.traffic(reply)
            kernels.decode_attention_cpu(q, kc, vc, sets[i % 4], lengths)
        return (time.perf_counter() - t) / a.calls

    variants = {"none": None, "always-25us": (25e-6, False), "always-100us": (100e-6, False),
                "on-demand-25us": (25e-6, True)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(a.rounds):
        for name, spec in variants.items():
            if spec is None:
                times[name].append(calls(None))
                continue
            with tp.ProgressThread(*spec) as p:
                times[name].append(calls(p))
    base = statistics.median(times["none"])
    print(f"progress_cost: {kernels.describe()}; {a.threads} threads on CPUs {cpus}, {B} rows x "
          f"{a.context} positions, median of {a.rounds} rounds:")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"  {name:15s} {1e3 * m:.3f} ms a call, {m / base:.2f}x no thread; rounds "
              + " ".join(f"{1e3 * t:.3f}" for t in ts))


if __name__ == "__main__":
    main()
