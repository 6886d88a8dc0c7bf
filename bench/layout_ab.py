"""Tier 2's kernel on the head-major and the position-major KV layout, in interleaved rounds (a
shared machine's bandwidth drifts between runs; interleaving puts both layouts under the same
drift), with the DRAM read bandwidth after every round.

Usage (repo root): python bench/layout_ab.py BATCH CONTEXT N_KV_HEADS   (32 query heads, D 128, bf16)
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from ghmpi import kernels
from ghmpi.bench.attention import LAYOUTS, KVBuffers, dram_read_GBps


def main() -> None:
    B, T, KV = (int(x) for x in sys.argv[1:4])
    H, D = 32, 128
    kernels.force("native")
    bufs = {layout: KVBuffers(2_000_000_000, "bfloat16", layout) for layout in LAYOUTS}
    q = torch.randn(B, H, D).bfloat16()
    lengths = torch.full((B,), T)
    out = torch.empty(B, H * D)
    kv_bytes = B * T * KV * D * 2 * 2
    gbps: dict[str, list[float]] = {layout: [] for layout in bufs}
    dram = []
    for _ in range(6):
        for layout, buf in bufs.items():
            kc, vc = buf.view(T, KV, D)
            best = float("inf")
            for r in range(min(kc.shape[0] // B, 8)):  # a new region each time: from DRAM
                t = time.perf_counter()
                kernels.decode_attention_cpu(q, kc, vc, torch.arange(r * B, (r + 1) * B), lengths, out=out)
                best = min(best, time.perf_counter() - t)
            gbps[layout].append(kv_bytes / best / 1e9)
        dram.append(dram_read_GBps(1 << 30, reps=1))
    print(f"batch {B} x {T}, {H}/{KV} heads, {torch.get_num_threads()} threads; {kernels.describe()}")
    for layout, xs in gbps.items():
        print(f"{layout}: KV read GB/s per round {[round(x, 1) for x in xs]}, median {statistics.median(xs):.1f}")
    print(f"dram_read_GBps per round {[round(x, 1) for x in dram]}, median {statistics.median(dram):.1f}")


if __name__ == "__main__":
    main()
