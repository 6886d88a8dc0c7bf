"""Attention: the only stage without weights, the one tier 2 runs.

Scaling is 1/sqrt(head_dim) (SDPA's default, as HF). Grouped-query attention maps query head h to
key/value head h // n_rep, as HF `repeat_kv`.
"""

from __future__ import annotations

import functools
import inspect

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


def _sequence_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> torch.Tensor:
    """One sequence's queries over its keys: q (L, n_heads, D), k/v (T, n_kv_heads, D), `kw` the
    mask (is_causal or attn_mask) -> o (L, n_heads * D) in q.dtype. Grouped-query kv heads are
    repeated as HF `repeat_kv` does."""
    L, n_heads, D = q.shape
    n_rep = n_heads // k.shape[1]
    k = k.to(q.dtype)
    v = v.to(q.dtype)
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)  # (T, n_heads, D)
        v = v.repeat_interleave(n_rep, dim=1)
    o = _sdpa(
        q.transpose(0, 1).unsqueeze(0),  # (1, n_heads, L, D)
        k.transpose(0, 1).unsqueeze(0),  # (1, n_heads, T, D)
        v.transpose(0, 1).unsqueeze(0),
        **kw,
    )  # (1, n_heads, L, D)
    return o.squeeze(0).transpose(0, 1).reshape(L, n_heads * D)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of one whole sequence.

    q (L, n_heads, D), k/v (L, n_kv_heads, D) -> o (L, n_heads * D) in q.dtype.
    """
    return _sequence_attention(q, k, v, is_causal=True)


@functools.cache
def _varlen_attn():
    """torch's varlen FlashAttention (torch >= 2.10, CUDA), or None. 2.11 takes causal as
    window_size=(-1, 0); later versions also take enable_gqa."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    return varlen_attn if "window_size" in params else None


@functools.cache
def _varlen_gqa(varlen) -> bool:
    """Whether varlen_attn takes fewer kv heads than query heads as they are (FlashAttention
    supports grouped-query heads natively; some torch versions' wrapper checks shapes)."""
    q = torch.randn(8, 4, 64, device="cuda", dtype=torch.bfloat16)
    kv = q[:, :2].contiguous()
    cu = torch.tensor([0, 3, 8], dtype=torch.int32, device="cuda")
    try:
        got = varlen(q, kv, kv, cu, cu, 5, 5, window_size=(-1, 0))
    except Exception:
        return False
    want = varlen(q, kv.repeat_interleave(2, dim=1), kv.repeat_interleave(2, dim=1), cu, cu, 5, 5,
                  window_size=(-1, 0))
    return bool(torch.equal(got, want))


def packed_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             cu_seqlens: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Causal attention of several whole sequences packed one after another.

    q (n, n_heads, D), k/v (n, n_kv_heads, D) with n = sum(lengths); cu_seqlens (S+1,) int32 on
    q's device, the running sums of `lengths` (host list). -> o (n, n_heads * D) in q.dtype.
    bf16/fp16 on a GPU: one varlen FlashAttention call for all sequences, no per-sequence loop and
    no copy for grouped-query heads. float32 or CPU: the exact per-sequence SDPA path.
    """
    n, n_heads, D = q.shape
    fast = q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
    varlen = _varlen_attn() if fast else None  # its import alone costs seconds: GPUs only
    if varlen is not None:
        most = max(lengths)
        k, v = k.to(q.dtype), v.to(q.dtype)
        if not _varlen_gqa(varlen) and k.shape[1] != n_heads:
            k = k.repeat_interleave(n_heads // k.shape[1], dim=1)  # (n, n_heads, D)
            v = v.repeat_interleave(n_heads // v.shape[1], dim=1)
        o = varlen(q, k, v, cu_seqlens, cu_seqlens, most, most, window_size=(-1, 0))
        return o.reshape(n, n_heads * D)  # o: (n, n_heads, D)
    o = torch.empty(n, n_heads * D, dtype=q.dtype, device=q.device)
    at = 0
    for L in lengths:
        o[at:at + L] = prefill_attention(q[at:at + L], k[at:at + L], v[at:at + L])
        at += L
    return o


def chunk_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int
                            ) -> torch.Tensor:
    """A chunk of a prompt over the prompt so far: q (L, n_heads, D) at positions start ..
    start+L-1; k/v (start+L, n_kv_heads, D), the cached prefix and the chunk itself. Query i sees
    keys 0 .. start+i. -> o (L, n_heads * D) in q.dtype."""
    L, T = q.shape[0], k.shape[0]
    keep = (torch.arange(T, device=q.device)[None, :]
            <= start + torch.arange(L, device=q.device)[:, None])  # (L, T)
    return _sequence_attention(q, k, v, attn_mask=keep)


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


@functools.cache
def _cuda_decode_kernel():
    """The Triton decode kernel, or None (no Triton, or GHMPI_GPU_KERNEL=torch)."""
    import os

    if os.environ.get("GHMPI_GPU_KERNEL", "") == "torch":
        return None
    try:
        from ghmpi.kernels.triton_decode import decode_attention_cuda
    except Exception:  # no triton: the torch path below
        return None
    return decode_attention_cuda


def gpu_decode_path() -> str:
    """Which decode attention runs on a CUDA tier 1 (for the start-up log line)."""
    return "triton (in place on the cache)" if _cuda_decode_kernel() else "torch SDPA (gathered)"


def cached_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            slots: torch.Tensor, lengths: torch.Tensor, max_ctx: int
                            ) -> torch.Tensor:
    """One new token per row over positions [0, lengths[b]) of cache slot slots[b].

    q (B, n_heads, D); k_cache/v_cache (n_slots, max_len, n_kv_heads, D); slots, lengths (B,) long
    on the cache's device; max_ctx >= max(lengths), known on the host. -> (B, n_heads * D) in
    q.dtype. On a GPU the Triton kernel attends where the cache lies (no copy of any context);
    elsewhere, or without it, torch SDPA attends on a gathered copy of the first max_ctx positions.
    """
    kernel = _cuda_decode_kernel() if q.is_cuda else None
    if kernel is not None:
        return kernel(q, k_cache, v_cache, slots, lengths, max_ctx)
    k_ctx = k_cache[:, :max_ctx].index_select(0, slots)  # (B, T, n_kv, D): slice, then gather
    v_ctx = v_cache[:, :max_ctx].index_select(0, slots)
    return decode_attention(q, k_ctx, v_ctx, lengths)


def warm_up_cuda(args, dtype: torch.dtype, device: torch.device) -> None:
    """Import and compile the GPU kernels now, before the job's clock starts: the varlen import
    costs seconds, and every Triton specialisation compiles once (then lives in Triton's cache)."""
    if dtype in (torch.bfloat16, torch.float16) and _varlen_attn() is not None:
        _varlen_gqa(_varlen_attn())
    if _cuda_decode_kernel() is None:
        return
    H, KV, D = args.n_heads, args.n_kv_heads, args.head_dim
    kc = torch.randn(2, 1024, KV, D, device=device, dtype=dtype)
    q = torch.randn(2, H, D, device=device, dtype=dtype)
    slots = torch.arange(2, device=device)
    lengths = torch.full((2,), 1024, device=device)
    cached_decode_attention(q, kc, kc, slots, lengths, 1024)  # few rows: split + combine
    many = torch.zeros(512, dtype=torch.long, device=device)
    cached_decode_attention(q[:1].expand(512, H, D).contiguous(), kc, kc, many, many + 1, 1)
