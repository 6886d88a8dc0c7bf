"""Who does what: roles, layer slices and slot ownership as pure functions of the world.

Nothing here touches MPI or tensors, so every map is unit-tested at any "world size" without
starting processes. World ranks 0..slices-1 are tier 1 (slice j on rank j); the rest are tier 2.
"""

from __future__ import annotations

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
    micro_batches: int
    micro_batch_size: int
    hybrid_slots: int  # slots of each micro-batch kept on tier 1

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

    # -- slots -------------------------------------------------------------------------------
    @property
    def n_slots(self) -> int:
        return self.micro_batches * self.micro_batch_size

    def micro_batch_slots(self, m: int) -> range:
        return range(m * self.micro_batch_size, (m + 1) * self.micro_batch_size)

    def is_local(self, slot: int) -> bool:
        return self.n_tier2 == 0 or slot % self.micro_batch_size < self.hybrid_slots

    def owner(self, slot: int, j: int) -> int:
        """World rank holding the KV cache of `slot` for slice j's layers, or LOCAL (tier 1).

        A slot keeps the same index inside every slice's group, so its owner is fixed for life."""
        if self.is_local(slot):
            return LOCAL
        group = self.tier2_group(j)
        remote = slot - (slot // self.micro_batch_size + 1) * self.hybrid_slots  # index among remote slots
        return group[remote % len(group)]

    def owned_slots(self, rank: int) -> list[int]:
        """Slots whose KV cache the tier-2 world rank `rank` holds (for every slice it serves)."""
        return [s for s in range(self.n_slots)
                if any(self.owner(s, j) == rank for j in self.slices_served(rank))]

    def local_slots(self) -> list[int]:
        return [s for s in range(self.n_slots) if self.is_local(s)]


def auto_batches(world_size: int, slices: int, n_prompts: int, micro_batches: int,
                 micro_batch_size: int, on_gpu: bool, hybrid_slots: int = 0,
                 local_fit: int | None = None, remote_fit: int | None = None) -> tuple[int, int]:
    """Defaults for the micro-batch count and size where the config says 0 (auto).

    With tier-2 ranks, two micro-batches per slice keep tier 1 busy while the other waits on
    attention; without tier 2 one batch is the single-tier baseline. The size fills the memory:
    `local_fit` slots fit a tier-1 rank's KV budget, `remote_fit` a tier-2 rank's (None: no
    limit); it never exceeds what the prompts can fill, and a CPU tier 1 (tests, debugging)
    stays at 64."""
    has_tier2 = world_size > slices
    mbs = micro_batches or (2 * slices if has_tier2 else 1)
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
