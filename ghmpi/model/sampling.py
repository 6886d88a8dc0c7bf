"""Next-token choice: greedy, or temperature / top-k / top-p sampling with per-draw seeds.

Each draw's randomness comes from a CPU `torch.Generator` seeded only by (seed, prompt index,
sample index, position), so a prompt's completion is the same whichever batch, row, rank or device
it ran in, and a resumed job reproduces it exactly. Sample 0 draws as a single-sample job always
did; sample s > 0 mixes s in, so the n samples of a prompt are distinct streams.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def draw_seed(seed: int, prompt_index: int, position: int, sample: int = 0) -> int:
    """A 64-bit seed mixing the numbers (each through splitmix64, so nearby values scatter)."""
    h = _splitmix64(seed & _MASK64)
    h = _splitmix64(h ^ (prompt_index & _MASK64))
    if sample:
        h = _splitmix64(h ^ (sample & _MASK64) ^ 0x5A4D504C45000000)  # "SAMPLE"
    return _splitmix64(h ^ (position & _MASK64))


def uniforms(seed: int | torch.Tensor, prompt_index: torch.Tensor, position: torch.Tensor,
             sample: torch.Tensor | None = None) -> torch.Tensor:
    """One float64 uniform in [0, 1) per row, (B,) on the CPU. `seed` is one for all rows or
    (B,); `sample` (B,) sample indices (default 0)."""
    B = prompt_index.shape[0]
    seeds = seed.tolist() if isinstance(seed, torch.Tensor) else [seed] * B
    samples = sample.tolist() if sample is not None else [0] * B
    out = torch.empty(B, dtype=torch.float64)
    g = torch.Generator(device="cpu")
    for b, (i, p) in enumerate(zip(prompt_index.tolist(), position.tolist())):
        g.manual_seed(draw_seed(seeds[b], i, p, samples[b]))
        out[b] = torch.rand((), generator=g, dtype=torch.float64)
    return out


def sample(logits: torch.Tensor, prompt_index: torch.Tensor, position: torch.Tensor,
           temperature: float, top_k: int, top_p: float, seed: int | torch.Tensor,
           sample_index: torch.Tensor | None = None) -> torch.Tensor:
    """logits (B, V) float32; prompt_index, position (B,) long -> next tokens (B,) long on
    logits.device. temperature 0 is greedy; top_k 0 and top_p 1.0 are off. Applied in HF's
    order: temperature, top-k, top-p, then one draw by inverse CDF from the row's own uniform."""
    if temperature < 0 or top_k < 0 or not (0.0 < top_p <= 1.0):
        raise ValueError(f"bad sampling parameters: temperature={temperature}, top_k={top_k}, "
                         f"top_p={top_p}")
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1)
    V = logits.shape[-1]
    scaled = logits.float() / temperature
    k = V if top_k == 0 else min(top_k, V)
    vals, idx = scaled.topk(k, dim=-1) if k < V else scaled.sort(dim=-1, descending=True)
    probs = torch.softmax(vals, dim=-1)  # (B, k), descending
    if top_p < 1.0:
        before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
        probs = probs.masked_fill(before >= top_p, 0.0)  # the first token always survives
    cdf = probs.double().cumsum(dim=-1)  # (B, k)
    u = uniforms(seed, prompt_index, position, sample_index).to(logits.device) * cdf[:, -1]
    choice = torch.searchsorted(cdf, u[:, None], right=True).clamp_(max=k - 1)  # (B, 1)
    return idx.gather(-1, choice).squeeze(-1)


def sample_rows(logits: torch.Tensor, prompt_index: torch.Tensor, position: torch.Tensor,
                sample_index: torch.Tensor, temperature: list[float], top_k: list[int],
                top_p: list[float], seed: torch.Tensor) -> torch.Tensor:
    """`sample` with each row's own settings (lists of B) and seed (B,): rows sharing settings
    are drawn together; each draw still depends only on its row's numbers."""
    B = logits.shape[0]
    out = torch.empty(B, dtype=torch.long, device=logits.device)
    groups: dict[tuple[float, int, float], list[int]] = {}
    for b in range(B):
        groups.setdefault((temperature[b], top_k[b], top_p[b]), []).append(b)
    for (t, k, p), rows in groups.items():
        if len(rows) == B:
            return sample(logits, prompt_index, position, t, k, p, seed, sample_index)
        idx = torch.tensor(rows, dtype=torch.long)
        out[idx.to(logits.device)] = sample(logits[idx.to(logits.device)], prompt_index[idx],
                                            position[idx], t, k, p, seed[idx], sample_index[idx])
    return out
