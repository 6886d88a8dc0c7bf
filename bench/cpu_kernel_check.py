"""The native CPU attention kernel against the torch path on this machine's CPU, for every code
path the build has (float32, bf16 with vector or tile q.k): max relative error per case, and which
ISA the kernel was built for. For a node whose CPU differs from the CI machine's (AVX-512, AMX).

Usage (repo root): python bench/cpu_kernel_check.py   (exit 1 if a case is off)
"""

from __future__ import annotations

import sys

import torch

from ghmpi import kernels
from ghmpi.model.kvcache import head_major


def main() -> int:
    kernels.force("native")
    print(kernels.describe(), flush=True)
    g = torch.Generator().manual_seed(0)
    bad = 0
    cases = [(32, 8, 128), (32, 32, 128), (16, 2, 64), (8, 1, 256), (28, 4, 128), (64, 8, 128)]
    for dtype, tol, layout in ((torch.float32, 1e-5, "head"), (torch.bfloat16, 2e-2, "head"),
                               (torch.bfloat16, 2e-2, "position")):
        for H, KV, D in cases:
            lengths = torch.tensor([1, 15, 16, 17, 100, 513, 2048, 4099])
            B, T = len(lengths), int(lengths.max())
            k = torch.randn(B + 2, T + 3, KV, D, generator=g).to(dtype)
            v = torch.randn(B + 2, T + 3, KV, D, generator=g).to(dtype)
            if layout == "head":  # tier 2's KVCache layout
                k, v = (head_major(torch.empty(x.numel(), dtype=dtype), *x.shape).copy_(x)
                        for x in (k, v))
            q = torch.randn(B, H, D, generator=g).to(dtype)
            slots = torch.randperm(B + 2, generator=g)[:B]
            got = kernels.decode_attention_cpu(q, k, v, slots, lengths).double()
            ref = kernels._decode_attention_torch(q, k, v, slots, lengths).double()
            err = float((got - ref).abs().max() / ref.abs().max())
            ok = err <= tol
            bad += not ok
            print(f"{str(dtype):15s} {layout:8s} heads {H}/{KV} D {D}: max rel err {err:.2e} "
                  f"{'ok' if ok else 'OFF'}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
