"""Who does what: roles, layer slices and slot ownership as pure functions of the world.

Nothing here touches MPI or tensors, so every map is unit-tested at any "world size" without
starting processes. World ranks 0..slices-1 are tier 1 (slice j on rank j); the rest are tier 2.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from ghmpi.errors import ConfigError

LOCAL = -1  # owner of a slot whose KV cache stays on tier 1 (hybrid slots, or no tier 2 at all)


def split_evenly(n: int, parts: int) -> list[range]:
    """Cut range(n) into `parts` contiguous ranges whose sizes differ by at most one."""
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


@dataclass(frozen=True, slots=True)
class Layout:
    world_size: int
    slices: int
    n_layers: int
    micro_batches: int  # tier-2-served micro-batches (all micro-batches without tier 2)
    micro_batch_size: int
    hybrid_slots: int  # slots of each of those micro-batches kept on tier 1
    gpu_micro_batches: int = 0  # more micro-batches whose KV stays wholly on tier 1 (hybrid)
    gpu_micro_batch_size: int = 0  # their size (0: micro_batch_size)
    # Share of each tier-2 rank (world rank slices + i) in the slots of its group: its CPU
    # threads, so a rank with twice the cores holds twice the slots and every rank of a group
    # finishes a micro-batch's attention at about the same time; empty: equal shares.
    tier2_weights: tuple[int, ...] = ()
    # Disjoint sets each slice's tier-2 ranks form: tier-2-served micro-batch m is served by set
    # m mod tier2_sets alone, so its layers wait on those ranks only (1: on the whole group).
    tier2_sets: int = 1

    def __post_init__(self) -> None:
        if self.slices < 1:
            raise ConfigError(f"topology.slices must be >= 1, got {self.slices}")
        if self.slices > self.world_size:
            raise ConfigError(
                f"topology.slices is {self.slices} but the MPI world has only {self.world_size} "
                f"rank(s); start at least {self.slices} ranks or lower topology.slices")
        if self.slices > self.n_layers:
            raise ConfigError(
                f"topology.slices is {self.slices} but the model has only {self.n_layers} layers")
        if self.gpu_micro_batches and not self.gpu_micro_batch_size:
            object.__setattr__(self, "gpu_micro_batch_size", self.micro_batch_size)
        if self.tier2_weights and (len(self.tier2_weights) != self.n_tier2
                                   or min(self.tier2_weights) < 1):
            raise ValueError(f"tier2_weights {self.tier2_weights}: need one weight >= 1 per "
                             f"tier-2 rank ({self.n_tier2})")
        if self.tier2_sets < 1:
            raise ConfigError(f"topology.tier2_sets must be >= 1, got {self.tier2_sets}")
        if self.n_tier2 and self.micro_batches % self.tier2_sets:
            raise ConfigError(
                f"topology.micro_batches ({self.micro_batches}) must be a multiple of "
                f"topology.tier2_sets ({self.tier2_sets}): each set of tier-2 ranks serves as "
                f"many micro-batches as the others")
        if self.n_tier2 and self.tier2_sets > min(len(self.tier2_group(j))
                                                  for j in range(self.slices)):
            raise ConfigError(
                f"topology.tier2_sets is {self.tier2_sets} but a slice has only "
                f"{min(len(self.tier2_group(j)) for j in range(self.slices))} tier-2 rank(s)")
        if self.hybrid_slots > self.micro_batch_size:
            raise ConfigError(
                f"topology.hybrid_slots ({self.hybrid_slots}) exceeds topology.micro_batch_size "
                f"({self.micro_batch_size})")

    # -- roles -------------------------------------------------------------------------------
    @property
    def n_tier2(self) -> int:
        return self.world_size - self.slices

    def is_tier1(self, rank: int) -> bool:
        return rank < self.slices

    def role(self, rank: int) -> str:
        return f"tier-1 slice {rank}" if self.is_tier1(rank) else f"tier-2 #{rank - self.slices}"

    # -- layers ------------------------------------------------------------------------------
    def slice_layers(self, j: int) -> range:
        """Global layer indices held by slice j (contiguous, sizes differ by at most one)."""
        return split_evenly(self.n_layers, self.slices)[j]

    def slice_of_layer(self, layer: int) -> int:
        for j in range(self.slices):
            if layer in self.slice_layers(j):
                return j
        raise IndexError(layer)

    # -- tier-2 groups -----------------------------------------------------------------------
    def tier2_group(self, j: int) -> list[int]:
        """World ranks of the tier-2 ranks serving slice j.

        With at least as many tier-2 ranks as slices, they are split into contiguous groups, one
        per slice; with fewer, tier-2 rank (j mod n_tier2) serves slice j alone (and so serves
        several slices)."""
        if self.n_tier2 == 0:
            return []
        if self.n_tier2 >= self.slices:
            return [self.slices + i for i in split_evenly(self.n_tier2, self.slices)[j]]
        return [self.slices + j % self.n_tier2]

    def slices_served(self, rank: int) -> list[int]:
        """Slices whose attention the tier-2 world rank `rank` computes."""
        return [j for j in range(self.slices) if rank in self.tier2_group(j)]

    # -- slots ----------------------------------------------------------------------------
    # Slots are numbered micro-batch by micro-batch: first the GPU micro-batches (wholly on
    # tier 1, gpu_micro_batch_size slots each), then the others (micro_batch_size slots each,
    # the first hybrid_slots of each kept on tier 1, the rest on tier 2).
    @property
    def n_micro_batches(self) -> int:
        return self.gpu_micro_batches + self.micro_batches

    @property
    def n_slots(self) -> int:
        return self.gpu_micro_batches * self.gpu_micro_batch_size \
            + self.micro_batches * self.micro_batch_size

    @property
    def max_micro_batch_size(self) -> int:
        return max(self.micro_batch_size, self.gpu_micro_batch_size)

    def micro_batch_slots(self, m: int) -> range:
        g, gs = self.gpu_micro_batches, self.gpu_micro_batch_size
        if m < g:
            return range(m * gs, (m + 1) * gs)
        start = g * gs + (m - g) * self.micro_batch_size
        return range(start, start + self.micro_batch_size)

    def _remote_index(self, slot: int) -> tuple[int, int]:
        """(set, index among its set's tier-2 slots) of a tier-2 slot; (-1, -1) for a tier-1
        slot. Tier-2-served micro-batch mb goes to set mb mod tier2_sets."""
        if self.n_tier2 == 0:
            return -1, -1
        rel = slot - self.gpu_micro_batches * self.gpu_micro_batch_size
        if rel < 0:
            return -1, -1
        mb, i = divmod(rel, self.micro_batch_size)
        if i < self.hybrid_slots:
            return -1, -1
        turn, which = divmod(mb, self.tier2_sets)
        return which, turn * (self.micro_batch_size - self.hybrid_slots) + i - self.hybrid_slots

    def is_local(self, slot: int) -> bool:
        return self._remote_index(slot)[0] < 0

    def is_gpu_micro_batch(self, m: int) -> bool:
        return m < self.gpu_micro_batches or self.n_tier2 == 0

    def owner(self, slot: int, j: int) -> int:
        """World rank holding the KV cache of `slot` for slice j's layers, or LOCAL (tier 1).

        A slot keeps the same index inside every slice's group, so its owner is fixed for life.
        The tier-2 slots of a micro-batch are dealt to the ranks of its set (`tier2_set`: the
        whole group unless tier2_sets > 1) in turn, each rank as often as its weight (`deal`),
        so every micro-batch's rows split in proportion to the ranks' threads."""
        which, remote = self._remote_index(slot)
        if which < 0:
            return LOCAL
        ranks = self.tier2_set(j, which)
        turns = deal(tuple(self.tier2_weight(r) for r in ranks))
        return ranks[turns[remote % len(turns)]]

    def tier2_set(self, j: int, which: int) -> list[int]:
        """Set `which` of slice j's tier-2 ranks: the group cut into tier2_sets sets of about
        equal weight (`split_sets`)."""
        group = self.tier2_group(j)
        if self.tier2_sets == 1:
            return group
        return [group[i] for i in split_sets(self._group_weights(j), self.tier2_sets)[which]]

    def tier2_set_weights(self, j: int = 0) -> list[int]:
        """Each of slice j's tier-2 sets' weight (its ranks' threads, where they differ; else
        its number of ranks). Every set serves micro-batches of micro_batch_size slots, so
        unequal weights make the lighter sets' micro-batches slower."""
        return set_weights(self._group_weights(j), self.tier2_sets)

    def even_set_counts(self, j: int = 0) -> list[int]:
        """The tier2_sets values that split slice j's tier-2 ranks into sets of equal weight."""
        weights = self._group_weights(j)
        return [n for n in range(1, len(weights) + 1) if len(set(set_weights(weights, n))) == 1]

    def _group_weights(self, j: int) -> tuple[int, ...]:
        return tuple(self.tier2_weight(r) for r in self.tier2_group(j))

    def tier2_weight(self, rank: int) -> int:
        return self.tier2_weights[rank - self.slices] if self.tier2_weights else 1

    def owners(self, j: int) -> list[int]:
        """owner(slot, j) of every slot, in slot order."""
        return [self.owner(s, j) for s in range(self.n_slots)]

    def owned_slots(self, rank: int) -> list[int]:
        """Slots whose KV cache the tier-2 world rank `rank` holds (for every slice it serves)."""
        return [s for s in range(self.n_slots)
                if any(self.owner(s, j) == rank for j in self.slices_served(rank))]

    def local_slots(self) -> list[int]:
        return [s for s in range(self.n_slots) if self.is_local(s)]


@functools.cache
def split_sets(weights: tuple[int, ...], n: int) -> tuple[tuple[int, ...], ...]:
    """Indices of `weights` cut into n sets of about equal total weight: heaviest first, each to
    the lightest set so far (ties: the lower index); each set's indices in increasing order."""
    load = [0] * n
    members: list[list[int]] = [[] for _ in load]
    for i in sorted(range(len(weights)), key=lambda i: -weights[i]):
        k = load.index(min(load))
        load[k] += weights[i]
        members[k].append(i)
    return tuple(tuple(sorted(m)) for m in members)


def set_weights(weights: tuple[int, ...], n: int) -> list[int]:
    """The total weight of each of `split_sets(weights, n)`."""
    return [sum(weights[i] for i in m) for m in split_sets(weights, n)]


@functools.cache
def deal(weights: tuple[int, ...]) -> tuple[int, ...]:
    """One round of dealing to len(weights) takers, taker i served weights[i] times, spread out
    (smooth weighted round robin: each turn goes to the taker furthest behind its share). Equal
    weights deal 0, 1, 2, ... in order. Cached: `Layout.owner` asks it for every slot."""
    g = math.gcd(*weights)
    w = [x // g for x in weights]
    total, credit, out = sum(w), [0] * len(w), []
    for _ in range(total):
        for i, x in enumerate(w):
            credit[i] += x
        i = max(range(len(w)), key=lambda k: credit[k])  # the first of the most behind
        credit[i] -= total
        out.append(i)
    return tuple(out)


# One more micro-batch per slice for every this many ms of reply delay. At 10 ms on the H100
# machine (1,024 prompts x 512 -> 32; bench/results/h100-2026-12-07-session14/b/), 4
# micro-batches ran 695 tokens/s, 2 ran 665 and 10 (the rule of 1.25 ms before, from a sweep of
# code whose held replies left late) 532, against 711 at no delay: each micro-batch more costs
# every tier-2 rank a message a layer (~0.36 ms beyond its kernel there).
DELAY_MS_PER_MICRO_BATCH = 5.0


def auto_batches(world_size: int, slices: int, n_prompts: int, micro_batches: int,
                 micro_batch_size: int, on_gpu: bool, hybrid_slots: int = 0,
                 local_fit: int | None = None, remote_fit: int | None = None,
                 reply_delay_ms: float = 0.0, tier2_sets: int = 1) -> tuple[int, int]:
    """Defaults for the micro-batch count and size where the config says 0 (auto).

    With tier-2 ranks, two micro-batches per slice keep tier 1 busy while the other waits on
    attention; without tier 2 one batch is the single-tier baseline. The size fills the memory:
    `local_fit` slots fit a tier-1 rank's KV budget, `remote_fit` a tier-2 rank's (None: no
    limit); it never exceeds what the prompts can fill, and a CPU tier 1 (tests, debugging)
    stays at 64. A delay between the tiers (`reply_delay_ms`) is hidden by more micro-batches in
    flight: one more per slice for every `DELAY_MS_PER_MICRO_BATCH` ms. With the tier-2 ranks cut
    into `tier2_sets` sets, each set gets as many."""
    has_tier2 = world_size > slices
    extra = slices * math.ceil(reply_delay_ms / DELAY_MS_PER_MICRO_BATCH) if has_tier2 else 0
    mbs = micro_batches or ((2 * slices + extra) * tier2_sets if has_tier2 else 1)
    if micro_batch_size:
        return mbs, micro_batch_size
    size = -(-max(n_prompts, 1) // mbs)
    if not on_gpu:
        size = min(size, 64)
    if has_tier2:
        if remote_fit is not None:  # each slice's group holds every remote slot once
            group = max(1, (world_size - slices) // slices)
            size = min(size, hybrid_slots + remote_fit * group // mbs)
    elif local_fit is not None:
        size = min(size, local_fit // mbs)
    return mbs, max(1, size)
