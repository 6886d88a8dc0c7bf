"""Decode passes replayed as CUDA graphs: whole passes of the single tier (`DecodeGraphs`), and
the per-layer work of passes that attend on tier 2 (`LayerGraphs`).

A decode pass launches ~30 kernels per layer; at Llama-3-8B size the host needs longer to launch
them (~27 ms a step on the H100 machine) than the GPU to run them (~17 ms at batch 256). A pass
whose rows all decode on the local cache has a fixed shape for a given row count, so it is
captured once per bucket of row counts (powers of two up to the micro-batch size) and replayed:
rows beyond the real ones decode on a spare cache slot that nothing reads. The attention kernel's
launch depends only on the bucket (it is captured with the cache's full length as its bound and
reads each row's own length on the device), so one capture serves every context length.

A pass whose rows attend on tier 2 cannot be one graph (it waits for replies every layer), but
between two waits its work has a fixed shape too: post-attention of layer l-1 and pre-attention
of layer l. `LayerGraphs` captures that segment per (layer, bucket of row counts) around static
input/output buffers of the bucket, so a layer costs one replay instead of ~30 launches.

Passes with prompts, or on a CPU, run eagerly.
"""

from __future__ import annotations

import numpy as np
import torch

from ghmpi.model.kvcache import KVCache
from ghmpi.model.llama import Transformer
from ghmpi.runtime.passplan import PassPlan, run_local_pass
from ghmpi.runtime.scheduler import Row
from ghmpi.runtime.wire import split_qkv


def buckets(max_rows: int) -> list[int]:
    """Row counts a graph is captured for: powers of two up to, and including, max_rows."""
    return sorted({min(1 << i, max_rows) for i in range(max_rows.bit_length() + 1)})


def bucket(sizes: list[int], n: int) -> int:
    """The smallest captured row count that holds n rows."""
    return next(b for b in sizes if b >= n)


class DecodeGraphs:
    def __init__(self, model: Transformer, cache: KVCache, max_rows: int, spare_slot: int):
        self.model, self.cache, self.spare = model, cache, spare_slot
        self.device = model.device
        self.buckets = buckets(max_rows)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor,
                                     torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self._keep: list[PassPlan] = []
        self._copied: dict[int, torch.cuda.Event] = {}  # per bucket: its inputs' last copy

    @staticmethod
    def eligible(plan: PassPlan) -> bool:
        return plan.local_dec.stop == plan.n_rows and not plan.prefill_lengths and not plan.remote

    def _capture(self, B: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]:
        dev, cache = self.device, self.cache
        inputs = torch.zeros(4, B, dtype=torch.long, device=dev)  # tokens, positions, slots, lengths
        inputs[2] = self.spare
        inputs[3] = 1
        tokens, positions, slots, lengths = inputs
        host = torch.empty(4, B, dtype=torch.long).pin_memory()
        plan = PassPlan(
            rows=[None] * B, n=B, positions=positions, tokens=np.empty(0),
            local_dec=slice(0, B), local_slots=slots, local_lengths=lengths,
            local_max_ctx=cache.max_len, prefill=slice(B, B), prefill_lengths=[],
            cu_seqlens=torch.zeros(1, dtype=torch.int32, device=dev), store_index=None,
            store_slots=slots, store_pos=positions, n_store=B, local_prefill=[], chunks=[], remote=[],
            last_tokens=torch.arange(B, device=dev))

        def step() -> torch.Tensor:
            self.model.rotary.forget()  # the graph must compute cos/sin from `positions` itself
            return run_local_pass(self.model, cache, plan, self.model.embed(tokens))

        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm up (kernel compiles, library handles) off-graph
            step()
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = step()
        self._keep.append(plan)  # the graph reads its tensors (last_tokens, ...) on every replay
        return graph, inputs, host, logits

    def capture_all(self) -> None:
        """Capture every bucket now (before the job's clock starts); the captures write only to
        the spare slot."""
        for B in self.buckets:
            if B not in self.graphs:
                self.graphs[B] = self._capture(B)

    def run(self, rows: list[Row], local_index: np.ndarray) -> torch.Tensor:
        """Replay the pass of these decode rows -> logits (rows, vocab) float32 on the GPU."""
        n = len(rows)
        B = bucket(self.buckets, n)
        if B not in self.graphs:
            self.graphs[B] = self._capture(B)
        graph, inputs, host, logits = self.graphs[B]
        copied = self._copied.get(B)
        if copied is not None:  # the last replay's inputs have left the pinned buffer
            copied.synchronize()
        h = host.numpy()
        h[0, :n] = [int(r.tokens[-1]) for r in rows]
        h[1, :n] = [r.start for r in rows]
        h[2, :n] = local_index[[r.slot for r in rows]]
        h[1:, n:] = 0
        h[2, n:] = self.spare
        h[3, :n] = h[1, :n] + 1
        h[3, n:] = 1
        h[0, n:] = 0
        inputs.copy_(host, non_blocking=True)
        self._copied[B] = torch.cuda.Event()
        self._copied[B].record()
        graph.replay()
        return logits[:n]


class LayerGraphs:
    """Segments of decode passes between tier-2 waits, replayed as CUDA graphs.

    Segment l of a slice holding layers [start, stop): post-attention of layer l-1 (unless
    l == start) then pre-attention of layer l (unless l == stop). Inputs are copied into the
    bucket's static buffers and the residual stream is copied out, so micro-batches of the same
    bucket can interleave; q/k/v are read from the static buffers before the next replay (the
    stream orders it)."""

    def __init__(self, model: Transformer, layers: range, max_rows: int):
        self.model, self.layers = model, layers
        self.device = model.device
        self.buckets = buckets(max_rows)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.static: dict[int, dict[str, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()

    @staticmethod
    def eligible(plan: PassPlan) -> bool:
        """Decode rows only (one token each): the segment's shape is the row count's."""
        return plan.n == plan.n_rows and not plan.prefill_lengths and not plan.chunks

    def _buffers(self, B: int) -> dict[str, torch.Tensor]:
        s = self.static.get(B)
        if s is None:
            a, dev, dt = self.model.args, self.device, self.model.dtype
            s = self.static[B] = dict(
                x=torch.zeros(B, a.dim, device=dev, dtype=dt),
                o=torch.zeros(B, a.n_heads * a.head_dim, device=dev, dtype=dt),
                pos=torch.zeros(B, dtype=torch.long, device=dev),
                x_out=torch.zeros(B, a.dim, device=dev, dtype=dt),
                qkv=torch.zeros(B, a.n_heads + 2 * a.n_kv_heads, a.head_dim, device=dev,
                                dtype=dt))
            # q, k, v side by side per row, as they travel to tier 2 (wire.packed_qkv)
            s["q"], s["k"], s["v"] = split_qkv(s["qkv"], a.n_heads)
        return s

    def _segment(self, l: int, s: dict[str, torch.Tensor]) -> None:
        """The segment's ops on the static buffers (captured, or run once to warm up)."""
        x = s["x"] if l == self.layers.start else self.model.post_attention(l - 1, s["x"], s["o"])
        s["x_out"].copy_(x)
        if l < self.layers.stop:
            q, k, v = self.model.pre_attention(l, x, s["pos"])
            s["q"].copy_(q)
            s["k"].copy_(k)
            s["v"].copy_(v)

    def capture_all(self) -> None:
        """Capture every (segment, bucket) now, before the job's clock starts: a few hundred
        small graphs, each captured straight on a side stream (no collection or cache flush per
        graph, as torch.cuda.graph would do)."""
        dev = self.device
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for B in self.buckets:
                s = self._buffers(B)
                self.model.rotary.forget()
                for l in (self.layers.start, self.layers.start + 1):  # warm up off-graph
                    self._segment(min(l, self.layers.stop), s)
                for l in range(self.layers.start, self.layers.stop + 1):
                    self.model.rotary.forget()  # cos/sin computed in the graph, from s["pos"]
                    graph = torch.cuda.CUDAGraph()
                    graph.capture_begin(pool=self.pool)
                    try:
                        self._segment(l, s)
                    finally:
                        graph.capture_end()
                    self.graphs[(l, B)] = graph
        torch.cuda.current_stream(dev).wait_stream(side)
        self.model.rotary.forget()

    def run(self, l: int, x: torch.Tensor, o: torch.Tensor | None, positions: torch.Tensor
            ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
        """Segment l for n rows: x (n, dim) the residual stream entering it, o (n, H*D) layer
        l-1's attention output (None at the slice's first layer) -> (x after post-attention of
        layer l-1, a tensor of its own; (q, k, v) of layer l, views of static buffers valid until
        the next replay, or None at the slice's end)."""
        n = x.shape[0]
        B = bucket(self.buckets, n)
        s = self._buffers(B)
        s["x"][:n].copy_(x)
        if o is not None:
            s["o"][:n].copy_(o)
        if l < self.layers.stop:
            s["pos"][:n].copy_(positions)
        self.graphs[(l, B)].replay()
        x_new = s["x_out"][:n].clone() if l > self.layers.start else x
        if l == self.layers.stop:
            return x_new, None
        return x_new, (s["q"][:n], s["k"][:n], s["v"][:n])
