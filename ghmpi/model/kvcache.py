"""The key/value cache: one preallocated buffer per layer, written in place.

Allocated once at its largest size. On the CPU the buffers are 2 MiB aligned and advised as
transparent huge pages where Linux allows (`host_buffer`), and either left to be committed by the
kernel page by page as they are first written (a cache sized for the worst case costs memory only
as it fills), or committed at once (`commit=True`, tier 2: zeroed when the job starts, while tier 1
loads its weights, instead of a page fault every few KiB of the prompts' K/V in the timed job; a
cache that does not fit fails at the start, not midway).

On the CPU, decode runs the native kernel (ghmpi.kernels) where it builds: it reads each row's own
slot up to its own length, so nothing past a row's length is ever read. The rest of this note is
about the torch fallback, whose batched decode attends every row over the same number of positions
T and masks each row's tail. A masked position still enters SDPA's `p @ V` with p = 0, and 0 * NaN is NaN, so the tail must hold
finite numbers, never allocator garbage. On the CPU each (layer, slot) keeps a high-water mark of
positions ever written or zeroed, and the gap up to T is zeroed (in chunks) before it is read:
every position is zeroed at most once, and pages are still committed only as contexts grow. Other
devices commit everything at allocation anyway, so there the cache starts zeroed.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Sequence

import torch

from ghmpi import kernels
from ghmpi.model.attention import (cached_decode_attention, chunk_prefill_attention,
                                   decode_attention)

_ZERO_CHUNK = 64  # positions zeroed at a time ahead of a slot's high-water mark


_HUGE = 2 << 20  # a transparent huge page on x86-64 and most arm64 kernels
_MADV_HUGEPAGE = 14


def host_buffer(n: int, dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """n elements of host memory, uncommitted: -> (a 1-D tensor starting on a 2 MiB boundary,
    whether Linux took the huge-page advice). Huge pages cut a cache's page faults and TLB misses
    512-fold where /sys/kernel/mm/transparent_hugepage/enabled is `always` or `madvise`."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    pad = _HUGE // itemsize
    raw = torch.empty(n + pad, dtype=dtype)
    start = (-raw.data_ptr() % _HUGE) // itemsize
    buf = raw[start:start + n]
    advised = False
    if sys.platform.startswith("linux") and n * itemsize >= _HUGE:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            length = n * itemsize // _HUGE * _HUGE
            advised = libc.madvise(ctypes.c_void_p(buf.data_ptr()), ctypes.c_size_t(length),
                                   _MADV_HUGEPAGE) == 0
        except (OSError, AttributeError):  # no madvise here: small pages, still correct
            advised = False
    return buf, advised


def head_major(flat: torch.Tensor, n_slots: int, max_len: int, n_kv_heads: int,
               head_dim: int) -> torch.Tensor:
    """The CPU cache's layout: the first n_slots * n_kv_heads * max_len * head_dim elements of
    `flat` stored as (slot, kv head, position, dim) and viewed as (n_slots, max_len, n_kv_heads,
    head_dim), the shape every caller indexes. A kv head's context is one run of memory, so tier
    2's attention reads each head's K and V as two sequential streams, which the CPU's hardware
    prefetchers follow (in the position-major order a head's rows are n_kv_heads * head_dim apart).
    """
    n = n_slots * n_kv_heads * max_len * head_dim
    return flat[:n].view(n_slots, n_kv_heads, max_len, head_dim).permute(0, 2, 1, 3)


class KVCache:
    """KV cache for n_slots sequences x the given global layers, allocated once at its largest
    size, written in place. On the CPU: head-major (`head_major`), in `host_buffer` memory whose
    pages are committed when first touched, or at once with `commit` (zeroed)."""

    def __init__(self, layers: Sequence[int], n_slots: int, max_len: int, n_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: str | torch.device = "cpu",
                 commit: bool = False) -> None:
        if n_slots <= 0 or max_len <= 0:
            raise ValueError(f"KVCache needs n_slots > 0 and max_len > 0, got {n_slots}, {max_len}")
        self.layers = tuple(layers)
        self.n_slots = n_slots
        self.max_len = max_len
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (n_slots, max_len, n_kv_heads, head_dim)
        self.huge_pages = False  # the CPU buffers took the huge-page advice
        if self.device.type == "cpu":
            def alloc() -> torch.Tensor:
                buf, self.huge_pages = host_buffer(n_slots * max_len * n_kv_heads * head_dim, dtype)
                if commit:
                    buf.zero_()  # every page touched now, by all the rank's threads
                return head_major(buf, n_slots, max_len, n_kv_heads, head_dim)
        else:
            def alloc() -> torch.Tensor:
                return torch.zeros(shape, dtype=dtype, device=self.device)
        self.k = {layer: alloc() for layer in self.layers}
        self.v = {layer: alloc() for layer in self.layers}
        # per layer, per slot: positions [0, mark) hold written or zeroed values (CPU only)
        initial = 0 if self.device.type == "cpu" and not commit else max_len
        self._mark = {layer: [initial] * n_slots for layer in self.layers}
        # decided once: the marks are kept (and tails zeroed) by the torch path only
        self._native = self.device.type == "cpu" and kernels.native_available()

    @staticmethod
    def nbytes_for(n_layers: int, n_slots: int, max_len: int, n_kv_heads: int, head_dim: int,
                   dtype: torch.dtype) -> int:
        """Bytes a full cache of this size holds (k and v)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * n_layers * n_slots * max_len * n_kv_heads * head_dim * itemsize

    @property
    def nbytes(self) -> int:
        return self.nbytes_for(len(self.layers), self.n_slots, self.max_len, self.n_kv_heads,
                               self.head_dim, self.dtype)

    def write(self, layer: int, slot: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k/v (L, n_kv, D) of one sequence at positions start .. start+L-1 of `slot`."""
        L = k.shape[0]
        if not (0 <= slot < self.n_slots) or start < 0 or start + L > self.max_len:
            raise IndexError(f"KVCache.write: slot {slot}, positions {start}..{start + L - 1} "
                             f"out of range ({self.n_slots} slots x {self.max_len} positions)")
        mark = self._mark[layer]
        if start > mark[slot] and not self._native:
            self._zero(layer, slot, start)
        self.k[layer][slot, start:start + L] = k
        self.v[layer][slot, start:start + L] = v
        mark[slot] = max(mark[slot], start + L)

    def _zero(self, layer: int, slot: int, upto: int) -> None:
        """Make positions [mark, upto) of a slot finite, rounding up to whole chunks."""
        mark = self._mark[layer]
        end = min(self.max_len, -(-upto // _ZERO_CHUNK) * _ZERO_CHUNK)
        self.k[layer][slot, mark[slot]:end] = 0
        self.v[layer][slot, mark[slot]:end] = 0
        mark[slot] = end

    def store(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Scatter n tokens' k/v (n, n_kv, D) to (slots[i], positions[i]): one kernel per tensor,
        for any mix of prompts and decode rows. Not for the CPU torch path, which tracks which
        positions were ever written (`write`, `decode`)."""
        self.k[layer][slots, positions] = k.to(self.dtype)
        self.v[layer][slots, positions] = v.to(self.dtype)

    def read(self, layer: int, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the first `length` cached positions of one slot: (length, n_kv, D) each."""
        return self.k[layer][slot, :length], self.v[layer][slot, :length]

    def prefill_chunk(self, layer: int, slot: int, start: int, q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor) -> torch.Tensor:
        """A later chunk of a prompt prefilled in chunks, on either tier: store its k/v
        (L, n_kv, D) at positions start .. start+L-1 of `slot`, then attend its queries
        q (L, n_heads, D) causally over the slot's cached prefix and the chunk itself.
        -> (L, n_heads * D) in q.dtype, on the cache's device."""
        self.write(layer, slot, start, k, v)
        k_ctx, v_ctx = self.read(layer, slot, start + k.shape[0])
        return chunk_prefill_attention(q.to(self.device), k_ctx, v_ctx, start)

    def decode(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, q: torch.Tensor,
               k: torch.Tensor, v: torch.Tensor, ctx_len: int | None = None,
               compute_dtype: torch.dtype | None = None) -> torch.Tensor:
        """Append one token per row and attend over the row's context.

        slots, positions (B,) long (distinct slots); q (B, n_heads, D); k, v (B, n_kv, D) belong
        at position positions[b] of slot slots[b]. Row b attends over [0, positions[b]] of its slot.
        -> (B, n_heads * D) in q.dtype, on q's device. Only the first max(positions)+1
        positions are read. On a GPU, pass `ctx_len` (>= that) to skip the host sync that computing
        the max costs; on the CPU it is ignored.
        `compute_dtype`: see `decode_attention` (default q.dtype); the CPU's native kernel
        always reads the cache as it is and accumulates in float32.
        """
        out_device = q.device
        kc, vc = self.k[layer], self.v[layer]
        if self._native:  # each row reads its own slot up to its own length: no views, no zeroing
            o = kernels.decode_attention_cpu(q.cpu(), kc, vc, slots.cpu(), positions.cpu() + 1,
                                             k_new=k.cpu(), v_new=v.cpu())
            return o if out_device.type == "cpu" else o.to(out_device)
        slots = slots.to(self.device)
        positions = positions.to(self.device)
        q = q.to(self.device)
        if self.device.type != "cpu":
            T = int(positions.max()) + 1 if ctx_len is None else ctx_len
            self.store(layer, slots, positions, k, v)
            return cached_decode_attention(q, kc, vc, slots, positions + 1, T).to(out_device)

        # CPU, torch fallback: no gather at all. Rows whose slots run consecutively attend on a
        # view of the cache; a gathered copy would cost more than the attention (fresh pages,
        # twice the traffic).
        ids, pos = slots.tolist(), positions.tolist()
        runs: list[tuple[int, int, int]] = []  # (row a, row b, T): slots ids[a], ids[a]+1, ...
        for b, s in enumerate(ids):
            if runs and ids[b - 1] + 1 == s:
                a, _, T = runs[-1]
                runs[-1] = (a, b + 1, max(T, pos[b] + 1))
            else:
                runs.append((b, b + 1, pos[b] + 1))
        mark = self._mark[layer]
        for a, b, T in runs:  # every position a row's view covers must be finite
            for s in ids[a:b]:
                if mark[s] < T:
                    self._zero(layer, s, T)
        kc[slots, positions] = k.to(self.dtype)
        vc[slots, positions] = v.to(self.dtype)
        lengths = positions + 1
        if len(runs) == 1:
            o = decode_attention(q, kc[ids[0]:ids[0] + len(ids), :runs[0][2]],
                                 vc[ids[0]:ids[0] + len(ids), :runs[0][2]], lengths, compute_dtype)
            return o.to(out_device)
        o = torch.empty(len(ids), q.shape[1] * q.shape[2], dtype=q.dtype)
        for a, b, T in runs:
            first = ids[a]
            o[a:b] = decode_attention(q[a:b], kc[first:first + b - a, :T],
                                      vc[first:first + b - a, :T], lengths[a:b], compute_dtype)
        return o.to(out_device)
