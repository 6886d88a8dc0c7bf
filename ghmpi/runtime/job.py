"""The batch job: check everything on rank 0, agree, then run the roles until done.

Rank 0 checks the whole job before any work (model, prompts, output, rank count, memory) and
broadcasts one verdict, so a bad input ends every rank with the same one-line error and no rank
waits forever. Then COMM_WORLD is split into tier 1 and tier 2 and each rank runs its loop. An
exception on any rank prints one line naming the rank and role and aborts the whole job.

Rank 0 also holds the output's lock (one job per output, ghmpi/io/ownership.py) from the checks
to the end, and runs the stall watchdog (ghmpi/runtime/watchdog.py): no token for
runtime.stall_timeout seconds persists the finished work, names the ranks waited on and aborts
the world with EXIT_STALLED. A storage error while persisting drains the job like a stop request
and ends every rank with EXIT_STORAGE and one line saying how many completions are safe.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
from mpi4py import MPI

import ghmpi
from ghmpi import signals
from ghmpi.comm.topology import Layout, auto_batches
from ghmpi.config import Config, config_to_yaml
from ghmpi.errors import (EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_STALLED, EXIT_STORAGE,
                          EXIT_USAGE, ConfigError, GhmpiError, StorageError)
from ghmpi.io.completions import CompletionStore
from ghmpi.io.identity import identity_digest, identity_parts, model_identity
from ghmpi.io.ownership import OutputLock
from ghmpi.io.prompts import PromptFile
from ghmpi.model.args import ModelArgs
from ghmpi.model.kvcache import KVCache
from ghmpi.model.loader import check_checkpoint
from ghmpi.runtime import placement
from ghmpi.runtime.faults import FaultInjector
from ghmpi.runtime import sizing, trace
from ghmpi.runtime.progress import Progress, peak_rss_mib
from ghmpi.runtime import admission
from ghmpi.runtime.batch import batch_features, extras_of, stop_watcher
from ghmpi.runtime.scheduler import Scheduler
from ghmpi.runtime.watchdog import Watchdog

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FAILED = {"error": EXIT_USAGE, "failed": EXIT_FAILURE, "storage": EXIT_STORAGE}  # verdict -> exit
PERSIST_ON_STALL_S = 30.0  # how long a stalled job waits for its finished work to reach the disk


@dataclass(frozen=True)
class JobPlan:
    """What rank 0 found and every rank needs (broadcast once)."""

    args: ModelArgs
    layout: Layout
    max_len: int  # KV capacity per slot: longest prompt + most new tokens, within the context
    n_prompts: int
    n_done: int  # already persisted by an earlier run of this job
    job_id: str
    on_gpu: bool
    n_rows: int = 0  # completions: prompts x their samples (generation.n or the prompt's `n`)
    logprobs: int | None = None  # top-k log-probabilities stored per token (None: none stored)
    stops: bool = False  # stop strings are watched (ghmpi/runtime/stopstrings.py)
    budgets: _Budgets | None = None  # the KV budgets the layout was sized for


def _cuda_wanted(cfg: Config) -> bool:
    return cfg.topology.device == "cuda" or (cfg.topology.device == "auto" and torch.cuda.is_available())


def plan_job(cfg: Config, world_size: int, ranks_on_node: int = 1
             ) -> tuple[JobPlan, CompletionStore, OutputLock]:
    """Check everything checkable before work starts (rank 0), and take the output's lock.
    Raises GhmpiError (bad input, or the output in use by another job) or StorageError."""
    if cfg.topology.slices > world_size:  # the cheapest check first, in the user's terms
        raise ConfigError(f"topology.slices is {cfg.topology.slices} but the MPI world has only "
                          f"{world_size} rank(s); start at least {cfg.topology.slices} ranks or "
                          f"lower topology.slices")
    args = check_checkpoint(cfg.model.path)
    for t in cfg.generation.stop_token_ids:
        if t >= args.vocab_size:
            raise ConfigError(f"generation.stop_token_ids: {t} is not below the model's vocab size "
                              f"{args.vocab_size}")
    with PromptFile(cfg.io.prompts) as pf:
        stats = pf.validate(args.vocab_size, args.max_seq_len)
    batch = batch_features(cfg, args, stats)
    if cfg.topology.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("topology.device is cuda but no CUDA device is visible on rank 0")
    identity = identity_parts(cfg, stats.sha256, model_identity(cfg.model.path))
    job_id = identity_digest(identity)
    out_dir = os.path.dirname(os.path.abspath(cfg.io.output))
    if not os.path.exists(out_dir):  # like `mkdir -p`: the default job writes into out/
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as e:
            raise GhmpiError(f"io.output {cfg.io.output}: cannot create folder {out_dir} ({e.strerror})")
    lock = OutputLock(cfg.io.output)  # one job per output, before its files are touched
    lock.acquire()
    try:
        store = CompletionStore(cfg.io.output, batch.n_rows, job_id, overwrite=cfg.io.overwrite,
                                flush_every=cfg.io.flush_every, flush_seconds=cfg.io.flush_seconds,
                                identity=identity)
        on_gpu = _cuda_wanted(cfg)
        t = cfg.topology
        most_new = max(cfg.generation.max_new_tokens, stats.max_max_new_tokens or 0)
        max_len = min(args.max_seq_len, stats.max_prompt_len + most_new)
        budgets = _budgets(cfg, args, world_size, ranks_on_node, on_gpu)
        kv_item = torch.empty((), dtype=DTYPES[cfg.kv_dtype]).element_size()
        layers_per_slice = -(-args.n_layers // t.slices)
        layers_per_t2 = layers_per_slice * max(1, -(-t.slices // max(world_size - t.slices, 1)))
        local_fit = budgets.tier1.nbytes // sizing.slot_bytes(args, layers_per_slice, max_len,
                                                              kv_item)
        remaining = batch.n_rows - store.n_done  # completions still to make (n per prompt)
        gpu_mbs = t.gpu_micro_batches if world_size > t.slices else 0
        gpu_size = t.gpu_micro_batch_size
        if gpu_mbs and not gpu_size:  # the GPU's budget, shared by its micro-batches
            gpu_size = max(1, min(local_fit // gpu_mbs, -(-max(remaining, 1) // gpu_mbs)))
        mbs, size = auto_batches(
            world_size, t.slices, remaining - gpu_mbs * gpu_size, t.micro_batches,
            t.micro_batch_size, on_gpu, t.hybrid_slots, local_fit=local_fit,
            remote_fit=budgets.tier2.nbytes // sizing.slot_bytes(args, layers_per_t2, max_len,
                                                                 kv_item),
            reply_delay_ms=cfg.runtime.reply_delay_ms, tier2_sets=t.tier2_sets)
        layout = Layout(world_size, t.slices, args.n_layers, mbs, size, t.hybrid_slots,
                        gpu_mbs, gpu_size, tier2_sets=t.tier2_sets)
        _check_memory(cfg, args, layout, max_len, budgets)
    except BaseException:
        lock.release()
        raise
    plan = JobPlan(args, layout, max_len, stats.n_prompts, store.n_done, job_id, on_gpu,
                   batch.n_rows, batch.logprobs, batch.stops, budgets)
    return plan, store, lock


@dataclass(frozen=True)
class _Budgets:
    tier1: sizing.Budget  # a tier-1 rank holding caches (its GPU, or its node's memory)
    tier2: sizing.Budget


def _budgets(cfg: Config, args: ModelArgs, world_size: int, ranks_on_node: int,
             on_gpu: bool) -> _Budgets:
    """KV budgets: the explicit kv_memory_gb, else from this (rank 0's) GPU and node; tier-2
    ranks on other nodes are taken to have nodes like this one (set kv_memory_gb if not)."""
    t = cfg.topology
    if t.kv_memory_gb:
        fixed = sizing.fixed_budget(t.kv_memory_gb)
        return _Budgets(fixed, fixed)
    cpu = sizing.cpu_budget(sizing.mem_available(), ranks_on_node)
    if not on_gpu:
        return _Budgets(cpu, cpu)
    free, total = torch.cuda.mem_get_info()
    itemsize = torch.empty((), dtype=DTYPES[cfg.model.dtype]).element_size()
    lane = t.prefill_lane_tokens if world_size > t.slices else 0  # a lane's pass, with tier 2
    tokens = max(t.prefill_tokens, lane) + (t.micro_batch_size or 1024)
    gpu = sizing.gpu_budget(args, free, total, t.gpu_memory_fraction,
                            -(-args.n_layers // t.slices), True, t.slices == 1, itemsize,
                            tokens, t.micro_batch_size or 1024)
    return _Budgets(gpu, cpu)


def _check_memory(cfg: Config, args: ModelArgs, layout: Layout, max_len: int,
                  budgets: _Budgets, tier2_scale: Callable[[int], float] = lambda r: 1.0) -> None:
    """Every holder's KV cache within its budget; a tier-2 rank's budget times tier2_scale(rank)
    (its share of its node's memory when slots are dealt by weight)."""
    kv = DTYPES[cfg.kv_dtype]
    t2 = budgets.tier2
    holders = [(r, layout.owned_slots(r), [l for j in layout.slices_served(r)
                                            for l in layout.slice_layers(j)],
                sizing.Budget(int(t2.nbytes * tier2_scale(r)), t2.source))
               for r in range(layout.slices, layout.world_size)]
    local = layout.local_slots()
    holders += [(j, local, list(layout.slice_layers(j)), budgets.tier1)
                for j in range(layout.slices) if local]
    for rank, slots, layers, budget in holders:
        need = KVCache.nbytes_for(len(layers), len(slots), max_len, args.n_kv_heads,
                                  args.head_dim, kv)
        if need > budget.nbytes:
            raise ConfigError(
                f"the KV cache of rank {rank} ({layout.role(rank)}: {len(slots)} slots x "
                f"{len(layers)} layers x {max_len} tokens) needs {need / 2**30:.2f} GiB, over "
                f"its budget of {budget.nbytes / 2**30:.2f} GiB ({budget.source}); add tier-2 "
                f"ranks, lower topology.micro_batches/micro_batch_size or raise "
                f"topology.kv_memory_gb")


def _device(cfg: Config, node: MPI.Comm, is_tier1: bool) -> torch.device:
    """Tier-1 ranks take the node's GPUs in turn; tier 2 always computes on the CPU."""
    flags = node.allgather(is_tier1)
    if not is_tier1 or not _cuda_wanted(cfg):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("topology.device is cuda but this node has no visible CUDA device")
    local = sum(flags[:node.Get_rank()])
    return torch.device("cuda", local % torch.cuda.device_count())


def run(cfg: Config | Callable[[], Config], config_path: str | os.PathLike | None = None) -> int:
    """Run the job on every rank. `cfg` may be a loader called on rank 0 only: the other ranks
    then take the config from rank 0's verdict, so a bad config is reported once and no rank can
    exit (and have the launcher kill rank 0) before rank 0 has said why."""
    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    signals.install()  # idempotent; the CLI did it before the heavy imports
    started = time.time()
    verdict: tuple[str, object] = ("ok", None)
    store = lock = None
    node = world.Split_type(MPI.COMM_TYPE_SHARED)  # collective: before rank 0 may fail alone
    if rank == 0:
        try:
            if callable(cfg):
                cfg = cfg()
            plan, store, lock = plan_job(cfg, world.Get_size(), node.Get_size())
            verdict = ("complete", (cfg, plan)) if store.complete else ("ok", (cfg, plan))
        except GhmpiError as e:
            verdict = ("error", str(e))
        except StorageError as e:
            verdict = ("storage", f"{e}; nothing was generated; make room or fix the filesystem "
                                  "(space, quota, permissions, read-only mount) and run the job again")
        except Exception as e:  # a bug, not bad input: still end every rank, with a reason
            traceback.print_exc()
            verdict = ("failed", f"{type(e).__name__}: {e}")
        if verdict[0] in _FAILED:  # speak before any rank is released to exit
            print(f"ghmpi: error: {' '.join(str(verdict[1]).split())}", file=sys.stderr, flush=True)
    kind, payload = world.bcast(verdict, root=0)
    if kind in _FAILED:
        return _FAILED[kind]
    cfg, plan = payload
    if kind == "complete":
        if rank == 0:
            lock.release()
            print(f"ghmpi: {cfg.io.output} is already complete ({plan.n_rows} completions); "
                  f"nothing to do", flush=True)
        return EXIT_OK
    layout = plan.layout
    is_tier1 = layout.is_tier1(rank)
    tier = world.Split(0 if is_tier1 else 1, rank)  # the two groups of DESIGN.md
    try:
        device = _device(cfg, node, is_tier1)
        if device.type == "cuda":  # kernels (Triton) launch on the current device
            torch.cuda.set_device(device)
        kind = (placement.TIER2 if not is_tier1 else
                placement.GPU if device.type == "cuda" else placement.CPU1)
        place = placement.plan_node(node.allgather(placement.here(kind)), os.environ,
                                    torch_threads=cfg.runtime.torch_threads)[node.Get_rank()]
        placement.apply(place)
        torch.set_num_threads(place.threads)
        plan = _weigh_tier2(cfg, plan, world, node, place.threads)
        if rank == 0:
            _announce(cfg, plan, world.Get_size(), device)
            print(f"ghmpi: {place.summary}", flush=True)
        status = _profiled(_run_role, rank)(cfg, plan, world, rank, device, store, lock, started)
        trace.dump(rank)
    except Exception as e:
        role = layout.role(rank)
        print(f"ghmpi: error: rank {rank} ({role}) failed: {type(e).__name__}: {e}",
              file=sys.stderr, flush=True)
        if os.environ.get("GHMPI_DEBUG"):
            traceback.print_exc()
        if lock is not None:
            lock.release()
        world.Abort(EXIT_FAILURE)
        return EXIT_FAILURE  # not reached
    finally:
        if lock is not None:
            lock.release()
    status = _agree(world, status)  # every rank exits with rank 0's verdict (e.g. 74)
    tier.Free()
    node.Free()
    return status


# How tier-2 ranks share the slots (GHMPI_TIER2_SHARES): by default in proportion to their
# threads; with "measured", in proportion to the KV bytes a second each one's attention reads,
# measured on its own cores at the start with every tier-2 rank measuring at once
# (`tier2.attention_rate`). A micro-batch waits for its slowest rank, and cores that the placement
# counts as equal are not always (2-thread ranks serving a message in 3.1-3.7 ms, 1-thread ranks
# their half share in 2.8-3.0: bench/results/h100-2026-12-07-session15/b/). But the start's
# measurement misjudges ranks by 20-40 % against the rates they then serve at (a rank measured
# fastest paced the job), and over four interleaved pairs on two H100 hosts measured shares ran
# the job 5-30 % faster three times and 4 % slower once: opt-in
# (bench/results/h100-2026-12-07-session16/).
SHARES_ENV = "GHMPI_TIER2_SHARES"
SHARE_STEPS = 16  # a measured share is rounded to 1/SHARE_STEPS of the fastest rank's


def _weigh_tier2(cfg: Config, plan: JobPlan, world: MPI.Comm, node: MPI.Comm,
                 threads: int) -> JobPlan:
    """The plan with its tier-2 slots dealt by the ranks' threads, or their measured attention
    rates (SHARES_ENV), where that fits (`dealt_by_weights`). Rank 0 decides; every rank gets the
    plan."""
    leader = node.bcast(world.Get_rank(), root=0)
    how = world.bcast(os.environ.get(SHARES_ENV, "").strip(), root=0)  # rank 0's, on every rank
    measure = how == "measured" and plan.layout.n_tier2 > 1 and plan.budgets is not None
    rate = 0.0
    if measure:
        from ghmpi.runtime.tier2 import attention_rate

        tier1 = plan.layout.is_tier1(world.Get_rank())
        group = world.Split(int(not tier1), world.Get_rank())  # measuring together, sharing DRAM
        try:
            if not tier1:
                rate = attention_rate(plan.args, DTYPES[cfg.kv_dtype], together=group.Barrier)
        finally:
            group.Free()
    seen = world.gather((leader, threads, rate), root=0)
    if world.Get_rank() == 0 and plan.budgets is not None:
        tier2 = seen[plan.layout.slices:]
        if measure:
            fastest = max(r for _, _, r in tier2)
            weights = [max(1, round(SHARE_STEPS * r / fastest)) for _, _, r in tier2]
        else:
            weights = [t for _, t, _ in tier2]
        plan = replace(plan, layout=dealt_by_weights(
            plan.layout, [l for l, _, _ in seen], weights, lambda lay, scale: _check_memory(
                cfg, plan.args, lay, plan.max_len, plan.budgets, scale)))
        if measure:
            lay = plan.layout
            print("ghmpi: tier 2: attention measured at "
                  + " ".join(f"{r / 1e9:.1f}" for _, _, r in tier2) + " GB/s a rank; slots "
                  + " ".join(str(len(lay.owned_slots(r)))
                             for r in range(lay.slices, lay.world_size)), flush=True)
    return world.bcast(plan, root=0)


def dealt_by_weights(layout: Layout, leaders: list[int], weights: list[int],
                     check: Callable[[Layout, Callable[[int], float]], None]) -> Layout:
    """`layout` with each tier-2 rank's share of the slots in proportion to its weight (its
    measured attention rate or its threads), where they differ: a micro-batch waits for its
    slowest rank. leaders[r]: the lowest world rank on rank r's node; weights: one per tier-2
    rank. A rank may then hold its node's tier-2 memory in proportion to its weight among the
    node's tier-2 ranks: `check(layout, scale)` raises ConfigError if a rank's KV cache exceeds its
    budget x scale(rank); then the shares stay equal."""
    weights = tuple(weights)
    if len(set(weights)) <= 1:
        return layout
    weighted = replace(layout, tier2_weights=weights)

    def scale(r: int) -> float:
        mates = [weighted.tier2_weight(s) for s in range(layout.slices, layout.world_size)
                 if leaders[s] == leaders[r]]
        return weighted.tier2_weight(r) * len(mates) / sum(mates)
    try:
        check(weighted, scale)
    except ConfigError:
        print("ghmpi: tier 2: equal slot shares (unequal shares would not fit the KV budgets)",
              flush=True)
        return layout
    return weighted


def _agree(world: MPI.Comm, status: int) -> int:
    """Rank 0's exit status on every rank, so the launcher reports it whichever rank exits first.
    Nonblocking and sleeping: the other ranks wait out rank 0's finalize without spinning."""
    buf = np.array([status], dtype=np.int64)
    req = world.Ibcast(buf, root=0)
    while not req.Test():
        time.sleep(0.01)
    return int(buf[0])


def _prefill_lane(cfg: Config, layout: Layout) -> bool:
    """Whether the job prefills its tier-2-served micro-batches' prompts in a lane of its own."""
    return cfg.topology.prefill_lane_tokens > 0 and layout.n_tier2 > 0 and layout.micro_batches > 0


def _announce(cfg: Config, plan: JobPlan, world_size: int, device: torch.device) -> None:
    l = plan.layout
    print("ghmpi: resolved config:\n" + config_to_yaml(cfg).rstrip(), flush=True)
    gpu = (f"{l.gpu_micro_batches} GPU micro-batches x {l.gpu_micro_batch_size} slots + "
           if l.gpu_micro_batches else "")
    print(f"ghmpi: {world_size} ranks: {l.slices} tier-1 ({device}), {l.n_tier2} tier-2; "
          f"{gpu}{l.micro_batches} micro-batches x {l.micro_batch_size} slots"
          f"{f', {l.hybrid_slots} hybrid' if l.hybrid_slots else ''}"
          f"{f', {l.tier2_sets} tier-2 sets' if l.tier2_sets > 1 else ''}"
          f"{', a prefill lane' if _prefill_lane(cfg, l) else ''}; "
          f"{plan.n_prompts} prompts"
          f"{f' ({plan.n_rows} completions)' if plan.n_rows != plan.n_prompts else ''}, "
          f"{plan.n_done} already done", flush=True)
    weights = l.tier2_set_weights() if l.n_tier2 and l.tier2_sets > 1 else []
    if len(set(weights)) > 1:
        print(f"ghmpi: note: the {l.tier2_sets} tier-2 sets are of unequal weight "
              f"({', '.join(map(str, weights))} {'threads' if l.tier2_weights else 'ranks'}) but "
              f"serve micro-batches of equal slots: the lightest set's micro-batches take up to "
              f"{max(weights) / min(weights):.1f}x as long and finish last; topology.tier2_sets "
              f"{_or(l.even_set_counts())} splits these ranks evenly", flush=True)


def _or(values: list[int]) -> str:
    """1, 2 or 7"""
    words = [str(v) for v in values]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _profiled(fn: Callable, rank: int) -> Callable:
    """`fn` under cProfile when GHMPI_PROFILE names a folder: each rank's profile is written to
    <folder>/rank<N>.prof (read it with `python -m pstats`)."""
    folder = os.environ.get("GHMPI_PROFILE")
    if not folder:
        return fn

    def run(*a, **kw):
        import cProfile

        prof = cProfile.Profile()
        try:
            return prof.runcall(fn, *a, **kw)
        finally:
            os.makedirs(folder, exist_ok=True)
            prof.dump_stats(os.path.join(folder, f"rank{rank}.prof"))
    return run


def _run_role(cfg: Config, plan: JobPlan, world: MPI.Comm, rank: int, device: torch.device,
              store: CompletionStore | None, lock: OutputLock | None, started: float) -> int:
    from ghmpi.model.llama import Transformer  # loading weights: tier 1 only
    from ghmpi.runtime.driver import Driver, TailGuard
    from ghmpi.runtime.tier1 import Tier1
    from ghmpi.runtime.tier2 import Tier2
    from ghmpi.runtime.wire import WireFormat

    layout, args = plan.layout, plan.args
    wire = WireFormat(DTYPES[cfg.model.dtype], pinned=device.type == "cuda")
    kv_dtype = DTYPES[cfg.kv_dtype]
    faults = FaultInjector(rank, cfg.faults.rank, cfg.faults.after_steps)
    if not layout.is_tier1(rank):
        t2 = Tier2(world, layout, args, wire, kv_dtype, plan.max_len, faults,
                   cfg.runtime.reply_delay_ms / 1e3)
        status = t2.run()
        _gather_clocks(world, t2.busy)
        return status

    j = rank
    layers = layout.slice_layers(j)
    model = Transformer.load(cfg.model.path, layers=layers, embed=j == 0,
                             head=j == layout.slices - 1, device=device,
                             dtype=DTYPES[cfg.model.dtype])
    g = cfg.generation
    if j != 0:
        t1 = Tier1(world, layout, j, model, wire, kv_dtype, plan.max_len, plan.logprobs, faults)
        status = t1.run()
        _gather_clocks(world, t1.clock)
        return status

    prompts = PromptFile(cfg.io.prompts)
    n_per_prompt = admission.samples_per_prompt(prompts, g.n)
    stops = stop_watcher(cfg, plan.stops)
    scheduler = Scheduler(admission.requests(prompts, store.done, g, n_per_prompt),
                          [layout.micro_batch_slots(m) for m in range(layout.n_micro_batches)],
                          g.max_new_tokens, args.eos_token_ids, g.stop_token_ids, g.ignore_eos,
                          plan.max_len, cfg.topology.prefill_tokens,
                          admission.job_params(g), g.prompt_logprobs, stops)
    lane = _prefill_lane(cfg, layout)
    if lane:  # the tier-2-served micro-batches' prompts are prefilled in a lane of their own
        scheduler.lane_mbs = [m for m in range(layout.n_micro_batches)
                              if not layout.is_gpu_micro_batch(m)]
        scheduler.lane_tokens = cfg.topology.prefill_lane_tokens
    progress = Progress(plan.n_rows, plan.n_done, cfg.runtime.progress_seconds)

    def on_stall(reason: str) -> None:  # the watchdog's thread: persist, say why, end the job
        saved = store.persist(timeout=PERSIST_ON_STALL_S)
        print(f"ghmpi: error: stalled: {reason}; {store.n_done} of {plan.n_rows} completions "
              f"are saved in {store.parts}"
              f"{'' if saved else ' (the newest did not reach the disk in time)'}; ending the job "
              f"(exit {EXIT_STALLED}); run the same job again to resume", file=sys.stderr, flush=True)
        lock.release()
        world.Abort(EXIT_STALLED)

    def describe() -> str:
        stuck = store.stuck_on
        disk = f"; the disk: writing {stuck[0]} for {stuck[1]:.0f} s" if stuck else ""
        return tier1.waiting_on() + disk

    watchdog = Watchdog(cfg.runtime.stall_timeout, describe, on_stall)
    sampled = [0]

    def on_finished(finished: list) -> None:
        watchdog.beat()
        for f in finished:
            store.add(f.index if f.row is None else f.row, f.tokens, f.reason, extras_of(f))
        progress.finished(finished)

    def tick(generated: int) -> None:
        if generated != sampled[0]:  # a token since the last look
            sampled[0] = generated
            watchdog.beat()
        if stops is not None:  # sequences the stop-string thread has finished reading
            done = stops.take()
            if done:
                on_finished(done)
        progress.tick(generated)

    gpu = [layout.is_gpu_micro_batch(m) for m in range(layout.n_micro_batches)]
    guard = (TailGuard(scheduler, gpu, plan.n_rows - plan.n_done)
             if any(gpu) and not all(gpu) else None)
    driver = Driver(scheduler, np.array(layout.owners(0), dtype=np.int64), on_finished,
                    should_drain=lambda: signals.received() is not None or store.error is not None,
                    tick=tick, guard=guard, lane=layout.n_micro_batches if lane else None)
    tier1 = Tier1(world, layout, 0, model, wire, kv_dtype, plan.max_len, plan.logprobs, faults,
                  driver)
    gen_started = time.time()
    status = tier1.run()
    if stops is not None:
        on_finished(stops.close())
    gen_wall = time.time() - gen_started
    watchdog.stop()
    tiers = _tier_figures(layout, _gather_clocks(world, tier1.clock))
    if tiers:
        print(f"ghmpi: {tiers['line']}", flush=True)
    if guard is not None:
        print(f"ghmpi: {guard.line()}", flush=True)
    progress.sampled = driver.generated
    progress.chunked = tuple(driver.chunked)
    prompts.close()
    try:
        store.flush()
        done = status == EXIT_OK and store.n_done == plan.n_rows
        if done:
            wall = _finalize(cfg, plan, store, progress, started, gen_wall, tiers, n_per_prompt)
    except StorageError as e:
        print(f"ghmpi: error: {e}; {store.n_done} of {plan.n_rows} completions are safe in "
              f"{store.parts}; make room or fix the filesystem (space, quota, permissions, "
              f"read-only mount), then run the same job again to resume (exit {EXIT_STORAGE})",
              file=sys.stderr, flush=True)
        return EXIT_STORAGE
    finally:
        store.close_writer()
    if done:
        progress.summary(wall, cfg.io.output)
        return EXIT_OK
    name = signal.Signals(signals.received()).name if signals.received() else "a stop request"
    print(f"ghmpi: interrupted by {name}: {store.n_done} of {plan.n_rows} completions are saved "
          f"in {cfg.io.output}.parts; run the same job again to resume", file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED if status != EXIT_OK else EXIT_FAILURE


def _gather_clocks(world: MPI.Comm, clock, timeout: float = 30.0) -> np.ndarray | None:
    """Every rank's (busy, idle, wall) seconds at rank 0, after the loops end; None elsewhere or
    if a rank does not answer in time (the figures are for people, never worth a hang)."""
    mine = np.array(clock.figures(), dtype=np.float64)
    rank, size = world.Get_rank(), world.Get_size()
    out = np.zeros((size, 3), dtype=np.float64) if rank == 0 else None
    req = world.Igather(mine, [out, MPI.DOUBLE] if rank == 0 else None, root=0)
    deadline = time.monotonic() + timeout
    while not req.Test():
        if time.monotonic() > deadline:
            return None
        time.sleep(0.001)
    return out


def _tier_figures(layout, clocks: np.ndarray | None) -> dict:
    """Busy shares per tier (busy / wall of each rank's loop), for the summary and the output."""
    if clocks is None:
        return {}
    busy = clocks[:, 0] / np.maximum(clocks[:, 2], 1e-9)
    t1 = busy[:layout.slices]
    t2 = busy[layout.slices:]
    line = f"tier 1 busy {t1.mean():.0%}" + (f" (slices {', '.join(f'{b:.0%}' for b in t1)})"
                                             if len(t1) > 1 else "")
    if len(t2):
        line += (f"; tier 2 busy {t2.mean():.0%} (min {t2.min():.0%}, max {t2.max():.0%} over "
                 f"{len(t2)} ranks)")
    return {"line": line, "tier1_busy_fraction": float(t1.mean()),
            "tier2_busy_fraction": float(t2.mean()) if len(t2) else 0.0,
            "rank_busy_s": clocks[:, 0].tolist(), "rank_idle_s": clocks[:, 1].tolist(),
            "rank_wall_s": clocks[:, 2].tolist()}


def _finalize(cfg: Config, plan: JobPlan, store: CompletionStore, progress: Progress,
              started: float, gen_wall: float, tiers: dict,
              n_per_prompt: np.ndarray | None = None) -> float:
    """Write the final file (StorageError if the filesystem fails); the job's wall time."""
    wall = time.time() - started
    store.finalize({
        "config": config_to_yaml(cfg),
        "ghmpi_version": ghmpi.__version__,
        "model_path": cfg.model.path,
        "prompts": plan.n_prompts,
        "generated_tokens": progress.tokens,
        "wall_time_s": wall,
        "tokens_per_s": progress.sampled / wall if wall > 0 else 0.0,
        "generate_time_s": gen_wall,  # from the first pass to the last token (load excluded)
        "generate_tokens_per_s": progress.sampled / gen_wall if gen_wall > 0 else 0.0,
        "rank0_peak_rss_mib": peak_rss_mib(),
        **{k: v for k, v in tiers.items() if k != "line"},
    }, n_per_prompt)
    return wall


__all__ = ["run", "plan_job", "JobPlan"]
