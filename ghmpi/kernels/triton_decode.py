"""Decode attention on a CUDA GPU, in place on the KV cache (Triton).

One new query token per row attends over positions [0, lengths[b]) of its cache slot, read where
it lies in the cache (n_slots, max_len, n_kv_heads, D): no row's context is ever copied. One
program handles one (row, kv head, context split): it loads the n_rep query heads of that kv
group as one tile, so every K/V byte is read once for all of them (grouped-query attention), and
runs an online softmax over tiles of BLOCK_N positions. With few rows (small batches, long
contexts) the context is cut into splits whose partial results are combined by a second kernel
(flash-decoding), so the GPU has enough programs to stream HBM at full rate.

float32 uses IEEE products (no tf32), so it is the same function as the torch path up to the
order of the additions; bf16/fp16 accumulate in float32, as SDPA does.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class Launch:
    """Tile and pipeline shape of the decode kernel (see `bench/triton_decode_sweep.py`)."""

    block_n: int = 64  # positions per tile
    num_warps: int = 2
    num_stages: int = 3
    split_target: int = 4  # aim for this many programs per multiprocessor (flash-decoding)


# From the sweep on the H100 (bench/results/h100-2026-11-23-tune/sweep.json): 64 x 2 warps x 3
# stages is within 6% of the best shape at every batch of 16-810 rows and contexts 512-4096
# (0.88-0.93 of the copy bandwidth at 256-810 rows); a handful of (row, kv head) pairs streams
# faster in narrow tiles, more of them in flight.
LAUNCH = Launch()
LAUNCH_FEW = Launch(block_n=16, num_warps=1, num_stages=4)


def launch_for(rows: int, n_kv: int) -> Launch:
    return LAUNCH_FEW if rows * n_kv <= 16 else LAUNCH


@triton.jit
def _decode_kernel(Q, K, V, Slots, Lens, O, MidO, MidLSE,
                   stride_qb, stride_qh,
                   stride_ks, stride_kt, stride_kh,
                   stride_vs, stride_vt, stride_vh,
                   stride_ob, stride_oh,
                   split_len, num_splits, sm_scale,
                   N_REP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
                   IEEE: tl.constexpr):
    b = tl.program_id(0)
    g = tl.program_id(1)
    s = tl.program_id(2)
    slot = tl.load(Slots + b).to(tl.int64)
    length = tl.load(Lens + b).to(tl.int32)
    start = s * split_len
    end = tl.minimum(start + split_len, length)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    hmask = offs_h < N_REP
    dmask = offs_d < HEAD_DIM
    heads = g * N_REP + offs_h  # (BLOCK_H,) query heads of kv group g
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=hmask[:, None] & dmask[None, :], other=0.0)  # (BLOCK_H, BLOCK_D)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    k_base = K + slot * stride_ks + g * stride_kh
    v_base = V + slot * stride_vs + g * stride_vh
    for n in range(start, end, BLOCK_N):
        pos = n + offs_n
        pmask = pos < end
        kv_mask = pmask[:, None] & dmask[None, :]
        k = tl.load(k_base + pos[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = tl.where(pmask[None, :], qk * sm_scale, float("-inf"))  # (BLOCK_H, BLOCK_N)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + pos[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    omask = hmask[:, None] & dmask[None, :]
    if not SPLIT:
        out = acc / l_i[:, None]
        tl.store(O + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=omask)
    else:
        # partial result of this split: normalised output and its log-sum-exp (-inf if empty)
        safe_l = tl.where(l_i > 0, l_i, 1.0)
        out = acc / safe_l[:, None]
        lse = tl.where(l_i > 0, m_i + tl.log(safe_l), float("-inf"))
        row = b * (tl.num_programs(1) * N_REP) + heads  # (BLOCK_H,) index into (B * H)
        tl.store(MidO + (row[:, None] * num_splits + s) * BLOCK_D + offs_d[None, :], out,
                 mask=omask)
        tl.store(MidLSE + row * num_splits + s, lse, mask=hmask)


@triton.jit
def _combine_kernel(MidO, MidLSE, O, n_heads, stride_ob, stride_oh, num_splits,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    row = tl.program_id(0)  # b * n_heads + h
    b = row // n_heads
    h = row % n_heads
    offs_s = tl.arange(0, BLOCK_S)
    smask = offs_s < num_splits
    offs_d = tl.arange(0, BLOCK_D)
    lse = tl.load(MidLSE + row * num_splits + offs_s, mask=smask, other=float("-inf"))
    m = tl.max(lse, 0)  # a row always has a non-empty first split
    w = tl.exp(lse - m)  # empty splits weigh 0
    o = tl.load(MidO + (row * num_splits + offs_s[:, None]) * BLOCK_D + offs_d[None, :],
                mask=smask[:, None], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(O + b * stride_ob + h * stride_oh + offs_d, out.to(O.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


_MAX_SPLITS = 64


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_splits(rows: int, n_kv: int, max_ctx: int, device: torch.device,
               launch: Launch = LAUNCH) -> int:
    """Context splits per (row, kv head): enough programs to fill the GPU, >= 4 tiles each."""
    want = -(-launch.split_target * _sm_count(device.index or 0) // max(rows * n_kv, 1))
    most = max(1, -(-max_ctx // (4 * launch.block_n)))
    return max(1, min(want, most, _MAX_SPLITS))


def decode_attention_cuda(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          slots: torch.Tensor, lengths: torch.Tensor, max_ctx: int,
                          launch: Launch | None = None) -> torch.Tensor:
    """q (B, H, D); k_cache/v_cache (n_slots, max_len, KV, D); slots, lengths (B,) on the GPU;
    max_ctx >= max(lengths), known on the host (no sync). -> o (B, H * D) in q.dtype.
    The launch depends on the host numbers only (B, max_ctx), so a CUDA graph may capture it
    with max_ctx = the cache's length and replay it for any lengths."""
    B, H, D = q.shape
    KV = k_cache.shape[2]
    n_rep = H // KV
    q = q.contiguous() if q.stride(-1) != 1 else q
    o = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    if B == 0:
        return o.view(B, H * D)
    if q.dtype != k_cache.dtype:
        q = q.to(k_cache.dtype)  # tl.dot wants one operand type; results go back to o's dtype
    block_d = triton.next_power_of_2(D)
    block_h = max(16, triton.next_power_of_2(n_rep))
    launch = launch or launch_for(B, KV)
    splits = num_splits(B, KV, max_ctx, q.device, launch)
    split_len = -(-max(max_ctx, 1) // splits)
    split_len = -(-split_len // launch.block_n) * launch.block_n
    ieee = k_cache.dtype == torch.float32
    if splits > 1:
        mid_o = torch.empty(B * H, splits, block_d, dtype=torch.float32, device=q.device)
        mid_lse = torch.empty(B * H, splits, dtype=torch.float32, device=q.device)
    else:
        mid_o = mid_lse = o  # unused
    _decode_kernel[(B, KV, splits)](
        q, k_cache, v_cache, slots, lengths, o, mid_o, mid_lse,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        o.stride(0), o.stride(1),
        split_len, splits, 1.0 / math.sqrt(D),
        N_REP=n_rep, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_H=block_h, BLOCK_N=launch.block_n,
        SPLIT=splits > 1, IEEE=ieee, num_warps=launch.num_warps, num_stages=launch.num_stages)
    if splits > 1:
        _combine_kernel[(B * H,)](mid_o, mid_lse, o, H, o.stride(0), o.stride(1), splits,
                                  HEAD_DIM=D, BLOCK_D=block_d, BLOCK_S=_MAX_SPLITS)
    return o.view(B, H * D)
