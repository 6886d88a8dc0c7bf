"""Tensors to bytes and back, and the plan of a pass as header words.

The bridge between the math (torch tensors, maybe on a GPU) and the transport (uint8 numpy
buffers). Activations travel in the tier-1 compute dtype; bfloat16 has no numpy type, so every
payload is raw bytes reinterpreted on arrival.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from ghmpi.comm.transport import frame_size, unpack, write_header
from ghmpi.runtime.scheduler import Row


class WireFormat:
    def __init__(self, dtype: torch.dtype, pinned: bool = False):
        self.dtype = dtype
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        self.pinned = pinned  # host buffers are page-locked: GPU copies to them are async DMA

    def alloc(self, nbytes: int) -> np.ndarray:
        """Host memory for message buffers: page-locked beside a GPU, else plain."""
        if self.pinned:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).numpy()
        return np.empty(nbytes, dtype=np.uint8)

    def _joined(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """The parts' bytes back to back, as one uint8 tensor on their device."""
        flat = [t.reshape(-1).to(self.dtype) for t in parts]
        if not flat:
            return torch.empty(0, dtype=torch.uint8)
        joined = torch.cat(flat) if len(flat) > 1 else flat[0].contiguous()
        return joined.view(torch.uint8)

    def to_bytes(self, parts: Sequence[torch.Tensor]) -> np.ndarray:
        """CPU tensors' bytes as one uint8 array (no copy for a single contiguous part)."""
        return self._joined(parts).cpu().numpy()

    def frame(self, header: Sequence[int], parts: Sequence[torch.Tensor],
              buffer: Callable[[int], np.ndarray], sync: bool = True) -> np.ndarray:
        """Header words, then the parts' bytes, written into `buffer(size)`; on a GPU the bytes go
        straight into the (pinned) buffer and the stream is synchronised before it is sent
        (`sync=False`: the caller synchronises once for a batch of messages)."""
        joined = self._joined(parts)
        buf = buffer(frame_size(len(header), joined.numel()))
        at = write_header(buf, header)
        if joined.numel():
            torch.from_numpy(buf[at:]).copy_(joined, non_blocking=self.pinned)
            if sync and joined.device.type == "cuda":
                torch.cuda.current_stream(joined.device).synchronize()
        return buf

    def from_bytes(self, buf: np.ndarray, shape: tuple[int, ...], device: torch.device | str
                   ) -> torch.Tensor:
        """View the first prod(shape) elements of `buf` as a tensor of `shape` on `device`."""
        n = int(np.prod(shape))
        if n == 0:
            return torch.empty(shape, dtype=self.dtype, device=device)
        t = torch.frombuffer(buf[:n * self.itemsize], dtype=self.dtype).view(shape)
        # from a pinned buffer the copy is asynchronous: the caller must not refill `buf` before
        # the stream has passed it (tier 1 synchronises before posting the next receive)
        return t.to(device, non_blocking=self.pinned)

    def split(self, buf: np.ndarray, shapes: Sequence[tuple[int, ...]]) -> list[torch.Tensor]:
        """Cut a payload into CPU tensors of the given shapes, in order (views, no copy)."""
        out, at = [], 0
        for shape in shapes:
            n = int(np.prod(shape)) * self.itemsize
            out.append(self.from_bytes(buf[at:at + n], shape, "cpu"))
            at += n
        return out


def rows_header(mb: int, rows: list[Row]) -> list[int]:
    """Header words describing micro-batch `mb`'s pass: (mb, R, then 5 words per row)."""
    words = [mb, len(rows)]
    for r in rows:
        words += [r.slot, r.index, r.start, r.ntok, int(r.prefill)]
    return words


def rows_from_header(header: np.ndarray) -> tuple[int, list[Row]]:
    mb, n = int(header[0]), int(header[1])
    cells = header[2:2 + 5 * n].reshape(n, 5)
    rows = [Row(int(s), int(i), int(st), np.empty(int(nt), dtype=np.int64), bool(pf))
            for s, i, st, nt, pf in cells]
    return mb, rows


@dataclass(frozen=True)
class Work:
    """One tier-1 -> tier-2 message: decode rows to attend, prompt K/V to store."""

    mb: int
    layer: int
    dec_slots: np.ndarray  # (n_dec,) slots of the decode rows
    dec_pos: np.ndarray  # (n_dec,) position of each row's new token
    fill_slots: np.ndarray  # (n_fill,) slots receiving a prompt's K/V
    fill_len: np.ndarray  # (n_fill,) prompt lengths (stored from position 0)
    q: torch.Tensor  # (n_dec, H, D)
    k: torch.Tensor  # (n_dec, KV, D)
    v: torch.Tensor  # (n_dec, KV, D)
    kf: torch.Tensor  # (sum fill_len, KV, D)
    vf: torch.Tensor  # (sum fill_len, KV, D)


def encode_work(wire: WireFormat, mb: int, layer: int, dec_slots: Sequence[int],
                dec_pos: Sequence[int], fill_slots: Sequence[int], fill_len: Sequence[int],
                q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kf: Sequence[torch.Tensor], vf: Sequence[torch.Tensor],
                buffer: Callable[[int], np.ndarray] | None = None, sync: bool = True) -> np.ndarray:
    header = [mb, layer, len(dec_slots), len(fill_slots), *dec_slots, *dec_pos, *fill_slots, *fill_len]
    return wire.frame(header, [q, k, v, *kf, *vf], buffer or wire.alloc, sync)


def decode_work(wire: WireFormat, buf: np.ndarray, n_heads: int, n_kv_heads: int,
                head_dim: int) -> Work:
    header, payload = unpack(buf)
    mb, layer, n_dec, n_fill = (int(w) for w in header[:4])
    w = header[4:]
    fill_len = w[2 * n_dec + n_fill:2 * n_dec + 2 * n_fill]
    n_kv = int(fill_len.sum())
    H, KV, D = n_heads, n_kv_heads, head_dim
    q, k, v, kf, vf = wire.split(payload, [(n_dec, H, D), (n_dec, KV, D), (n_dec, KV, D),
                                           (n_kv, KV, D), (n_kv, KV, D)])
    return Work(mb, layer, w[:n_dec], w[n_dec:2 * n_dec], w[2 * n_dec:2 * n_dec + n_fill],
                fill_len, q, k, v, kf, vf)
