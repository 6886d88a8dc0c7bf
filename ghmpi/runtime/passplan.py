"""The index tensors of one pass, built once on the host and moved to the device in one copy.

A pass feeds n tokens of many sequences through a slice's layers. Every layer needs the same
bookkeeping: the tokens' positions, which rows decode on a local cache, which prompts are
prefilled (their cumulative lengths), which rows and prompt chunks go to which tier-2 rank.
Building it once per pass, not per layer, keeps host round trips off the hot path: the device
tensors come from one pinned buffer copied without blocking.

Rows arrive ordered decodes first (local slots before remote ones, as slots are numbered), then
whole prompts and first chunks, then later chunks of long prompts (`order_rows`), so the local
decode rows and the packed prompt tokens are contiguous spans of the batch.

A later chunk (start > 0) of a prompt prefilled in chunks attends its slot's cached prefix, so it
is computed where that slot's KV lives: on tier 1 for a local slot, on the owning tier-2 rank
otherwise (its q/k/v ride in that rank's `Work` message, its output comes back in the reply).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ghmpi.comm.topology import LOCAL
from ghmpi.model.attention import cached_decode_attention, packed_prefill_attention
from ghmpi.model.kvcache import KVCache
from ghmpi.model.llama import Transformer
from ghmpi.runtime.scheduler import Row


@dataclass
class RemoteShare:
    """What one tier-2 rank gets from a pass, every layer."""

    owner: int  # world rank
    dec_slots: list[int] = field(default_factory=list)
    dec_pos: list[int] = field(default_factory=list)
    fill_slots: list[int] = field(default_factory=list)  # prompts whose K/V it stores
    fill_spans: list[tuple[int, int]] = field(default_factory=list)  # their token ranges
    fill_copies: list[list[int]] = field(default_factory=list)  # per fill: more slots of its K/V
    # its decode rows' tokens: one span of the pass (order_rows groups them by owner)
    dec_span: slice = field(default_factory=lambda: slice(0, 0))
    chunk_slots: list[int] = field(default_factory=list)  # later chunks it stores and attends
    chunk_pos: list[int] = field(default_factory=list)  # position of each chunk's first token
    chunk_spans: list[tuple[int, int]] = field(default_factory=list)  # their token ranges

    @property
    def reply_spans(self) -> list[slice]:
        """Token spans its reply answers, in the reply's order: decode rows, then chunks."""
        spans = [self.dec_span] if self.dec_slots else []
        return spans + [slice(a, b) for a, b in self.chunk_spans]


@dataclass
class PassPlan:
    rows: list[Row]
    n: int  # tokens in the pass
    positions: torch.Tensor  # (n,) long
    tokens: np.ndarray  # (n,) int64 (only slice 0 embeds them)
    local_dec: slice  # token span of the rows decoding on the local cache
    local_slots: torch.Tensor  # (n_local_dec,) long: their rows in the local cache
    local_lengths: torch.Tensor  # (n_local_dec,) long: context length incl. the new token
    local_max_ctx: int
    prefill: slice  # token span of the prompts (prefilled here, whoever keeps their K/V)
    prefill_lengths: list[int]
    cu_seqlens: torch.Tensor  # (n_prompts + 1,) int32
    store_index: torch.Tensor | None  # token indices whose k/v the local cache keeps (None: all)
    store_slots: torch.Tensor  # (n_store,) long local cache rows
    store_pos: torch.Tensor  # (n_store,) long positions
    n_store: int
    local_prefill: list[tuple[int, int, int]]  # (local cache row, start token, length) of the
    #                                    prompts a CPU cache keeps (stored from position 0)
    chunks: list[tuple[int, int, int, int]]  # (start token, end token, local cache row, position):
    #                      later chunks of long prompts on local slots (stored and attended here)
    remote: list[RemoteShare]
    last_tokens: torch.Tensor  # (rows,) long: each row's last token (the one that samples)

    @property
    def n_rows(self) -> int:
        return len(self.rows)


def order_rows(rows: list[Row], owner: np.ndarray) -> list[Row]:
    """Decodes on local slots, decodes on tier 2 grouped by owner, then prompts (stable within
    each group): every owner's decode rows are one contiguous span of the batch, so shipping
    them and taking their replies back are slices, not gathers."""
    def group(r: Row) -> tuple[int, int]:
        if r.prefill:
            return (2, 0) if r.start == 0 else (3, 0)  # whole prompts / first chunks, then chunks
        o = int(owner[r.slot])
        return (0, 0) if o == LOCAL else (1, o)
    return sorted(rows, key=group)


def build_plan(rows: list[Row], owner: np.ndarray, local_index: np.ndarray,
               device: torch.device) -> PassPlan:
    """Host bookkeeping of a pass whose rows come from `order_rows`; device tensors in one copy."""
    counts = np.fromiter((r.ntok for r in rows), dtype=np.int64, count=len(rows))
    ends = np.cumsum(counts)
    starts = ends - counts
    n = int(ends[-1]) if len(rows) else 0
    positions = np.concatenate([np.arange(r.start, r.start + r.ntok) for r in rows]) if rows \
        else np.empty(0, dtype=np.int64)
    tokens = np.concatenate([np.asarray(r.tokens, dtype=np.int64) for r in rows]) if rows \
        else np.empty(0, dtype=np.int64)

    local_dec, pref, remote_dec, cont = [], [], [], []
    for i, r in enumerate(rows):
        if r.prefill and r.start > 0:
            cont.append(i)
        elif r.prefill:
            pref.append(i)
        elif owner[r.slot] == LOCAL:
            local_dec.append(i)
        else:
            remote_dec.append(i)
    n_ld = len(local_dec)
    if local_dec != list(range(n_ld)) or remote_dec != list(range(n_ld, n_ld + len(remote_dec))):
        raise ValueError("decode rows must come first, local then tier 2 (order_rows)")
    pre_start = int(starts[pref[0]]) if pref else n
    pre_end = int(starts[cont[0]]) if cont else n
    prefill_lengths = [rows[i].ntok for i in pref]
    cu = np.zeros(len(pref) + 1, dtype=np.int64)
    cu[1:] = np.cumsum(prefill_lengths)

    ld_slots = np.array([local_index[rows[i].slot] for i in local_dec], dtype=np.int64)
    ld_len = np.array([rows[i].start + 1 for i in local_dec], dtype=np.int64)
    # local cache stores: the local decode rows' new tokens and the local prompts' tokens
    st_idx, st_slot, st_pos, local_prefill = [list(range(n_ld))], [ld_slots], [positions[:n_ld]], []

    def keep_local(row: int, a: int, b: int) -> None:
        """Prompt tokens a..b-1 are stored in local cache row `row` (from position 0)."""
        st_idx.append(range(a, b))
        st_slot.append(np.full(b - a, row, dtype=np.int64))
        st_pos.append(positions[a:b])
        local_prefill.append((row, a, b - a))

    shares: dict[int, RemoteShare] = {}
    for i in pref:
        r = rows[i]
        a, b = int(starts[i]), int(ends[i])
        filled: set[int] = set()  # owners already given this prompt's K/V
        for slot in (r.slot, *(c[0] for c in r.copies)):  # samples sharing the prefill
            o = int(owner[slot])
            if o == LOCAL:
                keep_local(int(local_index[slot]), a, b)
                continue
            sh = shares.setdefault(o, RemoteShare(o))
            if o in filled:  # the K/V cross the wire once; tier 2 copies them
                sh.fill_copies[-1].append(slot)
                continue
            filled.add(o)
            sh.fill_slots.append(slot)
            sh.fill_spans.append((a, b))
            sh.fill_copies.append([])
    chunks = []
    for i in cont:  # a chunk attends its prefix where the slot's KV lives
        r = rows[i]
        a, b = int(starts[i]), int(ends[i])
        o = int(owner[r.slot])
        if o == LOCAL:
            chunks.append((a, b, int(local_index[r.slot]), r.start))
            continue
        sh = shares.setdefault(o, RemoteShare(o))
        sh.chunk_slots.append(r.slot)
        sh.chunk_pos.append(r.start)
        sh.chunk_spans.append((a, b))
    for i in remote_dec:  # decode rows have one token each: row i is token i
        r = rows[i]
        sh = shares.setdefault(int(owner[r.slot]), RemoteShare(int(owner[r.slot])))
        if not sh.dec_slots:
            sh.dec_span = slice(i, i)
        if sh.dec_span.stop != i:
            raise ValueError("a tier-2 rank's decode rows must be contiguous (order_rows)")
        sh.dec_span = slice(sh.dec_span.start, i + 1)
        sh.dec_slots.append(r.slot)
        sh.dec_pos.append(r.start)
    store_index = np.concatenate([np.asarray(list(x), dtype=np.int64) for x in st_idx])
    store_slots = np.concatenate(st_slot)
    store_pos = np.concatenate(st_pos).astype(np.int64)
    n_store = len(store_index)
    all_stored = n_store == n and np.array_equal(store_index, np.arange(n))
    remote = [shares[o] for o in sorted(shares)]

    # one host buffer -> one non-blocking copy; the views below cut it up on the device
    parts = [positions, ld_slots, ld_len, cu, store_index, store_slots, store_pos, ends - 1]
    sizes = [len(x) for x in parts]
    host = torch.from_numpy(np.concatenate(parts).astype(np.int64))
    if device.type == "cuda":
        dev = host.pin_memory().to(device, non_blocking=True)
    else:
        dev = host
    d_pos, d_ls, d_ll, d_cu, d_si, d_ss, d_sp, d_last = torch.split(dev, sizes)
    return PassPlan(
        rows=rows, n=n, positions=d_pos, tokens=tokens,
        local_dec=slice(0, n_ld), local_slots=d_ls, local_lengths=d_ll,
        local_max_ctx=int(ld_len.max()) if n_ld else 0,
        prefill=slice(pre_start, pre_end), prefill_lengths=prefill_lengths,
        cu_seqlens=d_cu.to(torch.int32),
        store_index=None if all_stored else d_si, store_slots=d_ss, store_pos=d_sp,
        n_store=n_store, local_prefill=local_prefill, chunks=chunks, remote=remote,
        last_tokens=d_last)


def attend_local(cache: KVCache | None, plan: PassPlan, layer: int, q: torch.Tensor,
                 k: torch.Tensor, v: torch.Tensor, o: torch.Tensor) -> None:
    """The attention tier 1 computes itself, into o (n, n_heads * D): every prompt of the pass in
    one packed causal call, the local slots' decode rows on the cache where it lies (their new
    K/V, and the local prompts', stored first), and the local slots' prompt chunks over their
    cached prefix. Rows and chunks served by tier 2 are left alone."""
    if cache is not None and cache.device.type != "cpu":
        if plan.n_store:
            if plan.store_index is None:
                cache.store(layer, plan.store_slots, plan.store_pos, k, v)
            else:
                cache.store(layer, plan.store_slots, plan.store_pos, k[plan.store_index],
                            v[plan.store_index])
        d = plan.local_dec
        if d.stop:
            o[d] = cached_decode_attention(q[d], cache.k[layer], cache.v[layer], plan.local_slots,
                                           plan.local_lengths, plan.local_max_ctx)
    elif cache is not None:  # a CPU cache keeps track of what was written (KVCache.write)
        for row, a, length in plan.local_prefill:
            cache.write(layer, row, 0, k[a:a + length], v[a:a + length])
        d = plan.local_dec
        if d.stop:
            o[d] = cache.decode(layer, plan.local_slots, plan.local_lengths - 1, q[d], k[d], v[d])
    if plan.prefill_lengths:
        s = plan.prefill
        o[s] = packed_prefill_attention(q[s], k[s], v[s], plan.cu_seqlens, plan.prefill_lengths)
    for a, b, row, pos in plan.chunks:
        o[a:b] = cache.prefill_chunk(layer, row, pos, q[a:b], k[a:b], v[a:b])


def run_local_pass(model: Transformer, cache: KVCache, plan: PassPlan,
                   x: torch.Tensor | None = None) -> torch.Tensor:
    """A whole pass through a model holding every layer, all attention local (the single tier's
    work, without the ring): -> logits (rows, vocab) float32 of each row's last token."""
    a = model.args
    if x is None:
        x = model.embed(torch.from_numpy(plan.tokens).to(model.device, non_blocking=True))
    for layer in model.layers:
        q, k, v = model.pre_attention(layer, x, plan.positions)
        o = torch.empty(plan.n, a.n_heads * a.head_dim, dtype=q.dtype, device=q.device)
        attend_local(cache, plan, layer, q, k, v, o)
        x = model.post_attention(layer, x, o)
    return model.classify(x[plan.last_tokens])
