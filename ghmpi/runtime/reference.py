"""The single-process reference: the job's own scheduler and pass on one model, no MPI.

`generate` runs what the single tier runs (`Scheduler.plan`/`commit`, `order_rows`, `build_plan`,
`run_local_pass`, `choose`) in one process, so the rules it applies (admission, stop tokens,
length and context limits, seeded sampling) are the job's, not a second copy of them. The tests
hold it against Hugging Face `generate`, and the MPI layouts against it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ghmpi.comm.topology import LOCAL
from ghmpi.errors import InputError
from ghmpi.model.kvcache import KVCache
from ghmpi.model.llama import Transformer
from ghmpi.runtime.draws import choose
from ghmpi.runtime.passplan import build_plan, order_rows, run_local_pass
from ghmpi.runtime.scheduler import FINISH_LENGTH, FINISH_STOP, Params, Request, Scheduler

FINISH_EOS = FINISH_STOP  # stopped on an id in eos_ids (kept as the last generated id)


def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int | list[int],
             eos_ids: Sequence[int] = (), temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, prompt_indices: list[int] | None = None,
             batch_size: int = 8) -> list[tuple[list[int], int]]:
    """Generate for every prompt -> per prompt (generated ids, finish_reason) in input order.

    finish_reason 1: stopped on an id in eos_ids (that id is the last one, as HF generate);
    2: max_new_tokens reached or the context is full (prompt + generated == max_seq_len).
    Up to `batch_size` sequences decode together; a finished one's slot takes the next prompt.
    `prompt_indices` seed each prompt's random stream (default: the position in `prompts`).
    """
    a = model.args
    if not (model.has_embed and model.has_head and len(model.layers) == a.n_layers):
        raise ValueError("generate() needs a Transformer holding every layer, embedding and head")
    n = len(prompts)
    max_new = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(max_new) != n:
        raise InputError(f"max_new_tokens has {len(max_new)} values for {n} prompts")
    indices = list(range(n)) if prompt_indices is None else list(prompt_indices)
    if len(indices) != n:
        raise InputError(f"prompt_indices has {len(indices)} values for {n} prompts")
    results: list[tuple[list[int], int]] = [([], FINISH_LENGTH)] * n
    queue: list[Request] = []
    for i, (p, m) in enumerate(zip(prompts, max_new)):
        p = [int(t) for t in p]
        if not p:
            raise InputError(f"prompt {indices[i]} is empty")
        bad = [t for t in p if not 0 <= t < a.vocab_size]
        if bad:
            raise InputError(f"prompt {indices[i]}: token id {bad[0]} outside the vocabulary "
                             f"(0..{a.vocab_size - 1})")
        if len(p) > a.max_seq_len:
            raise InputError(f"prompt {indices[i]} has {len(p)} tokens, more than the model's "
                             f"context of {a.max_seq_len}")
        if m < 0:
            raise InputError(f"prompt {indices[i]}: max_new_tokens {m} is negative")
        m = min(m, a.max_seq_len - len(p))
        if m > 0:  # nothing to generate: ([], length), as HF
            queue.append(Request(indices[i], np.asarray(p, dtype=np.int32), m, row0=i))
    if not queue:
        return results
    n_slots = max(1, min(batch_size, len(queue)))
    max_len = max(len(r.prompt) + r.max_new for r in queue)
    cache = KVCache(model.layers, n_slots, max_len, a.n_kv_heads, a.head_dim, model.dtype,
                    model.device)
    owner = np.full(n_slots, LOCAL, dtype=np.int64)
    local_index = np.arange(n_slots, dtype=np.int64)
    scheduler = Scheduler(queue, [range(n_slots)], max(r.max_new for r in queue), eos_ids, (),
                          False, a.max_seq_len, prefill_tokens=1 << 62,
                          params=Params(temperature, top_k, top_p, seed))
    with torch.no_grad():
        while not (scheduler.queue_empty and not scheduler.active):
            rows = order_rows(scheduler.plan(0), owner)
            logits = run_local_pass(model, cache, build_plan(rows, owner, local_index,
                                                             model.device))
            for f in scheduler.commit(rows, choose(logits, rows, None)):
                results[f.row] = (list(f.tokens), f.reason)
    return results
