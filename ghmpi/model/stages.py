"""Stage compositions for tests: a prompt batch's prefill and one decode step through a whole
model and its KVCache. The reference generator (admission, stop rules, sampling) is the job's own
scheduler and pass: `ghmpi.runtime.reference.generate`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ghmpi.model.attention import prefill_attention
from ghmpi.model.kvcache import KVCache
from ghmpi.model.llama import Transformer


def prefill(model: Transformer, cache: KVCache, prompts: Sequence[Sequence[int]],
            slots: Sequence[int]) -> torch.Tensor:
    """Run prompts token-packed through every layer, filling their cache slots from position 0.
    -> logits (len(prompts), vocab) float32 of each prompt's last token."""
    dev = model.device
    lens = [len(p) for p in prompts]
    tokens = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=dev)  # (n,)
    positions = torch.cat([torch.arange(n, device=dev) for n in lens])  # (n,)
    bounds = [0]
    for n in lens:
        bounds.append(bounds[-1] + n)
    x = model.embed(tokens)  # (n, dim)
    for layer in model.layers:
        q, k, v = model.pre_attention(layer, x, positions)
        o = torch.empty(x.shape[0], q.shape[1] * q.shape[2], dtype=q.dtype, device=dev)
        for slot, s, e in zip(slots, bounds[:-1], bounds[1:]):
            cache.write(layer, slot, 0, k[s:e], v[s:e])
            o[s:e] = prefill_attention(q[s:e], k[s:e], v[s:e])
        x = model.post_attention(layer, x, o)
    last = torch.tensor(bounds[1:], device=dev) - 1
    return model.classify(x[last])


def decode_step(model: Transformer, cache: KVCache, tokens: torch.Tensor, slots: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor:
    """One token per row: tokens, slots, positions (B,) long -> logits (B, vocab) float32."""
    x = model.embed(tokens)  # (B, dim)
    ctx_len = int(positions.max()) + 1
    for layer in model.layers:
        q, k, v = model.pre_attention(layer, x, positions)
        o = cache.decode(layer, slots, positions, q, k, v, ctx_len=ctx_len)
        x = model.post_attention(layer, x, o)
    return model.classify(x)
