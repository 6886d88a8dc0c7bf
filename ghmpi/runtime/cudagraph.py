"""Decode passes of the single tier replayed as CUDA graphs.

A decode pass launches ~30 kernels per layer; at Llama-3-8B size the host needs longer to launch
them (~27 ms a step on the H100 machine) than the GPU to run them (~17 ms at batch 256). A pass
whose rows all decode on the local cache has a fixed shape for a given row count, so it is
captured once per bucket of row counts (powers of two up to the micro-batch size) and replayed:
rows beyond the real ones decode on a spare cache slot that nothing reads. The attention kernel's
launch depends only on the bucket (it is captured with the cache's full length as its bound and
reads each row's own length on the device), so one capture serves every context length.

Passes with prompts, with tier-2 rows, or on a CPU run eagerly.
"""

from __future__ import annotations

import numpy as np
import torch

from ghmpi.model.kvcache import KVCache
from ghmpi.model.llama import Transformer
from ghmpi.runtime.passplan import PassPlan, run_local_pass
from ghmpi.runtime.scheduler import Row


class DecodeGraphs:
    def __init__(self, model: Transformer, cache: KVCache, max_rows: int, spare_slot: int):
        self.model, self.cache, self.spare = model, cache, spare_slot
        self.device = model.device
        self.buckets = sorted({min(1 << i, max_rows) for i in range(max_rows.bit_length() + 1)})
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor,
                                     torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self._keep: list[PassPlan] = []

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
            remote_dec=slice(B, B),
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
        B = next(b for b in self.buckets if b >= n)
        if B not in self.graphs:
            self.graphs[B] = self._capture(B)
        graph, inputs, host, logits = self.graphs[B]
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
        graph.replay()
        return logits[:n]
