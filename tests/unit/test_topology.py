"""Slot -> rank maps and slice layouts, as pure functions at many world sizes (no MPI)."""

import pytest

from ghmpi.comm.topology import LOCAL, Layout, auto_batches, deal, split_evenly, split_sets
from ghmpi.errors import ConfigError


def layout(world, slices=1, layers=8, mbs=2, size=4, hybrid=0):
    return Layout(world, slices, layers, mbs, size, hybrid)


@pytest.mark.parametrize("n,parts", [(8, 1), (8, 3), (5, 5), (7, 2), (0, 3)])
def test_split_evenly_covers_contiguously(n, parts):
    ranges = split_evenly(n, parts)
    assert [i for r in ranges for i in r] == list(range(n))
    sizes = [len(r) for r in ranges]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("world,slices", [(1, 1), (2, 1), (3, 1), (9, 1), (3, 2), (4, 2), (5, 2),
                                          (7, 3), (4, 3), (12, 4)])
def test_every_slot_has_one_owner_per_slice_and_layers_partition(world, slices):
    lay = layout(world, slices, layers=9, mbs=3, size=5)
    assert [l for j in range(slices) for l in lay.slice_layers(j)] == list(range(9))
    for j in range(slices):
        group = lay.tier2_group(j)
        assert all(not lay.is_tier1(r) for r in group)
        for s in range(lay.n_slots):
            owner = lay.owner(s, j)
            if world == slices:
                assert owner == LOCAL
            else:
                assert owner in group
                assert s in lay.owned_slots(owner)
    # every tier-2 rank serves at least one slice; ownership is the same index in every group
    for r in range(slices, world):
        assert lay.slices_served(r)
    if world > slices:
        for s in range(lay.n_slots):
            idx = {lay.tier2_group(j).index(lay.owner(s, j)) % min(len(lay.tier2_group(j)) for j in range(slices))
                   for j in range(slices)}
            assert len(idx) == 1


def test_tier2_spread_over_slices_evenly():
    lay = layout(7, slices=2)  # 5 tier-2 ranks over 2 slices
    assert lay.tier2_group(0) == [2, 3, 4] and lay.tier2_group(1) == [5, 6]
    lay = layout(3, slices=2)  # 1 tier-2 rank serves both slices
    assert lay.tier2_group(0) == lay.tier2_group(1) == [2]
    assert lay.slices_served(2) == [0, 1]


def test_slots_spread_round_robin_over_group():
    lay = layout(9, mbs=2, size=8)  # 8 tier-2 ranks, 16 slots
    owners = [lay.owner(s, 0) for s in range(16)]
    assert owners == [1, 2, 3, 4, 5, 6, 7, 8] * 2
    assert all(len(lay.owned_slots(r)) == 2 for r in range(1, 9))


def test_deal_serves_each_taker_by_weight_spread_out():
    assert deal((1, 1, 1)) == (0, 1, 2)
    assert deal((2, 2)) == (0, 1)  # only the proportions count
    turns = deal((2, 2, 2, 2, 2, 2, 1, 1))
    assert [turns.count(i) for i in range(8)] == [2] * 6 + [1] * 2
    assert turns[:8] == tuple(range(8))  # every taker once before anyone twice
    assert deal((3, 1)) == (0, 0, 1, 0)


def test_weighted_slots_follow_threads_in_every_micro_batch():
    """6 tier-2 ranks with 2 threads and 2 with 1 (14 cores): each micro-batch's 128 slots split
    about 2:1, so the ranks finish a layer's attention together."""
    lay = Layout(9, 1, 8, 2, 128, 0, tier2_weights=(2, 2, 2, 2, 2, 2, 1, 1))
    for mb in range(2):
        rows = [sum(lay.owner(s, 0) == r for s in lay.micro_batch_slots(mb)) for r in range(1, 9)]
        assert sum(rows) == 128 and all(18 <= n <= 19 for n in rows[:6])
        assert rows[6:] == [9, 9]
    assert sorted(s for r in range(1, 9) for s in lay.owned_slots(r)) == list(range(256))
    assert Layout(9, 1, 8, 2, 16, 0, tier2_weights=(1,) * 8).owners(0) == layout(9, size=16).owners(0)
    with pytest.raises(ValueError):
        Layout(9, 1, 8, 2, 16, 0, tier2_weights=(1, 2))


def test_hybrid_slots_stay_local():
    lay = layout(3, mbs=2, size=4, hybrid=1)
    assert lay.local_slots() == [0, 4]
    assert [lay.owner(s, 0) for s in range(8)] == [LOCAL, 1, 2, 1, LOCAL, 2, 1, 2]


def test_single_rank_keeps_everything_local():
    lay = layout(1)
    assert lay.n_tier2 == 0 and lay.local_slots() == list(range(lay.n_slots))


def test_bad_layouts_are_config_errors():
    with pytest.raises(ConfigError, match="slices is 3 but the MPI world has only 2"):
        layout(2, slices=3)
    with pytest.raises(ConfigError, match="only 2 layers"):
        layout(4, slices=3, layers=2)
    with pytest.raises(ConfigError, match="hybrid_slots"):
        layout(3, size=2, hybrid=3)


def test_auto_batches():
    assert auto_batches(1, 1, 100, 0, 0, on_gpu=False) == (1, 64)
    assert auto_batches(9, 1, 100, 0, 0, on_gpu=False) == (2, 50)
    assert auto_batches(9, 2, 10, 0, 0, on_gpu=True) == (4, 3)
    assert auto_batches(9, 1, 0, 3, 5, on_gpu=False) == (3, 5)
    assert auto_batches(9, 1, 256, 0, 0, on_gpu=True, tier2_sets=7) == (14, 19)
    assert auto_batches(1, 1, 256, 0, 0, on_gpu=True, tier2_sets=7) == (1, 256)
    # a reply delay adds one micro-batch per slice per 5 ms: 4 at 10 ms, 3 at 0.5 ms
    assert auto_batches(9, 1, 1024, 0, 0, on_gpu=True, reply_delay_ms=10) == (4, 256)
    assert auto_batches(10, 2, 1024, 0, 0, on_gpu=True, reply_delay_ms=0.5) == (6, 171)
    assert auto_batches(1, 1, 1024, 0, 0, on_gpu=True, reply_delay_ms=10) == (1, 1024)


def test_tier2_sets_serve_their_own_micro_batches():
    """14 cores over 8 tier-2 ranks (2 threads x 6, 1 x 2) cut into 7 sets of 2 threads: each
    micro-batch lives on one set only, each set holds two of the 14 micro-batches."""
    lay = Layout(9, 1, 8, 14, 18, 0, tier2_weights=(2, 2, 2, 2, 2, 2, 1, 1), tier2_sets=7)
    assert [lay.tier2_set(0, i) for i in range(7)] == [[1], [2], [3], [4], [5], [6], [7, 8]]
    for mb in range(14):
        owners = {lay.owner(s, 0) for s in lay.micro_batch_slots(mb)}
        assert owners == set(lay.tier2_set(0, mb % 7))
    assert [len(lay.owned_slots(r)) for r in range(1, 9)] == [36] * 6 + [18, 18]
    assert sorted(s for r in range(1, 9) for s in lay.owned_slots(r)) == list(range(14 * 18))
    lay = Layout(9, 1, 8, 4, 18, 0, tier2_weights=(2, 2, 2, 2, 2, 2, 1, 1), tier2_sets=2)
    assert [lay.tier2_set(0, i) for i in range(2)] == [[1, 3, 5, 7], [2, 4, 6, 8]]  # 7 and 7
    # equal weights; two slices: each group is cut alike
    lay = Layout(7, 2, 8, 4, 4, 1, tier2_sets=2)  # groups [2, 3, 4] and [5, 6]
    assert [lay.tier2_set(0, i) for i in range(2)] == [[2, 4], [3]]
    assert [lay.tier2_set(1, i) for i in range(2)] == [[5], [6]]
    assert [lay.owner(s, 0) for s in range(16)] == [LOCAL, 2, 4, 2, LOCAL, 3, 3, 3,
                                                    LOCAL, 4, 2, 4, LOCAL, 3, 3, 3]
    assert [lay.owner(s, 1) for s in range(16)] == [LOCAL, 5, 5, 5, LOCAL, 6, 6, 6] * 2
    assert Layout(4, 1, 8, 3, 4, 0, tier2_weights=(1, 1, 10), tier2_sets=3).tier2_set(0, 2) == [2]
    assert Layout(9, 1, 8, 2, 4, 0).tier2_set(0, 0) == list(range(1, 9))


def test_tier2_set_weights_and_the_counts_that_split_evenly():
    """Session 18's host: 4 sets over 2 x 6 + 1 x 2 threads are 4, 4, 3, 3 threads, and the
    3-thread sets' micro-batches ran 31 % slower; 1, 2 and 7 sets split those threads evenly."""
    w = (2, 2, 2, 2, 2, 2, 1, 1)
    lay = Layout(9, 1, 8, 8, 32, 0, tier2_weights=w, tier2_sets=4)
    assert lay.tier2_set_weights() == [4, 4, 3, 3]
    assert lay.even_set_counts() == [1, 2, 7]
    assert Layout(9, 1, 8, 4, 64, 0, tier2_weights=w, tier2_sets=2).tier2_set_weights() == [7, 7]
    eq = Layout(9, 1, 8, 6, 4, 0, tier2_sets=3)  # 8 equal ranks: 3, 3, 2
    assert eq.tier2_set_weights() == [3, 3, 2] and eq.even_set_counts() == [1, 2, 4, 8]
    assert split_sets(w, 4) == ((0, 4), (1, 5), (2, 6), (3, 7))


def test_bad_tier2_sets_are_config_errors():
    with pytest.raises(ConfigError, match="multiple of topology.tier2_sets"):
        Layout(9, 1, 8, 3, 4, 0, tier2_sets=2)
    with pytest.raises(ConfigError, match="only 2 tier-2 rank"):
        Layout(3, 1, 8, 3, 4, 0, tier2_sets=3)
    with pytest.raises(ConfigError, match="must be >= 1"):
        Layout(3, 1, 8, 2, 4, 0, tier2_sets=0)
    assert Layout(1, 1, 8, 3, 4, 0, tier2_sets=2).n_tier2 == 0  # no tier 2: nothing to cut
