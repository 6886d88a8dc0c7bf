"""What the tier-1 suites share: the device's two ceilings measured in the run, timing, and a
random-weight model of a real shape built in memory."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from ghmpi.bench.checkpoint import SHAPES, hf_config
from ghmpi.model.args import ModelArgs
from ghmpi.model.llama import LayerWeights, Transformer


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeat: int = 10, warmup: int = 2
          ) -> float:
    """Median seconds of fn() over `repeat` runs after `warmup` (device synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_GBps(device: torch.device, nbytes: int) -> float:
    """Memory bandwidth as a large copy moves it, counting bytes read plus bytes written."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), device, repeat=10)
    return 2 * src.numel() * 4 / t / 1e9


def gemm_tflops(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """Dense matrix-product rate on random data (n x n x n), the compute ceiling."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = timed(lambda: a @ b, device, repeat=10)
    return 2 * n**3 / t / 1e12


def random_model(shape: str, device: torch.device, dtype: torch.dtype,
                 n_layers: int | None = None, seed: int = 0) -> Transformer:
    """A whole model of a real shape with random weights, made on the device (no files)."""
    args = ModelArgs.from_config(hf_config(shape, n_layers))
    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=g, device=device, dtype=torch.float32) * 0.02).to(dtype)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, device=device, dtype=dtype)

    d = args.dim
    weights = {i: LayerWeights(ones(d), rand(args.q_size + 2 * args.kv_size, d), None,
                               rand(d, args.q_size), None, ones(d), rand(2 * args.hidden_dim, d),
                               rand(d, args.hidden_dim)) for i in range(args.n_layers)}
    emb = rand(args.vocab_size, d)
    return Transformer(args, range(args.n_layers), device, dtype, weights, emb, ones(d),
                       rand(args.vocab_size, d))


__all__ = ["SHAPES", "copy_GBps", "gemm_tflops", "pick_device", "random_model", "sync", "timed"]
