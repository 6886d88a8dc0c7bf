"""The elementwise work of a layer fused into single passes over memory (Triton, CUDA, bf16/fp16).

As torch ops, RMSNorm is ~7 kernels (upcast, square, mean, add, rsqrt, multiply, downcast, scale),
RoPE ~10 per tensor and SiLU-gate 3: at decode batch sizes each is a launch and a round trip
through HBM for a few KiB of work. Here each is one kernel that reads its inputs once, computes in
float32 and rounds once. The numbers are those of the torch path up to that rounding (torch rounds
after every op), which only matters in float32: float32 keeps the torch path, exact to HF.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(X, Y, W, H, OUT, dim, stride_x, stride_y, stride_h, stride_o, eps,
                         HAS_Y: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < dim
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_Y:  # residual: h = x + y, rounded to the activations' dtype as torch does
        x = (x.to(tl.float32) + tl.load(Y + row * stride_y + offs, mask=mask, other=0.0)
             .to(tl.float32)).to(X.dtype.element_ty)
        tl.store(H + row * stride_h + offs, x, mask=mask)
    h = x.to(tl.float32)
    r = tl.rsqrt(tl.sum(h * h, 0) / dim + eps)
    n = (h * r).to(X.dtype.element_ty).to(tl.float32)  # HF: normalise in float32, cast back
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * stride_o + offs, (w * n).to(OUT.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + y (or x), out = rms_norm(h) * weight; x, y (n, dim) -> (h, out)."""
    n, dim = x.shape
    out = torch.empty_like(x)
    h = torch.empty_like(x) if y is not None else x
    if n:
        _add_rms_norm_kernel[(n,)](x, y if y is not None else x, weight, h, out, dim,
                                   x.stride(0), (y if y is not None else x).stride(0),
                                   h.stride(0), out.stride(0), eps, HAS_Y=y is not None,
                                   BLOCK=triton.next_power_of_2(dim), num_warps=8)
    return h, out


@triton.jit
def _rope_kernel(X, COS, SIN, OUT, n_heads, stride_xt, stride_xh, stride_ct, stride_ot,
                 stride_oh, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HALF)
    hmask = offs_h[:, None] < n_heads
    base = X + t * stride_xt + offs_h[:, None] * stride_xh
    x1 = tl.load(base + offs_d[None, :], mask=hmask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + offs_d[None, :], mask=hmask, other=0.0).to(tl.float32)
    c1 = tl.load(COS + t * stride_ct + offs_d).to(tl.float32)[None, :]
    c2 = tl.load(COS + t * stride_ct + HALF + offs_d).to(tl.float32)[None, :]
    s1 = tl.load(SIN + t * stride_ct + offs_d).to(tl.float32)[None, :]
    s2 = tl.load(SIN + t * stride_ct + HALF + offs_d).to(tl.float32)[None, :]
    o = OUT + t * stride_ot + offs_h[:, None] * stride_oh
    tl.store(o + offs_d[None, :], (x1 * c1 - x2 * s1).to(OUT.dtype.element_ty), mask=hmask)
    tl.store(o + HALF + offs_d[None, :], (x2 * c2 + x1 * s2).to(OUT.dtype.element_ty), mask=hmask)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (n, heads, D) (may be a strided view), cos/sin (n, D) -> rotated, contiguous."""
    n, heads, D = x.shape
    out = torch.empty((n, heads, D), dtype=x.dtype, device=x.device)
    if n:
        _rope_kernel[(n,)](x, cos, sin, out, heads, x.stride(0), x.stride(1), cos.stride(0),
                           out.stride(0), out.stride(1), HALF=D // 2,
                           BLOCK_H=triton.next_power_of_2(heads), num_warps=4)
    return out


@triton.jit
def _silu_mul_kernel(GU, OUT, hidden, stride_g, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < hidden
    g = tl.load(GU + row * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + row * stride_g + hidden + offs, mask=mask, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(OUT.dtype.element_ty).to(tl.float32)
    tl.store(OUT + row * stride_o + offs, (s * u).to(OUT.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up (n, 2 * hidden) = [gate | up] -> silu(gate) * up, (n, hidden)."""
    n, two_h = gate_up.shape
    hidden = two_h // 2
    out = torch.empty((n, hidden), dtype=gate_up.dtype, device=gate_up.device)
    if n:
        block = 1024
        _silu_mul_kernel[(n, triton.cdiv(hidden, block))](gate_up, out, hidden, gate_up.stride(0),
                                                          out.stride(0), BLOCK=block, num_warps=4)
    return out
