"""`bench attention`: tier 2's decode attention, KV bytes read per second over the DRAM read bandwidth.

Decode attention reads every cached K and V byte of every row once per step and does little math
with it, so its limit is the memory's read bandwidth. The suite measures that bandwidth in the same
run (`dram_read_GBps`: all threads reading a buffer far larger than the last-level cache, best of a
few rounds of a few readers, before the cases and again after them, since a shared machine's
bandwidth varies) and, per case, KV bytes the case must read (each row's own length, no padding)
per second, for the native kernel and the torch fallback side by side (`native_kv_read_GBps`,
`torch_kv_read_GBps`), each over dram_read_GBps (`*_ratio`); `kv_read_GBps` and `ratio` repeat
the path tier 2 runs here. Every repetition reads a different region of a buffer several times
the LLC, so a small case is timed from DRAM, not from cache. The ranks x threads split runs P
processes of T threads at once, each with its own cache (as P tier-2 ranks would), and reports
the aggregate.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import os
import statistics
import time
from typing import Any, Callable

from ghmpi.bench import log

# torch and the kernels are imported where used: `python -m ghmpi --help` imports this module to
# list its options and must stay light.
HEADS = {"gqa": (32, 8), "mha": (32, 32)}  # (n_heads, n_kv_heads), D = --head-dim
LAYOUTS = ("head", "position")  # KV cache layouts: tier 2's (head-major), and position-major


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tiny", action="store_true",
                   help="a few small cases, 64 MiB buffers: seconds on 2 cores (CI)")
    p.add_argument("--contexts", default="512,2048,8192", help="context lengths (comma list)")
    p.add_argument("--batches", default="1,16,64,256", help="rows per call (comma list)")
    p.add_argument("--dtypes", default="bfloat16,float16",
                   help="KV dtypes; the first runs every case, the others GQA at 2048 only")
    p.add_argument("--heads", default="gqa,mha", help="gqa (32/8 heads) and/or mha (32/32)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all the process may use)")
    p.add_argument("--splits", default="auto",
                   help="ranks x threads, e.g. 1x16,2x8,4x4 ('auto': powers of two over the cores; "
                        "'none' to skip)")
    p.add_argument("--max-gb", type=float, default=8.0,
                   help="memory cap for the KV buffers (GB); cases that need more are skipped")
    p.add_argument("--seconds", type=float, default=0.3, help="time per case and path (at least 3 reps)")
    p.add_argument("--no-torch", action="store_true", help="skip the torch fallback (it is slow)")
    p.add_argument("--layouts", default="head",
                   help="KV cache layouts (comma list): head (tier 2's, head-major), position "
                        "(position-major, as on the GPU); the first is the one reported as kv_read_GBps")


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def llc_bytes(base: str = "/sys/devices/system/cpu/cpu0/cache") -> int:
    """The largest CPU cache's size (sysfs's `index*/size` under `base`), or 32 MiB where it
    cannot be read."""
    best = 0
    try:
        entries = [e for e in os.listdir(base) if e.startswith("index")]  # not uevent, power
    except OSError:
        entries = []
    for entry in entries:
        try:
            with open(f"{base}/{entry}/size") as f:
                text = f.read().strip()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
            best = max(best, int(text.rstrip("KMG")) * mult)
        except (OSError, ValueError, IndexError):
            continue
    return best or 32 << 20


def dram_read_GBps(nbytes: int, reps: int = 4) -> float:
    """All threads reading a float32 buffer of nbytes (>> LLC): torch's vectorised reductions
    (sum, max, int64 sum) and, where built, the native kernel's streaming loads. The best of `reps`
    rounds of each: the memory's read bandwidth (the first pass also commits the pages)."""
    import torch

    from ghmpi import kernels
    from ghmpi.model.kvcache import host_buffer

    buf = host_buffer(nbytes // 4, torch.float32)[0].fill_(1.0)  # huge pages, as tier 2's cache
    readers = [buf.sum, buf.amax, buf.view(torch.int64).sum]
    if kernels.native_available():
        readers.append(lambda: kernels.read_sum(buf))
    best = float("inf")
    for _ in range(reps):
        for read in readers:
            t = time.perf_counter()
            read()
            best = min(best, time.perf_counter() - t)
    return buf.nbytes / best / 1e9


def _time(fn: Callable[[int], Any], n_regions: int, seconds: float) -> float:
    """Best time of fn(region) over >= 3 reps and ~`seconds`, rotating through the regions."""
    fn(0)
    times: list[float] = []
    start = time.perf_counter()
    i = 1
    while len(times) < 3 or (time.perf_counter() - start < seconds and len(times) < 200):
        t = time.perf_counter()
        fn(i % n_regions)
        times.append(time.perf_counter() - t)
        i += 1
    return min(times)


class KVBuffers:
    """Flat K and V buffers, viewed as (n_slots, T, n_kv, D) caches for each case: in tier 2's
    head-major layout (`layout="head"`, KVCache's) or position-major (`"position"`, contiguous)."""

    def __init__(self, nbytes: int, dtype: str, layout: str = "head") -> None:
        import torch

        if layout not in LAYOUTS:
            raise ValueError(f"bench attention: layout must be one of {LAYOUTS}, got {layout!r}")
        from ghmpi.model.kvcache import host_buffer

        dtype = getattr(torch, dtype)
        n = nbytes // 2 // torch.empty((), dtype=dtype).element_size()
        # allocated as tier 2's KVCache allocates (2 MiB aligned, huge pages where Linux allows)
        self.k = host_buffer(n, dtype)[0].uniform_(-1, 1)
        self.v = host_buffer(n, dtype)[0].uniform_(-1, 1)
        self.layout = layout

    def view(self, T: int, n_kv: int, D: int) -> tuple[torch.Tensor, torch.Tensor]:
        from ghmpi.model.kvcache import head_major

        n_slots = self.k.numel() // (T * n_kv * D)
        if self.layout == "head":
            return (head_major(self.k, n_slots, T, n_kv, D), head_major(self.v, n_slots, T, n_kv, D))
        used = n_slots * T * n_kv * D
        return self.k[:used].view(n_slots, T, n_kv, D), self.v[:used].view(n_slots, T, n_kv, D)


def run_case(buf: KVBuffers, n_heads: int, n_kv: int, D: int, lengths: list[int],
             paths: list[str], seconds: float, llc: int) -> dict[str, float] | None:
    """GB/s of KV read per path for one call over rows of these lengths; None if it does not fit."""
    import torch

    from ghmpi import kernels
    from ghmpi.model.attention import decode_attention

    B, T = len(lengths), max(lengths)
    kc, vc = buf.view(T, n_kv, D)
    n_regions = kc.shape[0] // B
    if n_regions < 1:
        return None
    es = kc.element_size()
    kv_bytes = sum(lengths) * n_kv * D * es * 2
    g = torch.Generator().manual_seed(B * T)
    q = torch.randn(B, n_heads, D, generator=g).to(kc.dtype)
    L = torch.tensor(lengths, dtype=torch.int64)
    out = {"kv_MB": kv_bytes / 1e6, "regions": n_regions, "cold": n_regions * B * T * n_kv * D * es * 2 > 2 * llc}
    for path in paths:
        if path == "native":
            o32 = torch.empty(B, n_heads * D)

            def fn(r: int) -> None:
                kernels.decode_attention_cpu(q, kc, vc, torch.arange(r * B, (r + 1) * B), L, out=o32)
        else:  # the torch fallback as KVCache runs it on a run of consecutive slots
            def fn(r: int) -> None:
                decode_attention(q, kc[r * B:(r + 1) * B], vc[r * B:(r + 1) * B], L)
        out[path] = kv_bytes / _time(fn, n_regions, seconds) / 1e9
    return out


def _mixed(batch: int, contexts: list[int]) -> list[int]:
    """Lengths spread evenly between the shortest and the longest context."""
    lo, hi = min(contexts), max(contexts)
    return [lo + (hi - lo) * i // max(batch - 1, 1) for i in range(batch)]


def _split_worker(rank: int, threads: int, cpus: list[int] | None, path: str, spec: dict,
                  barrier: Any, queue: Any) -> None:
    try:
        import torch

        from ghmpi import kernels
        from ghmpi.model.attention import decode_attention

        if cpus:
            os.sched_setaffinity(0, cpus)
        torch.set_num_threads(threads)
        if path == "torch":
            kernels.force("torch")
        buf = KVBuffers(spec["nbytes"], spec["dtype"], spec["layout"])
        n_heads, n_kv = HEADS[spec["heads"]]
        D, B, T = spec["head_dim"], spec["batch"], spec["context"]
        kc, vc = buf.view(T, n_kv, D)
        n_regions = kc.shape[0] // B
        q = torch.randn(B, n_heads, D).to(kc.dtype)
        L = torch.full((B,), T, dtype=torch.int64)
        o32 = torch.empty(B, n_heads * D)

        def step(r: int) -> None:
            s = torch.arange(r * B, (r + 1) * B)
            if path == "native":
                kernels.decode_attention_cpu(q, kc, vc, s, L, out=o32)
            else:
                decode_attention(q, kc[r * B:(r + 1) * B], vc[r * B:(r + 1) * B], L)
        step(0)
        barrier.wait()
        t0 = time.perf_counter()
        for i in range(spec["reps"]):
            step((i + 1) % n_regions)
        queue.put((rank, time.perf_counter() - t0, spec["reps"] * B * T * n_kv * D * kc.element_size() * 2))
    except Exception as e:  # report, so the parent never waits forever
        queue.put((rank, -1.0, f"{type(e).__name__}: {e}"))
        barrier.abort()


def run_split(threads: list[int], path: str, spec: dict, cores: list[int],
              batches: list[int] | None = None) -> float:
    """Aggregate KV GB/s of len(threads) processes, process p with threads[p] threads (and
    batches[p] rows a call, else spec's), each on its own cache, started together: all bytes over
    the slowest process's time, as a step that waits for every process sees them."""
    ctx = mp.get_context("spawn")  # never fork a process whose OpenMP pool is running
    P = len(threads)
    barrier, queue = ctx.Barrier(P), ctx.Queue()
    pin = len(cores) >= sum(threads)
    starts = [0, *itertools.accumulate(threads)]
    procs = [ctx.Process(target=_split_worker, daemon=True,
                         args=(p, t, cores[starts[p]:starts[p + 1]] if pin else None, path,
                               {**spec, "batch": batches[p]} if batches else spec, barrier, queue))
             for p, t in enumerate(threads)]
    for pr in procs:
        pr.start()
    results = [queue.get(timeout=600) for _ in procs]
    for pr in procs:
        pr.join(timeout=60)
    errors = [r[2] for r in results if r[1] < 0]
    if errors:
        raise RuntimeError(f"bench attention split {P} processes x {threads} threads: {errors[0]}")
    return sum(r[2] for r in results) / max(r[1] for r in results) / 1e9


def _splits(text: str, n_cores: int) -> list[tuple[int, int]]:
    if text == "none":
        return []
    if text == "auto":
        out, p = [], 1
        while p <= n_cores:
            if n_cores % p == 0:
                out.append((p, n_cores // p))
            p *= 2
        return out
    return [tuple(int(x) for x in s.lower().split("x")) for s in text.split(",") if s.strip()]


def run(args: argparse.Namespace) -> dict:
    import torch

    from ghmpi import kernels

    cores = sorted(os.sched_getaffinity(0))
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if args.tiny:
        args.contexts, args.batches, args.dtypes = "64,256", "1,4", "bfloat16,float16"
        args.max_gb, args.seconds = min(args.max_gb, 0.128), min(args.seconds, 0.05)
    contexts, batches = _ints(args.contexts), _ints(args.batches)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    D = args.head_dim
    llc = llc_bytes()
    kv_bytes = int(args.max_gb * 1e9)
    paths = ["native", "torch"] if kernels.native_available() else ["torch"]
    if args.no_torch and len(paths) > 1:
        paths = ["native"]

    dram_bytes = min(max(8 * llc, 1 << 30), kv_bytes) if not args.tiny else max(8 * llc, 64 << 20)
    log(f"DRAM read: {dram_bytes / 1e9:.2f} GB buffer (LLC {llc / 1e6:.0f} MB), {threads} threads")
    dram_before = dram_read_GBps(dram_bytes)
    log(f"dram_read_GBps {dram_before:.1f}; {kernels.describe()}")

    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    rows = []
    for layout, dt in itertools.product(layouts, dtypes):
        buf = KVBuffers(kv_bytes, dt, layout)
        for h in heads:
            n_heads, n_kv = HEADS[h]
            cases = [(B, [T] * B, str(T)) for T in contexts for B in batches]
            cases += [(B, _mixed(B, contexts), f"mixed {min(contexts)}-{max(contexts)}")
                      for B in batches if B > 1 and min(contexts) < max(contexts)]
            if dt != dtypes[0]:  # other dtypes: GQA, one context, to show the dtype costs nothing
                if h != heads[0]:
                    continue
                mid = contexts[len(contexts) // 2]
                cases = [(B, [mid] * B, str(mid)) for B in batches]
            for B, lengths, label in cases:
                r = run_case(buf, n_heads, n_kv, D, lengths, paths, args.seconds, llc)
                if r is None:
                    log(f"skip {h} {dt} batch {B} context {label}: over --max-gb {args.max_gb}")
                    continue
                row = {"layout": layout, "heads": f"{n_heads}/{n_kv}", "dtype": dt, "batch": B,
                       "context": label, "kv_MB": round(r["kv_MB"], 1)}
                for path in paths:
                    row[f"{path}_kv_read_GBps"] = r[path]
                row["from_dram"] = bool(r["cold"])
                rows.append(row)
                log(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        del buf

    splits = []
    n_cores = len(cores)
    split_ctx = min(2048, max(contexts))
    split_batch = 64 if not args.tiny else 4
    for P, T in _splits(args.splits, n_cores):
        if P > split_batch:
            continue
        spec = {"nbytes": min(kv_bytes, 4 << 30) // P, "dtype": dtypes[0], "heads": heads[0], "head_dim": D,
                "batch": split_batch // P, "context": split_ctx, "reps": 10 if not args.tiny else 3,
                "layout": layouts[0]}
        row = {"layout": layouts[0], "ranks": P, "threads": T, "dtype": spec["dtype"], "heads": spec["heads"],
               "batch_per_rank": spec["batch"], "context": split_ctx}
        for path in paths:
            gbps = run_split([T] * P, path, spec, cores)
            row[f"{path}_kv_read_GBps"] = gbps
        splits.append(row)
        log(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

    dram_after = dram_read_GBps(dram_bytes)
    dram = max(dram_before, dram_after)
    log(f"dram_read_GBps {dram_after:.1f} after the cases; ratios use the best, {dram:.1f}")
    for row in rows + splits:
        for path in paths:
            row[f"{path}_ratio"] = row[f"{path}_kv_read_GBps"] / dram
        # the path a tier-2 rank runs here (native where it builds), under the contract's names
        row["kv_read_GBps"] = row[f"{paths[0]}_kv_read_GBps"]
        row["ratio"] = row[f"{paths[0]}_ratio"]
    result: dict[str, Any] = {
        "suite": "attention",
        "dram_read_GBps": dram,
        "dram_read_GBps_before": dram_before,
        "dram_read_GBps_after": dram_after,
        "kernel": kernels.describe(),
        "threads": threads,
        "cores": n_cores,
        "llc_MB": llc / 1e6,
        "head_dim": D,
    }
    for layout in layouts:  # the summary is the first layout's (tier 2's by default)
        mine = [r for r in rows if r["layout"] == layout]
        for path in paths:
            ratios = ([r[f"{path}_ratio"] for r in mine if r["from_dram"]]
                      or [r[f"{path}_ratio"] for r in mine])
            if ratios:
                tail = "" if layout == layouts[0] else f"_{layout}"
                result[f"{path}_ratio_median{tail}"] = statistics.median(ratios)
                result[f"{path}_ratio_min{tail}"] = min(ratios)
    rows_first = [r for r in rows if r["layout"] == layouts[0]]
    result["kv_read_GBps"] = (statistics.median(r[f"{paths[0]}_kv_read_GBps"] for r in rows_first)
                              if rows_first else 0.0)
    result["layout"] = layouts[0]
    result["rows"] = rows
    result["splits"] = splits
    return result
