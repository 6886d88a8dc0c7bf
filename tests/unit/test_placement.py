"""Cores per rank on a node (ghmpi.runtime.placement): pure functions, no MPI."""

import itertools

import pytest

from ghmpi.runtime.placement import CPU1, GPU, TIER2, RankInfo, cpu_order, plan_node, shares


def node(kinds, cpus):
    return [RankInfo(k, tuple(cpus)) for k in kinds]


def check_partition(plan, cpus):
    """Every CPU to exactly one rank, threads == its block's size."""
    blocks = [p.cpus for p in plan]
    assert all(b is not None for b in blocks)
    assert sorted(itertools.chain(*blocks)) == sorted(cpus)
    assert [p.threads for p in plan] == [len(b) for b in blocks]


def test_default_nine_ranks_on_sixteen_cores_use_every_core():
    plan = plan_node(node([GPU] + [TIER2] * 8, range(16)))
    check_partition(plan, range(16))
    assert plan[0].threads == 2 and sum(p.threads for p in plan[1:]) == 14
    assert "pinned to disjoint blocks" in plan[0].summary
    assert len({p.summary for p in plan}) == 1  # one line, the same on every rank


def test_cpu_tier1_gets_half_of_what_is_left():
    plan = plan_node(node([CPU1] + [TIER2] * 4, range(16)))
    check_partition(plan, range(16))
    assert [p.threads for p in plan] == [8, 2, 2, 2, 2]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 9, 16, 17, 64])
@pytest.mark.parametrize("kinds", [[GPU], [CPU1], [GPU, TIER2], [CPU1, TIER2, TIER2],
                                   [GPU] + [TIER2] * 8, [GPU, GPU] + [TIER2] * 6, [GPU, GPU],
                                   [TIER2] * 4])
def test_shares_give_every_cpu_to_someone_and_none_twice(kinds, n):
    s = shares(kinds, n)
    assert len(s) == len(kinds) and min(s) >= 1
    assert sum(s) == (n if n >= len(kinds) else len(kinds))  # oversubscribed: 1 each
    t2 = [x for x, k in zip(s, kinds) if k == TIER2]
    assert not t2 or max(t2) - min(t2) <= 1


def test_oversubscribed_node_is_not_pinned():
    plan = plan_node(node([CPU1] + [TIER2] * 8, range(2)))
    assert [p.threads for p in plan] == [1] * 9 and all(p.cpus is None for p in plan)
    assert "oversubscribed" in plan[0].summary


def test_launcher_bound_ranks_keep_their_cpus():
    ranks = [RankInfo(GPU, (0, 1)), RankInfo(TIER2, (2, 3, 4)), RankInfo(TIER2, (5, 6, 7))]
    plan = plan_node(ranks)
    assert [p.threads for p in plan] == [2, 3, 3] and all(p.cpus is None for p in plan)
    assert "bound by the launcher" in plan[0].summary


def test_socket_bound_groups_are_split_within_each_socket():
    s0, s1 = tuple(range(8)), tuple(range(8, 16))
    ranks = [RankInfo(GPU, s0)] + [RankInfo(TIER2, s0)] * 4 + [RankInfo(TIER2, s1)] * 4
    plan = plan_node(ranks)
    check_partition(plan[:5], s0)
    check_partition(plan[5:], s1)


def test_slurm_allocation_smaller_than_the_affinity_is_counted_not_pinned():
    plan = plan_node(node([GPU] + [TIER2] * 3, range(64)), {"SLURM_CPUS_ON_NODE": "8"})
    assert [p.threads for p in plan] == [2, 2, 2, 2] and all(p.cpus is None for p in plan)
    plan = plan_node(node([TIER2] * 4, range(64)), {"SLURM_CPUS_PER_TASK": "3"})
    assert [p.threads for p in plan] == [3] * 4
    # the allocation is the affinity (cgroups): pinned as usual
    check_partition(plan_node(node([GPU] + [TIER2] * 3, range(8)), {"SLURM_CPUS_ON_NODE": "8"}), range(8))
    # one rank alone: the allocation, not the machine
    assert plan_node(node([TIER2], range(64)), {"SLURM_CPUS_PER_TASK": "4"})[0].threads == 4


def test_explicit_torch_threads_win():
    plan = plan_node(node([GPU] + [TIER2] * 8, range(16)), torch_threads=3)
    assert [p.threads for p in plan] == [3] * 9 and all(p.cpus is None for p in plan)
    assert "runtime.torch_threads=3" in plan[0].summary


def test_blocks_are_whole_cores_of_one_socket():
    # 2 sockets x 2 cores x 2 SMT threads, Linux numbering: siblings are c and c + 4
    topo = {c: (c % 4 // 2, c % 2) for c in range(8)}
    assert cpu_order(range(8), topo) == [0, 4, 1, 5, 2, 6, 3, 7]
    plan = plan_node(node([TIER2] * 4, range(8)), topology=topo)
    assert [p.cpus for p in plan] == [(0, 4), (1, 5), (2, 6), (3, 7)]


def test_only_gpu_ranks_share_everything():
    assert [p.threads for p in plan_node(node([GPU, GPU], range(32)))] == [16, 16]


def test_tier2_slots_dealt_by_weights_where_the_memory_allows(capsys):
    """The job deals tier-2 slots by weights, the ranks' measured attention rates or the
    placement's threads (ghmpi/runtime/job.py); a rank's memory budget then scales with its
    weight among its node's tier-2 ranks, and where that does not fit the shares stay equal."""
    from ghmpi.comm.topology import Layout
    from ghmpi.errors import ConfigError
    from ghmpi.runtime.job import dealt_by_weights

    lay = Layout(9, 1, 8, 2, 128, 0)
    threads = shares([TIER2] * 8, 14)  # rank 0 drives the GPU; one node
    leaders = [0] * 9
    scales = {}

    def fits(layout, scale):
        scales.update({r: scale(r) for r in range(1, 9)})

    got = dealt_by_weights(lay, leaders, threads, fits)
    assert got.tier2_weights == (2, 2, 2, 2, 2, 2, 1, 1)
    assert scales[1] == pytest.approx(2 * 8 / 14) and scales[8] == pytest.approx(8 / 14)
    assert [len(got.owned_slots(r)) for r in range(1, 9)] == [37, 37, 37, 37, 36, 36, 18, 18]
    # measured rates, rounded to sixteenths of the fastest: a slow rank gets fewer slots
    measured = dealt_by_weights(lay, leaders, [16, 16, 13, 16, 16, 16, 9, 9], fits)
    slots = [len(measured.owned_slots(r)) for r in range(1, 9)]
    assert sum(slots) == 256 and slots[2] < slots[0] and slots[6] < slots[2]
    # two nodes: the scale is relative to the rank's own node
    dealt_by_weights(lay, [0] * 5 + [5] * 4, [2] * 4 + [1] * 4, fits)
    assert all(scales[r] == pytest.approx(1.0) for r in range(1, 9))

    def too_big(layout, scale):
        raise ConfigError("over budget")
    assert dealt_by_weights(lay, leaders, threads, too_big) is lay
    assert "equal slot shares" in capsys.readouterr().out
    assert dealt_by_weights(lay, leaders, [2] * 8, too_big) is lay  # equal weights: nothing to do

