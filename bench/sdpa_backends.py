"""bf16 attention over shapes that never repeat (as in a job): PyTorch's default SDPA backend
choice vs ghmpi's (no cuDNN). Run on a GPU: python bench/sdpa_backends.py"""

import time

import torch
import torch.nn.functional as F

from ghmpi.model.attention import decode_attention, prefill_attention


def run(label: str, fn, n: int = 200) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / n * 1e3
    print(f"{label:48s} {ms:8.3f} ms/call")
    return ms


def main() -> None:
    dev, dt = "cuda", torch.bfloat16
    H, KV, D, B = 32, 8, 128, 32
    g = torch.Generator(device=dev).manual_seed(0)

    def prefill_default(i):
        L = 17 + i  # a new prompt length every call
        q = torch.randn(1, H, L, D, device=dev, dtype=dt, generator=g)
        k = torch.randn(1, H, L, D, device=dev, dtype=dt, generator=g)
        F.scaled_dot_product_attention(q, k, k, is_causal=True)

    def prefill_ours(i):
        L = 17 + i
        q = torch.randn(L, H, D, device=dev, dtype=dt, generator=g)
        k = torch.randn(L, KV, D, device=dev, dtype=dt, generator=g)
        prefill_attention(q, k, k)

    def decode_default(i):
        T = 300 + i  # the context grows by one every step
        q = torch.randn(B, KV, H // KV, D, device=dev, dtype=dt, generator=g)
        k = torch.randn(B, KV, T, D, device=dev, dtype=dt, generator=g)
        mask = torch.ones(B, 1, 1, T, device=dev, dtype=torch.bool)
        F.scaled_dot_product_attention(q, k, k, attn_mask=mask)

    def decode_ours(i):
        T = 300 + i
        q = torch.randn(B, H, D, device=dev, dtype=dt, generator=g)
        k = torch.randn(B, T, KV, D, device=dev, dtype=dt, generator=g)
        decode_attention(q, k, k, torch.full((B,), T, device=dev))

    for label, fn in [("prefill, new length each call, default backends", prefill_default),
                      ("prefill, new length each call, ghmpi", prefill_ours),
                      ("decode, T+1 each call, default backends", decode_default),
                      ("decode, T+1 each call, ghmpi", decode_ours)]:
        fn(0)
        run(label, fn)


if __name__ == "__main__":
    main()
