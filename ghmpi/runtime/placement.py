"""Cores per rank on one node: every core to someone, none to two, pinned where the launcher did not.

The ranks of a node gather (role, CPU affinity) and each computes the same plan with `plan_node`,
a pure function tested without MPI:

- Ranks whose affinity sets differ were bound by the launcher (`srun --cpu-bind`, `mpirun
  --bind-to core`): each keeps its set and runs one torch thread per CPU in it.
- Ranks that share one set (no binding, or bound to a whole socket) split it: a tier-1 rank that
  drives a GPU gets 2 CPUs (1 when CPUs are scarce), a tier-1 rank computing on the CPU gets half
  of what is left, the tier-2 ranks share the rest evenly; each is pinned to its own contiguous
  block, whole cores first (SMT siblings together, one socket before the next).
- Under Slurm, a shared set larger than the allocation's CPUs on the node (SLURM_CPUS_ON_NODE, or
  SLURM_CPUS_PER_TASK x ranks) is not all ours: the allocation's count is split and nobody is
  pinned, since we cannot tell which CPUs are ours.
- More ranks than CPUs: one thread each, not pinned (oversubscribed; Open MPI should then yield).
- An explicit `runtime.torch_threads` wins: that many threads, no pinning.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

GPU, CPU1, TIER2 = "tier-1 gpu", "tier-1 cpu", "tier-2"
GPU_THREADS = 2  # a GPU rank's CPU work: launching kernels, sampling, MPI


@dataclass(frozen=True)
class RankInfo:
    kind: str  # GPU | CPU1 | TIER2
    cpus: tuple[int, ...]  # the process's affinity when it started, sorted


@dataclass(frozen=True)
class Placement:
    threads: int  # torch threads for this rank
    cpus: tuple[int, ...] | None  # pin to these CPUs, or None: leave the affinity alone
    summary: str  # one line about the whole node, the same on every rank of it


def here(kind: str) -> RankInfo:
    """This process's role and affinity, to be gathered over the node."""
    try:
        cpus = tuple(sorted(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        cpus = tuple(range(os.cpu_count() or 1))
    return RankInfo(kind, cpus)


def cpu_order(cpus: Sequence[int], topology: Mapping[int, tuple[int, int]] | None = None) -> list[int]:
    """CPUs sorted by (socket, core, cpu): contiguous blocks of this order are whole cores of one
    socket. `topology` maps cpu -> (package id, core id); read from sysfs when None."""
    topology = read_topology(cpus) if topology is None else topology
    return sorted(cpus, key=lambda c: (*topology.get(c, (0, c)), c))


def read_topology(cpus: Sequence[int]) -> dict[int, tuple[int, int]]:
    out = {}
    for c in cpus:
        base = f"/sys/devices/system/cpu/cpu{c}/topology"
        try:
            with open(f"{base}/physical_package_id") as f:
                pkg = int(f.read())
            with open(f"{base}/core_id") as f:
                core = int(f.read())
            out[c] = (pkg, core)
        except (OSError, ValueError):
            out[c] = (0, c)
    return out


def shares(kinds: Sequence[str], n: int) -> list[int]:
    """CPUs for each rank of a group sharing n CPUs (sum == n when n >= ranks, else all 1)."""
    r = len(kinds)
    if n <= r:
        return [1] * r
    gpu = [i for i, k in enumerate(kinds) if k == GPU]
    cpu1 = [i for i, k in enumerate(kinds) if k == CPU1]
    t2 = [i for i, k in enumerate(kinds) if k == TIER2]
    out = [0] * r
    if not cpu1 and not t2:  # only GPU drivers here: they take it all
        return _even(n, len(gpu))
    g_each = GPU_THREADS if n - GPU_THREADS * len(gpu) >= len(cpu1) + len(t2) else 1
    for i in gpu:
        out[i] = g_each
    rest = n - g_each * len(gpu)
    cpu1_total = rest if not t2 else (0 if not cpu1 else max(len(cpu1), min(rest - len(t2), rest // 2)))
    for i, s in zip(cpu1, _even(cpu1_total, len(cpu1))):
        out[i] = s
    for i, s in zip(t2, _even(rest - cpu1_total, len(t2))):
        out[i] = s
    return out


def _even(n: int, parts: int) -> list[int]:
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)] if parts else []


def _slurm_budget(env: Mapping[str, str], group_size: int) -> int | None:
    """CPUs Slurm granted the group's ranks on this node, if it says."""
    if env.get("SLURM_CPUS_ON_NODE", "").isdigit():
        return int(env["SLURM_CPUS_ON_NODE"])
    if env.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return int(env["SLURM_CPUS_PER_TASK"]) * group_size
    return None


def plan_node(ranks: Sequence[RankInfo], env: Mapping[str, str] = {},
              topology: Mapping[int, tuple[int, int]] | None = None,
              torch_threads: int = 0) -> list[Placement]:
    """The placement of every rank of one node (ranks in node-rank order)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, r in enumerate(ranks):
        groups.setdefault(r.cpus, []).append(i)
    if torch_threads:
        return [Placement(torch_threads, None,
                          f"placement: {len(ranks)} ranks on this node, runtime.torch_threads="
                          f"{torch_threads} each, affinity left to the launcher")] * len(ranks)
    plan: list[tuple[int, tuple[int, ...] | None]] = [(1, None)] * len(ranks)
    notes = []
    for cpus, members in groups.items():
        if len(members) == 1:  # bound by the launcher (or alone on the node): its CPUs are its own
            budget = _slurm_budget(env, 1) if len(groups) == 1 else None
            n = min(len(cpus), budget) if budget else len(cpus)
            plan[members[0]] = (n, None)
            continue
        kinds = [ranks[i].kind for i in members]
        budget = _slurm_budget(env, len(members))
        if budget is not None and budget < len(cpus):  # the set is not all ours: count, no pins
            for i, s in zip(members, shares(kinds, budget)):
                plan[i] = (s, None)
            notes.append(f"{len(members)} ranks share {budget} Slurm CPUs (not pinned: the "
                         f"affinity spans {len(cpus)})")
        elif len(cpus) < len(members):
            notes.append(f"{len(members)} ranks on {len(cpus)} CPUs: oversubscribed, 1 thread "
                         f"each, not pinned")
        else:
            order = cpu_order(cpus, topology)
            at = 0
            for i, s in zip(members, shares(kinds, len(cpus))):
                plan[i] = (s, tuple(sorted(order[at:at + s])))
                at += s
            notes.append(f"{len(members)} ranks shared {len(cpus)} CPUs: pinned to disjoint "
                         f"blocks ({_describe(ranks, members, plan)})")
    bound = [i for m in groups.values() if len(m) == 1 for i in m]
    if bound:
        notes.append(f"{len(bound)} rank(s) bound by the launcher: one thread per CPU of their own")
    if len(ranks) == 1:
        notes = [f"1 rank on this node, {plan[0][0]} threads"]
    summary = "placement: " + "; ".join(notes)
    return [Placement(t, c, summary) for t, c in plan]


def _describe(ranks: Sequence[RankInfo], members: list[int],
              plan: list[tuple[int, tuple[int, ...] | None]]) -> str:
    by_kind: dict[str, list[int]] = {}
    for i in members:
        by_kind.setdefault(ranks[i].kind, []).append(plan[i][0])
    parts = []
    for kind, threads in by_kind.items():
        lo, hi = min(threads), max(threads)
        parts.append(f"{len(threads)} {kind} x {lo if lo == hi else f'{lo}-{hi}'} threads")
    return ", ".join(parts)


def apply(placement: Placement) -> None:
    """Pin this process (where planned). Torch's thread count is the caller's to set."""
    if placement.cpus is not None:
        try:
            os.sched_setaffinity(0, placement.cpus)
        except (AttributeError, OSError):
            pass  # not Linux, or a cgroup changed under us: the thread count still holds
