"""Tile/pipeline sweep of the Triton decode-attention kernel (ghmpi/kernels/triton_decode.py) on
the GPU: KV bytes read per second for each launch shape at the batch/context mixes a decode step
sees, against the device's copy bandwidth measured in the same run. The defaults in
`triton_decode.LAUNCH` / `launch_for` come from this sweep's output (bench/results/).

Usage (repo root, CUDA torch): python bench/triton_decode_sweep.py [-o out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch

from ghmpi.bench.common import copy_GBps, timed
from ghmpi.kernels import triton_decode as td

CASES = [(810, 512), (512, 640), (256, 512), (256, 2048), (64, 4096), (16, 2048), (1, 8192)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-o", "--output")
    ap.add_argument("--heads", default="32/8")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    dev = torch.device("cuda")
    H, KV = (int(x) for x in args.heads.split("/"))
    D = 128
    bw = copy_GBps(dev, 2**31)
    print(f"copy bandwidth {bw:.0f} GB/s; heads {H}/{KV}", flush=True)
    results = []
    configs = [td.Launch(bn, w, st, sp) for bn, w, st, sp in
               itertools.product((16, 32, 64, 128), (1, 2, 4, 8), (1, 2, 3, 4), (4,))]
    for B, T in CASES:
        kc = torch.randn(B + 1, T + 1, KV, D, device=dev, dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        q = torch.randn(B, H, D, device=dev, dtype=torch.bfloat16)
        slots = torch.randperm(B, device=dev)
        lengths = torch.full((B,), T, device=dev, dtype=torch.long)
        nbytes = 2 * B * T * KV * D * 2
        ref = td.decode_attention_cuda(q, kc, vc, slots, lengths, T + 1).float()
        best = None
        for c in configs:
            try:
                got = td.decode_attention_cuda(q, kc, vc, slots, lengths, T + 1, c).float()
                err = float((got - ref).norm() / ref.norm())
                t = timed(lambda: td.decode_attention_cuda(q, kc, vc, slots, lengths, T + 1, c),
                          dev, args.repeat)
            except Exception as e:  # a shape Triton cannot compile (registers, shared memory)
                print(f"B={B} T={T} {c}: {type(e).__name__}", flush=True)
                continue
            row = dict(batch=B, context=T, block_n=c.block_n, num_warps=c.num_warps,
                       num_stages=c.num_stages, split_target=c.split_target, us=t * 1e6,
                       GBps=nbytes / t / 1e9, of_copy=nbytes / t / 1e9 / bw, rel_err=err)
            results.append(row)
            if best is None or t < best["us"] / 1e6:
                best = row
        # with the best tile shape, the split target (only matters when rows * kv heads are few)
        bc = td.Launch(best["block_n"], best["num_warps"], best["num_stages"])
        for sp in (1, 2, 8, 16):
            c = td.Launch(bc.block_n, bc.num_warps, bc.num_stages, sp)
            t = timed(lambda: td.decode_attention_cuda(q, kc, vc, slots, lengths, T + 1, c), dev,
                      args.repeat)
            row = dict(batch=B, context=T, block_n=c.block_n, num_warps=c.num_warps,
                       num_stages=c.num_stages, split_target=sp, us=t * 1e6,
                       GBps=nbytes / t / 1e9, of_copy=nbytes / t / 1e9 / bw, rel_err=None)
            results.append(row)
            if t < best["us"] / 1e6:
                best = row
        cur = next(r for r in results if r["batch"] == B and r["context"] == T
                   and (r["block_n"], r["num_warps"], r["num_stages"], r["split_target"])
                   == (td.LAUNCH.block_n, td.LAUNCH.num_warps, td.LAUNCH.num_stages,
                       td.LAUNCH.split_target))
        print(f"B={B} T={T}: current {cur['GBps']:.0f} GB/s ({cur['of_copy']:.2f} of copy); best "
              f"{best['GBps']:.0f} GB/s ({best['of_copy']:.2f}) with block_n={best['block_n']} "
              f"warps={best['num_warps']} stages={best['num_stages']} "
              f"split_target={best['split_target']}", flush=True)
        top = sorted((r for r in results if r["batch"] == B and r["context"] == T),
                     key=lambda r: r["us"])[:5]
        for r in top:
            print(f"   {r['block_n']:4d} {r['num_warps']} {r['num_stages']} {r['split_target']:2d}"
                  f"  {r['GBps']:.0f} GB/s", flush=True)
        del kc, vc
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"copy_GBps": bw, "heads": args.heads, "rows": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
