"""`bench pipeline`: the two-tier ring against its tiers' capacities, measured in the same run.

- tier-1 capacity: tokens/s tier 1 would give if attention cost nothing: one eager pass of a
  micro-batch with attention on a one-token context, the micro-batches run one after another;
- tier-2 capacity: tokens/s the tier-2 ranks' decode attention allows: the native kernel run by
  one process per tier-2 rank, each with the threads the job's placement gives that rank and the
  slots the job deals it (by threads, or as its log says it dealt them by measured rates), all at
  once, on the job's mean context (aggregate KV GB/s, paced by the
  slowest process, over the KV bytes one token-step reads);
- the job (`mpirun -n N`) at each reply delay (a network hop emulated by `runtime.reply_delay_ms`),
  as generated tokens/s, over min(tier-1, tier-2 capacity) and over the zero-delay run; traced
  (GHMPI_TRACE), so each job's phases are reported too (`phases.py`): the decode phase's rate
  over the same bound says what the ring does once every sequence decodes, since the capacities
  count decode work only and the job's figure includes its prefill and its tail;
- optionally the single tier (-n 1) and a hybrid layout (`--hybrid K`: K GPU micro-batches beside
  the tier-2-served ones), to see whether tier 2 adds throughput.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ghmpi.bench import log, phases
from ghmpi.bench.common import pick_device, random_model, timed
from ghmpi.bench.decode import DT
from ghmpi.bench.checkpoint import hf_config
from ghmpi.bench.job import job_size, make_inputs, run_ghmpi
from ghmpi.comm.topology import Layout
from ghmpi.comm.transport import SINGLE_COPY_VAR
from ghmpi.model.kvcache import KVCache
from ghmpi.runtime import placement
from ghmpi.runtime.passplan import build_plan, run_local_pass
from ghmpi.runtime.scheduler import Row


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", default=None, help="llama3-8b (default on a GPU) | tiny")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--workdir", default="/tmp/ghmpi-bench")
    p.add_argument("--np", type=int, default=None, help="MPI ranks of the two-tier job (9)")
    p.add_argument("--prompts", type=int, default=None)
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--new", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16", choices=list(DT))
    p.add_argument("--delays", default="0",
                   help="reply delays in ms (comma list), e.g. 0,2,5,10,20; none: no two-tier job")
    p.add_argument("--single", action="store_true", help="also run the single tier (-n 1)")
    p.add_argument("--hybrid", type=int, default=0, help="also run K GPU micro-batches beside tier 2")
    p.add_argument("--hybrid-share", type=float, default=0.0,
                   help="share of the prompts the hybrid's GPU micro-batches hold (0: auto, the "
                        "GPU's budget)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="extra --set KEY=VALUE for every job (repeatable)")
    p.add_argument("--hybrid-set", dest="hybrid_overrides", action="append", default=[],
                   help="extra --set KEY=VALUE for the hybrid job only, after --set (repeatable)")


def _layout(summary: list[str]) -> tuple[int, int, int]:
    """(micro-batches, slots each, tier-2 sets) of the tier-2-served micro-batches, from the
    job's line."""
    for line in summary:
        m = re.search(r"(\d+) micro-batches x (\d+) slots(?:, \d+ hybrid)?(?:, (\d+) tier-2 sets)?",
                      line)
        if m:
            return int(m.group(1)), int(m.group(2)), int(m.group(3) or 1)
    raise RuntimeError(f"no layout line in {summary}")


def _measured_slots(summary: list[str]) -> list[int] | None:
    """Each tier-2 rank's slots where the job dealt them by measured attention rates (its
    "attention measured at" line), else None (dealt by threads, as `job_tier2_split` does)."""
    for line in summary:
        m = re.search(r"attention measured at [\d. ]+ GB/s a rank; slots ([\d ]+)", line)
        if m:
            return [int(x) for x in m.group(1).split()]
    return None


def _hybrid_split(summary: list[str]) -> tuple[int, int]:
    """(tokens sampled by GPU micro-batches, by tier-2-served ones), from the hybrid's line."""
    for line in summary:
        m = re.search(r"hybrid: (\d+) tokens sampled by GPU micro-batches, (\d+) by", line)
        if m:
            return int(m.group(1)), int(m.group(2))
    return 0, 0


def tier1_capacity(shape: str, layers: int | None, dtype: torch.dtype, mb_size: int) -> float:
    """Tokens/s of eager decode passes of `mb_size` rows whose attention costs nothing."""
    device = pick_device("auto")
    model = random_model(shape, device, dtype, layers)
    a = model.args
    cache = KVCache(model.layers, mb_size, 2, a.n_kv_heads, a.head_dim, dtype, device)
    owner = np.full(mb_size, -1, dtype=np.int64)
    rows = [Row(b, b, 0, np.array([5]), False) for b in range(mb_size)]

    def step():
        plan = build_plan(rows, owner, np.arange(mb_size), device)
        return run_local_pass(model, cache, plan).argmax(-1).cpu()

    t = timed(step, device, repeat=5)
    del model, cache
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return mb_size / t


def tier2_capacity(shape: str, layers: int | None, dtype: str, threads: list[int],
                   rows: list[int], context: int) -> tuple[float, float]:
    """(tokens/s, aggregate KV GB/s) of one process per tier-2 rank, rank i with threads[i]
    threads attending rows[i] rows of `context` tokens each, all at once (the native kernel, as
    the tier-2 ranks run it); the slowest process sets the pace, as it does a micro-batch's.
    Ranks dealt no slot (a hybrid whose GPU holds nearly everything) idle in the job, and here."""
    from ghmpi.bench.attention import run_split

    threads, rows = map(list, zip(*[(t, r) for t, r in zip(threads, rows) if r]))

    cfg = hf_config(shape, layers)
    D = cfg["hidden_size"] // cfg["num_attention_heads"]
    heads = "gqa" if cfg["num_key_value_heads"] < cfg["num_attention_heads"] else "mha"
    itemsize = 2 if dtype != "float32" else 4
    per_call = 2 * max(rows) * context * cfg["num_key_value_heads"] * D * itemsize
    spec = dict(nbytes=max(4 * per_call, 2**26), dtype=dtype, heads=heads, head_dim=D,
                context=context, reps=20, layout="head")  # tier 2's KVCache layout
    cores = sorted(os.sched_getaffinity(0))
    gbps = run_split(threads, "native", spec, cores, rows)
    token_bytes = context * cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * D * itemsize
    return gbps * 1e9 / token_bytes, gbps


def job_tier2_split(ranks: int, gpu: bool, cores: int, mbs: int, size: int,
                    n_layers: int, sets: int = 1) -> tuple[list[int], list[int]]:
    """(threads, slots) of each tier-2 rank of a one-slice job on this node, as the job lays
    them out: the placement's shares of the cores, the slots dealt by those weights (over
    `sets` sets of ranks)."""
    kinds = [placement.GPU if gpu else placement.CPU1] + [placement.TIER2] * (ranks - 1)
    threads = placement.shares(kinds, cores)[1:]
    layout = Layout(ranks, 1, n_layers, mbs, size, 0,
                    tier2_weights=tuple(threads) if len(set(threads)) > 1 else (),
                    tier2_sets=sets)
    return threads, [len(layout.owned_slots(r)) for r in range(1, ranks)]


def run(args: argparse.Namespace) -> dict:
    gpu = torch.cuda.is_available()
    shape, N, L, new = job_size(args)
    ranks = args.np or (9 if gpu else 3)
    work = Path(args.workdir)
    model_dir, prompts, _ = make_inputs(work, shape, args.layers, N, L)
    result: dict = {"suite": "pipeline", "shape": shape, "ranks": ranks, "prompts": N,
                    "prompt_len": L, "new": new,
                    "device": torch.cuda.get_device_name() if gpu else "cpu",
                    # the jobs' intra-node transport for big messages (their environment's)
                    "single_copy": os.environ.get(SINGLE_COPY_VAR, "").strip() or "default"}
    log(f"{SINGLE_COPY_VAR}: {result['single_copy']}")
    jobs = []
    for d in [] if args.delays == "none" else [float(x) for x in args.delays.split(",")]:
        out = work / f"pipe-{shape}-n{ranks}-d{d:g}.h5"
        trace = work / f"trace-{shape}-n{ranks}-d{d:g}"
        shutil.rmtree(trace, ignore_errors=True)
        job = run_ghmpi(model_dir, prompts, out, ranks, new, args.dtype,
                        [*args.overrides, f"runtime.reply_delay_ms={d}"],
                        env={"GHMPI_TRACE": str(trace)})
        job["delay_ms"] = d
        job["phases"] = phases.rates(trace)
        jobs.append(job)
        log(f"delay {d:g} ms: {job['generate_tokens_per_s']:.0f} tokens/s (decode phase "
            f"{job['phases']['decode']['tokens_per_s']:.0f}); "
            + " | ".join(l for l in job["summary"] if "busy" in l or "micro-batches x" in l))
    if args.single:
        single = run_ghmpi(model_dir, prompts, work / f"pipe-{shape}-n1.h5", 1, new, args.dtype,
                           args.overrides)
        result["single_tier_tps"] = single["generate_tokens_per_s"]
        result["single_summary"] = single["summary"]
        log(f"single tier: {single['generate_tokens_per_s']:.0f} tokens/s; "
            + " | ".join(l for l in single["summary"] if "micro-batches x" in l))
    hyb = None
    if args.hybrid:
        extra = [f"topology.gpu_micro_batches={args.hybrid}"]
        if args.hybrid_share:
            extra.append(f"topology.gpu_micro_batch_size="
                         f"{max(1, int(args.hybrid_share * N) // args.hybrid)}")
        hyb = run_ghmpi(model_dir, prompts, work / f"pipe-{shape}-hybrid.h5", ranks, new,
                        args.dtype, [*args.overrides, *extra, *args.hybrid_overrides])
        result["hybrid_tps"] = hyb["generate_tokens_per_s"]
        log(f"hybrid: {hyb['generate_tokens_per_s']:.0f} tokens/s; " + " | ".join(hyb["summary"]))
        result["hybrid_summary"] = hyb["summary"]
        result["hybrid_gpu_tokens"], result["hybrid_tier2_tokens"] = _hybrid_split(hyb["summary"])
    if not jobs and hyb is None:
        return result
    # the capacities of the tier-2-served micro-batches: the ring's, else the hybrid's
    mbs, size, sets = _layout((jobs[0] if jobs else hyb)["summary"])
    context = L + new // 2
    threads, slots = job_tier2_split(ranks, gpu, len(os.sched_getaffinity(0)), mbs, size,
                                     hf_config(shape, args.layers)["num_hidden_layers"], sets)
    slots = _measured_slots((jobs[0] if jobs else hyb)["summary"]) or slots
    cap2, gbps = tier2_capacity(shape, args.layers, args.dtype, threads, slots, context)
    cap1 = tier1_capacity(shape, args.layers, DT[args.dtype], size)
    bound = min(cap1, cap2)
    result.update(micro_batches=mbs, micro_batch_size=size, tier2_sets=sets, tier2_threads=threads,
                  tier2_slots=slots,
                  mean_context=context, tier1_capacity_tps=cap1, tier2_capacity_tps=cap2,
                  tier2_kv_GBps=gbps, bound_tps=bound)
    if jobs:
        base = jobs[0]["generate_tokens_per_s"]
        result["jobs"] = [dict(delay_ms=j["delay_ms"], tokens_per_s=j["generate_tokens_per_s"],
                               of_bound=j["generate_tokens_per_s"] / bound,
                               decode_phase_tps=j["phases"]["decode"]["tokens_per_s"],
                               decode_of_bound=j["phases"]["decode"]["tokens_per_s"] / bound,
                               **{f"{name}_s": ph["seconds"] for name, ph in j["phases"].items()},
                               of_zero_delay=j["generate_tokens_per_s"] / base,
                               tier1_busy=j.get("tier1_busy_fraction", 0.0),
                               tier2_busy=j.get("tier2_busy_fraction", 0.0)) for j in jobs]
        result["job_summaries"] = [j["summary"] for j in jobs]
    if hyb is not None and args.single:
        result["hybrid_target_tps"] = result["single_tier_tps"] + 0.9 * cap2
        result["hybrid_over_single"] = result["hybrid_tps"] / result["single_tier_tps"]
    return result
