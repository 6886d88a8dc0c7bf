"""Next-token choice: greedy, or temperature / top-k / top-p sampling with per-draw seeds.

Each draw's randomness comes from a CPU `torch.Generator` seeded only by (seed, prompt index,
position), so a prompt's completion is the same whichever batch, row, rank or device it ran in,
and a resumed job reproduces it exactly.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def draw_seed(seed: int, prompt_index: int, position: int) -> int:
    """A 64-bit seed mixing the three numbers (each through splitmix64, so nearby values scatter)."""
    h = _splitmix64(seed & _MASK64)
    h = _splitmix64(h ^ (prompt_index & _MASK64))
    return _splitmix64(h ^ (position & _MASK64))


def uniforms(seed: int, prompt_index: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """One float64 uniform in [0, 1) per row, (B,) on the CPU."""
    out = torch.empty(prompt_index.shape[0], dtype=torch.float64)
    g = torch.Generator(device="cpu")
    for b, (i, p) in enumerate(zip(prompt_index.tolist(), position.tolist())):
        g.manual_seed(draw_seed(seed, i, p))
        out[b] = torch.rand((), generator=g, dtype=torch.float64)
    return out


def sample(logits: torch.Tensor, prompt_index: torch.Tensor, position: torch.Tensor,
           temperature: float, top_k: int, top_p: float, seed: int) -> torch.Tensor:
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
    u = uniforms(seed, prompt_index, position).to(logits.device) * cdf[:, -1]
    choice = torch.searchsorted(cdf, u[:, None], right=True).clamp_(max=k - 1)  # (B, 1)
    return idx.gather(-1, choice).squeeze(-1)
