"""Rotary position embeddings, computed exactly as Hugging Face transformers does.

HF convention: the head dimension is split in two halves (`rotate_half`), not interleaved pairs;
cos/sin are computed in float32 from `inv_freq` and the position, then cast to the compute dtype.
Computing them per position on demand (instead of a table) keeps every value bit-identical to HF.
"""

from __future__ import annotations

import math

import torch

from ghmpi.model.args import ModelArgs


def inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,) float32 on the CPU, with linear/llama3 scaling."""
    dim = args.head_dim
    base = args.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
    scaling = args.rope_scaling
    if scaling is None:
        return freqs
    if scaling["rope_type"] == "linear":
        return freqs / scaling["factor"]
    if scaling["rope_type"] == "llama3":
        return _llama3(freqs, scaling)
    raise ValueError(f"rope type {scaling['rope_type']!r} is not supported")


def _llama3(freqs: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1 frequency scaling: long wavelengths divided by `factor`, short ones kept, the
    band in between interpolated smoothly (same arithmetic as transformers)."""
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / factor, freqs)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class Rotary:
    """cos/sin for given positions on one device. Remembers the last positions tensor it saw, so
    the layers of one step (which share it) compute cos/sin once."""

    def __init__(self, args: ModelArgs, device: torch.device) -> None:
        self.inv_freq = inv_freq(args).to(device)  # (head_dim // 2,) float32
        self._last: tuple[torch.Tensor, int, torch.dtype] | None = None
        self._cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None

    def forget(self) -> None:
        """Drop the remembered cos/sin (before capturing a CUDA graph, which must compute them)."""
        self._last = self._cos_sin = None

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (n,) long -> cos, sin each (n, head_dim) in `dtype`."""
        last = self._last
        # `_version` changes on any in-place write, so a reused-but-modified tensor is recomputed.
        if (last is not None and last[0] is positions and last[1] == positions._version
                and last[2] == dtype and self._cos_sin is not None):
            return self._cos_sin
        freqs = positions[:, None].float() * self.inv_freq  # (n, head_dim // 2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (n, head_dim)
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        self._last = (positions, positions._version, dtype)
        self._cos_sin = (cos, sin)
        return cos, sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (n, heads, head_dim); cos/sin (n, head_dim) -> rotated x, same shape and dtype."""
    cos = cos.unsqueeze(1)  # (n, 1, head_dim), broadcast over heads
    sin = sin.unsqueeze(1)
    return (x * cos) + (rotate_half(x) * sin)
