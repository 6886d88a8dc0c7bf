"""Attention: the only stage without weights, the one tier 2 runs.

Scaling is 1/sqrt(head_dim) (SDPA's default, as HF). Grouped-query attention maps query head h to
key/value head h // n_rep, as HF `repeat_kv`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# Every prompt length and every decode context length is a new shape. cuDNN's attention (chosen
# by default for bf16/fp16 on Hopper) builds an execution plan per new shape, ~10 ms each: with
# shapes that never repeat that dominated a whole bf16 job (bench/RESULTS.md). The other kernels
# take any shape as it comes.
_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> torch.Tensor:
    if q.is_cuda:
        with sdpa_kernel(_BACKENDS):
            return F.scaled_dot_product_attention(q, k, v, **kw)
    return F.scaled_dot_product_attention(q, k, v, **kw)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of one whole sequence.

    q (L, n_heads, D), k/v (L, n_kv_heads, D) -> o (L, n_heads * D) in q.dtype.
    """
    L, n_heads, D = q.shape
    n_rep = n_heads // k.shape[1]
    k = k.to(q.dtype)
    v = v.to(q.dtype)
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)  # (L, n_heads, D)
        v = v.repeat_interleave(n_rep, dim=1)
    o = _sdpa(
        q.transpose(0, 1).unsqueeze(0),  # (1, n_heads, L, D)
        k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0),
        is_causal=True,
    )  # (1, n_heads, L, D)
    return o.squeeze(0).transpose(0, 1).reshape(L, n_heads * D)


def decode_attention(q: torch.Tensor, k_ctx: torch.Tensor, v_ctx: torch.Tensor,
                     lengths: torch.Tensor, compute_dtype: torch.dtype | None = None
                     ) -> torch.Tensor:
    """One new token per row over its cached context.

    q (B, n_heads, D); k_ctx/v_ctx (B, T, n_kv_heads, D) in any dtype, may be strided views;
    lengths (B,) long: row b attends over k_ctx[b, :lengths[b]]. -> o (B, n_heads * D) in q.dtype.
    The math runs in `compute_dtype`, default q.dtype (K/V are cast to it). Passing the cache's
    dtype instead skips materialising an upcast copy of the whole context, which on a CPU costs
    far more than the attention itself; SDPA still accumulates reduced types in float32.

    The query heads of one kv group are laid out as that group's "query positions", so K and V are
    used once per kv head and never copied n_rep times: the CPU tier is bound by memory traffic.
    """
    B, n_heads, D = q.shape
    T, n_kv = k_ctx.shape[1], k_ctx.shape[2]
    n_rep = n_heads // n_kv
    dtype = q.dtype if compute_dtype is None else compute_dtype
    k = k_ctx.to(dtype).transpose(1, 2)  # (B, n_kv, T, D)
    v = v_ctx.to(dtype).transpose(1, 2)
    qg = q.to(dtype).reshape(B, n_kv, n_rep, D)  # (B, n_kv, n_rep, D): head h = group h // n_rep
    keep = torch.arange(T, device=q.device)[None, :] < lengths.to(q.device)[:, None]  # (B, T)
    o = _sdpa(qg, k, v, attn_mask=keep.view(B, 1, 1, T))  # (B, n_kv, n_rep, D)
    return o.reshape(B, n_heads * D).to(q.dtype)
