"""sample(): greedy, top-k/top-p filtering, and draws fixed by (seed, prompt index, position)."""

from __future__ import annotations

import pytest
import torch

from ghmpi.model import sample
from ghmpi.model.sampling import draw_seed

V = 50


def logits_rows(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 2.0  # (n, V)


def test_temperature_zero_and_top_k_one_are_greedy() -> None:
    logits = logits_rows(16)
    idx, pos = torch.arange(16), torch.arange(16) + 3
    greedy = logits.argmax(-1)
    assert torch.equal(sample(logits, idx, pos, 0.0, 0, 1.0, seed=1), greedy)
    for seed in range(3):
        assert torch.equal(sample(logits, idx, pos, 1.5, 1, 1.0, seed=seed), greedy)
        assert torch.equal(sample(logits, idx, pos, 0.7, 5, 1e-6, seed=seed), greedy)  # tiny top_p
    out = sample(logits, idx, pos, 0.0, 0, 1.0, seed=0)
    assert out.dtype == torch.long and out.shape == (16,)


def test_draw_depends_only_on_seed_index_position() -> None:
    """A row's token is the same alone, in any batch, at any row, among any neighbours."""
    row = logits_rows(1, seed=5)[0]
    others = logits_rows(31, seed=6)
    params = dict(temperature=1.2, top_k=30, top_p=0.95, seed=42)
    for index, position in [(0, 0), (7, 13), (123456, 4095)]:
        alone = sample(row[None], torch.tensor([index]), torch.tensor([position]), **params)
        for where in (0, 17, 31):
            batch = torch.cat([others[:where], row[None], others[where:]])  # (32, V)
            idx = torch.randint(0, 1000, (32,), generator=torch.Generator().manual_seed(where))
            pos = torch.randint(0, 1000, (32,), generator=torch.Generator().manual_seed(where + 1))
            idx[where], pos[where] = index, position
            assert sample(batch, idx, pos, **params)[where] == alone[0]


def test_seeds_positions_and_indices_change_draws() -> None:
    flat = torch.zeros(200, V)  # uniform: every draw is pure randomness
    idx, pos = torch.zeros(200, dtype=torch.long), torch.arange(200)
    a = sample(flat, idx, pos, 1.0, 0, 1.0, seed=0)
    b = sample(flat, idx, pos, 1.0, 0, 1.0, seed=1)
    c = sample(flat, idx + 1, pos, 1.0, 0, 1.0, seed=0)
    assert torch.equal(a, sample(flat, idx, pos, 1.0, 0, 1.0, seed=0))
    assert (a != b).float().mean() > 0.8 and (a != c).float().mean() > 0.8
    assert len(set(a.tolist())) > V // 2  # positions scatter over the vocabulary
    assert len({draw_seed(s, i, p) for s in range(4) for i in range(4) for p in range(4)}) == 64


def test_top_k_and_top_p_restrict_the_support() -> None:
    logits = logits_rows(1, seed=9).repeat(400, 1)  # one distribution, 400 independent draws
    idx, pos = torch.arange(400), torch.zeros(400, dtype=torch.long)
    allowed_k = set(logits[0].topk(4).indices.tolist())
    drawn = set(sample(logits, idx, pos, 1.0, 4, 1.0, seed=3).tolist())
    assert drawn <= allowed_k and len(drawn) > 1
    probs = torch.softmax(logits[0], -1)
    order = probs.argsort(descending=True)
    nucleus = order[: int((probs[order].cumsum(0) < 0.6).sum()) + 1]  # smallest set with >= 0.6
    drawn = set(sample(logits, idx, pos, 1.0, 0, 0.6, seed=3).tolist())
    assert drawn <= set(nucleus.tolist()) and len(drawn) > 1
    # without filtering, low-probability tokens do appear
    assert len(set(sample(logits, idx, pos, 1.0, 0, 1.0, seed=3).tolist()) - allowed_k) > 0


def test_bad_parameters_are_rejected() -> None:
    logits = logits_rows(2)
    idx = pos = torch.zeros(2, dtype=torch.long)
    for bad in (dict(temperature=-1.0, top_k=0, top_p=1.0), dict(temperature=1.0, top_k=-2, top_p=1.0),
                dict(temperature=1.0, top_k=0, top_p=0.0)):
        with pytest.raises(ValueError):
            sample(logits, idx, pos, seed=0, **bad)
