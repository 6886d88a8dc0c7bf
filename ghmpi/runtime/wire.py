"""Tensors to bytes and back, and the plan of a pass as header words.

The bridge between the math (torch tensors, maybe on a GPU) and the transport (uint8 numpy
buffers). Activations travel in the tier-1 compute dtype; bfloat16 has no numpy type, so every
payload is raw bytes reinterpreted on arrival.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from ghmpi.comm.transport import TAG_REPLY, frame_size, unpack, write_header
from ghmpi.runtime.scheduler import Params, Row


class WireFormat:
    def __init__(self, dtype: torch.dtype, pinned: bool = False):
        self.dtype = dtype
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        self.pinned = pinned  # host buffers are page-locked: GPU copies to them are async DMA
        self._empty = torch.empty(0, dtype=dtype)

    def alloc(self, nbytes: int) -> np.ndarray:
        """Host memory for message buffers: page-locked beside a GPU, else plain."""
        if self.pinned:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).numpy()
        return np.empty(nbytes, dtype=np.uint8)

    def _joined(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """The parts' bytes back to back, as one uint8 tensor on their device: parts that already
        lie back to back in one storage (every owner's decode rows, cut from one packed q/k/v
        tensor) are one view, gathered with nothing else (`coalesce`)."""
        runs = coalesce([t if t.dtype == self.dtype else t.to(self.dtype) for t in parts])
        if not runs:
            return torch.empty(0, dtype=torch.uint8)
        return (runs[0] if len(runs) == 1 else torch.cat(runs)).view(torch.uint8)

    def to_bytes(self, parts: Sequence[torch.Tensor]) -> np.ndarray:
        """CPU tensors' bytes as one uint8 array (no copy for a single contiguous part)."""
        return self._joined(parts).cpu().numpy()

    def frame(self, header: Sequence[int], parts: Sequence[torch.Tensor],
              buffer: Callable[[int], np.ndarray]) -> np.ndarray:
        """Header words, then the parts' bytes, written into `buffer(size)` (one message of
        `frame_all`)."""
        return self.frame_all([header], [parts], [buffer])[0]

    def frame_all(self, headers: Sequence[Sequence[int] | np.ndarray],
                  payloads: Sequence[Sequence[torch.Tensor]],
                  buffers: Sequence[Callable[[int], np.ndarray]], wait: bool = True
                  ) -> list[np.ndarray]:
        """Several messages: message i is headers[i], then payloads[i]'s parts' bytes back to
        back, in `buffers[i](size)`. All parts are gathered on their device at once (`_joined`:
        none at all when they lie back to back already, as every owner's decode rows do), then
        each message's bytes are copied straight into its buffer (page-locked beside a GPU:
        asynchronous DMA) and the stream is synchronised once, so the bytes are there when this
        returns. Tier 1 ships a layer's messages to every tier-2 rank this way. `wait=False`
        leaves the copies queued on the current stream: the caller must not send the buffers
        before `Copies.done` (made just after this call) says so."""
        joined = self._joined([t for parts in payloads for t in parts])
        out, at = [], 0
        for header, parts, buffer in zip(headers, payloads, buffers):
            n = sum(t.numel() for t in parts) * self.itemsize
            buf = buffer(frame_size(len(header), n))
            start = write_header(buf, header)
            if n:
                torch.from_numpy(buf[start:]).copy_(joined[at:at + n], non_blocking=self.pinned)
            at += n
            out.append(buf)
        if wait and joined.device.type == "cuda" and joined.numel():
            torch.cuda.current_stream(joined.device).synchronize()
        return out

    def from_bytes(self, buf: np.ndarray, shape: tuple[int, ...], device: torch.device | str
                   ) -> torch.Tensor:
        """View the first prod(shape) elements of `buf` as a tensor of `shape` on `device`."""
        n = math.prod(shape)
        if n == 0:
            return torch.empty(shape, dtype=self.dtype, device=device)
        t = torch.frombuffer(buf[:n * self.itemsize], dtype=self.dtype).view(shape)
        # from a pinned buffer the copy is asynchronous: the caller must not refill `buf` before
        # the stream has passed it (tier 1 synchronises before posting the next receive)
        return t.to(device, non_blocking=self.pinned)

    def split(self, buf: np.ndarray, shapes: Sequence[tuple[int, ...]]) -> list[torch.Tensor]:
        """Cut a payload into CPU tensors of the given shapes, in order (views, no copy; the
        empty ones views of one empty tensor)."""
        flat = torch.frombuffer(buf, dtype=self.dtype) if buf.nbytes else self._empty
        out, at = [], 0
        for shape in shapes:
            n = math.prod(shape)
            out.append(flat[at:at + n].view(shape))
            at += n
        return out


class Copies:
    """The device work queued so far on the current stream (copies into message buffers
    among it), as a fence to poll: made after `WireFormat.frame_all(..., wait=False)`, `done`
    says when the buffers hold their bytes. Off a GPU every copy has happened already."""

    def __init__(self, device: torch.device):
        self.event = None
        if device.type == "cuda":
            self.event = torch.cuda.Event()
            self.event.record()

    def done(self) -> bool:
        return self.event is None or self.event.query()


def coalesce(parts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The parts as flat tensors, each maximal run of parts that lie back to back in one
    storage joined into one view (no copy)."""
    runs: list[torch.Tensor] = []
    end = None  # (storage pointer, offset) just past the last run
    for t in parts:
        if not t.numel():
            continue
        flat = t.reshape(-1)
        contiguous = t.is_contiguous()
        here = (t.untyped_storage().data_ptr(), t.storage_offset()) if contiguous else None
        if here is not None and here == end and runs[-1].dtype == t.dtype:
            last = runs[-1]
            runs[-1] = last.as_strided((last.numel() + flat.numel(),), (1,),
                                       last.storage_offset())
        else:
            runs.append(flat)
        end = (here[0], here[1] + t.numel()) if here is not None else None
    return runs


def packed_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(n, H + 2 KV, D): the rows of q (n, H, D), k and v (n, KV, D) side by side, as they
    travel to tier 2. No copy when q, k, v already lie that way in one storage."""
    n, H, D = q.shape
    KV = k.shape[1]
    row = ((H + 2 * KV) * D, D, 1)
    if (q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
            == v.untyped_storage().data_ptr()
            and q.stride() == row and k.stride() == row and v.stride() == row
            and k.storage_offset() == q.storage_offset() + H * D
            and v.storage_offset() == k.storage_offset() + KV * D):
        return q.as_strided((n, H + 2 * KV, D), row, q.storage_offset())
    return torch.cat([q, k, v], dim=1)


def split_qkv(qkv: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of `packed_qkv`: views (n, H, D), (n, KV, D), (n, KV, D)."""
    kv = (qkv.shape[1] - n_heads) // 2
    return qkv[:, :n_heads], qkv[:, n_heads:n_heads + kv], qkv[:, n_heads + kv:]


def _f2w(x: float) -> int:
    return int(np.float64(x).view(np.int64))


def _w2f(w: int) -> float:
    return float(np.int64(w).view(np.float64))


def rows_header(mb: int, rows: list[Row]) -> list[int]:
    """Header words describing micro-batch `mb`'s pass: (mb, R, then per row: slot, index, start,
    ntok, prefill, sample, seed, top_k, temperature and top_p as float64 bits, prompt_logprobs,
    the number of copies c, c (slot, sample) pairs, and a prefill row's ntok token ids (the
    last slice needs them for prompt log-probabilities))."""
    words = [mb, len(rows)]
    for r in rows:
        p = r.params
        words += [r.slot, r.index, r.start, r.ntok, int(r.prefill), r.sample, p.seed, p.top_k,
                  _f2w(p.temperature), _f2w(p.top_p), int(r.prompt_logprobs), len(r.copies)]
        for slot, sample in r.copies:
            words += [slot, sample]
        if r.prefill:
            words += np.asarray(r.tokens, dtype=np.int64).tolist()
    return words


def rows_from_header(header: np.ndarray) -> tuple[int, list[Row]]:
    mb, n = int(header[0]), int(header[1])
    w = header.tolist()
    at = 2
    rows = []
    for _ in range(n):
        s, i, st, nt, pf, sample, seed, top_k, t, tp_, plp, nc = w[at:at + 12]
        at += 12
        copies = tuple((w[at + 2 * c], w[at + 2 * c + 1]) for c in range(nc))
        at += 2 * nc
        if pf:
            tokens = np.asarray(w[at:at + nt], dtype=np.int64)
            at += nt
        else:
            tokens = np.empty(nt, dtype=np.int64)
        rows.append(Row(s, i, st, tokens, bool(pf), sample,
                        Params(_w2f(t), top_k, _w2f(tp_), seed), copies, bool(plp)))
    return mb, rows


def reply_tag(mb: int) -> int:
    """The tag of tier 2's attention outputs for micro-batch mb (each micro-batch posts its own
    receives early, so replies to different micro-batches never mix)."""
    return TAG_REPLY + mb


@dataclass(frozen=True)
class Work:
    """One tier-1 -> tier-2 message: decode rows to attend, prompt K/V to store, prompt chunks to
    store and attend. `encode` and `decode` are the two sides of its one layout: header words
    (mb, layer, counts, the decode rows' slots and positions, the prompts' slots and lengths, the
    chunks' slots, start positions and lengths, copies), then the decode rows' q, k, v side by
    side per row, the prompts' K and V, and q, k, v of the chunks.

    A prompt whose K/V go to several slots of the rank (samples sharing a prefill) crosses the
    wire once: `fill_copies[i]` lists prompt i's extra slots, and `decode` repeats its K/V.

    A chunk is a later piece (start > 0) of a prompt prefilled in chunks (its first piece is a
    fill): tier 2 stores its K/V at positions start .. start+len-1 of the slot and attends its
    queries over the slot's prefix and the chunk; the reply carries the decode rows' outputs,
    then the chunks' rows in order."""

    mb: int
    layer: int
    dec_slots: Sequence[int] | np.ndarray  # (n_dec,) slots of the decode rows
    dec_pos: Sequence[int] | np.ndarray  # (n_dec,) position of each row's new token
    fill_slots: Sequence[int] | np.ndarray  # (n_fill,) slots receiving a prompt's K/V
    fill_len: Sequence[int] | np.ndarray  # (n_fill,) prompt lengths (stored from position 0)
    q: torch.Tensor  # (n_dec, H, D)
    k: torch.Tensor  # (n_dec, KV, D)
    v: torch.Tensor  # (n_dec, KV, D)
    kf: Sequence[torch.Tensor] | torch.Tensor  # out: one (len, KV, D) per prompt; in: all rows
    vf: Sequence[torch.Tensor] | torch.Tensor
    fill_copies: Sequence[Sequence[int]] = ()
    chunk_slots: Sequence[int] | np.ndarray = ()  # (n_chunk,) slots of the prompt chunks
    chunk_pos: Sequence[int] | np.ndarray = ()  # (n_chunk,) position of each chunk's first token
    chunk_len: Sequence[int] | np.ndarray = ()  # (n_chunk,) tokens of each chunk
    qc: Sequence[torch.Tensor] | torch.Tensor = ()  # out: one (len, H, D) per chunk; in: all rows
    kc: Sequence[torch.Tensor] | torch.Tensor = ()  # out: one (len, KV, D) per chunk; in: all rows
    vc: Sequence[torch.Tensor] | torch.Tensor = ()

    @property
    def n_reply(self) -> int:
        """Rows of attention output the message asks back: its decode rows, then its chunks'."""
        return len(self.dec_slots) + int(sum(self.chunk_len))

    def header(self) -> list[int]:
        words = [self.mb, self.layer, len(self.dec_slots), len(self.fill_slots),
                 len(self.chunk_slots), *self.dec_slots, *self.dec_pos, *self.fill_slots,
                 *self.fill_len, *self.chunk_slots, *self.chunk_pos, *self.chunk_len]
        if any(len(c) for c in self.fill_copies):
            words += ([len(c) for c in self.fill_copies]
                      + [s for c in self.fill_copies for s in c])
        return words

    def parts(self) -> list[torch.Tensor]:
        """The payload, in wire order (`wire_parts`)."""
        return self.wire_parts(packed_qkv(self.q, self.k, self.v), self.kf, self.vf, self.qc,
                               self.kc, self.vc)

    @staticmethod
    def wire_parts(qkv: torch.Tensor, kf: Sequence[torch.Tensor], vf: Sequence[torch.Tensor],
                   qc: Sequence[torch.Tensor], kc: Sequence[torch.Tensor],
                   vc: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The payload's parts in wire order: the decode rows' q, k, v side by side (`packed_qkv`),
        then the prompts' K and V, then the chunks' q, k, v."""
        return [qkv, *kf, *vf, *qc, *kc, *vc]

    def encode(self, wire: WireFormat, buffer: Callable[[int], np.ndarray] | None = None
               ) -> np.ndarray:
        """The message bytes (in `buffer(size)` if given). Several messages at once: `Shipment`."""
        return wire.frame(self.header(), self.parts(), buffer or wire.alloc)

    @staticmethod
    def encode_all(works: Sequence["Work"], wire: WireFormat,
                   buffers: Sequence[Callable[[int], np.ndarray]]) -> list[np.ndarray]:
        """Every message's bytes, `works[i]` in `buffers[i](size)`, gathered at once."""
        return Shipment(works).frames(wire, None, [w.parts() for w in works], buffers)

    @staticmethod
    def decode(wire: WireFormat, buf: np.ndarray, n_heads: int, n_kv_heads: int,
               head_dim: int) -> "Work":
        """The message back (CPU tensors viewing `buf`), with every copy's K/V repeated."""
        header, payload = unpack(buf)
        mb, layer, n_dec, n_fill, n_chunk = (int(w) for w in header[:5])
        w = header[5:]
        parts, at = [], 0
        for n in (n_dec, n_dec, n_fill, n_fill, n_chunk, n_chunk, n_chunk):
            parts.append(w[at:at + n])
            at += n
        dec_slots, dec_pos, fill_slots, fill_len, chunk_slots, chunk_pos, chunk_len = parts
        rest = w[at:]
        n_kv, n_ck = int(fill_len.sum()), int(chunk_len.sum())
        H, KV, D = n_heads, n_kv_heads, head_dim
        qkv, kf, vf, qc, kc, vc = wire.split(
            payload, [(n_dec, H + 2 * KV, D), (n_kv, KV, D), (n_kv, KV, D), (n_ck, H, D),
                      (n_ck, KV, D), (n_ck, KV, D)])
        q, k, v = split_qkv(qkv, H)
        if len(rest) and n_fill:  # copies: repeat each fill's K/V for its extra slots
            counts = rest[:n_fill]
            extra = rest[n_fill:n_fill + int(counts.sum())]
            starts = np.concatenate([[0], np.cumsum(fill_len)])
            idx, slots, lens, at = [], [], [], 0
            for i in range(n_fill):
                for s in [int(fill_slots[i]), *extra[at:at + int(counts[i])].tolist()]:
                    idx.append(torch.arange(int(starts[i]), int(starts[i + 1])))
                    slots.append(s)
                    lens.append(int(fill_len[i]))
                at += int(counts[i])
            sel = torch.cat(idx)
            kf, vf = kf[sel], vf[sel]
            fill_slots = np.asarray(slots, dtype=np.int64)
            fill_len = np.asarray(lens, dtype=np.int64)
        return Work(mb, layer, dec_slots, dec_pos, fill_slots, fill_len, q, k, v, kf, vf,
                    chunk_slots=chunk_slots, chunk_pos=chunk_pos, chunk_len=chunk_len,
                    qc=qc, kc=kc, vc=vc)


class Shipment:
    """Messages to several tier-2 ranks that are the same every layer but for the layer number
    and the tensors (a pass's): their header words are built once (`Work.header`; word 1, the
    layer, is patched per layer), and a layer's payloads cross from the device together
    (`WireFormat.frame_all`)."""

    def __init__(self, works: Sequence[Work]):
        self.headers = [np.asarray(w.header(), dtype=np.int64) for w in works]
        self.n_reply = [w.n_reply for w in works]

    def frames(self, wire: WireFormat, layer: int | None,
               payloads: Sequence[Sequence[torch.Tensor]],
               buffers: Sequence[Callable[[int], np.ndarray]], wait: bool = True
               ) -> list[np.ndarray]:
        """Message i: headers[i] (at `layer`, unless None), then payloads[i]'s bytes, in
        `buffers[i](size)` (`wait`: as in `WireFormat.frame_all`)."""
        if layer is not None:
            for header in self.headers:
                header[1] = layer
        return wire.frame_all(self.headers, payloads, buffers, wait)
