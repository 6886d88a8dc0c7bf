"""The single-process reference: whole model, one cache, continuous batching.

It runs the very stage functions the tiers run (embed, pre_attention, attention through the
KVCache, post_attention, classify, sample), so it is both the baseline the MPI job is checked
against and the proof, against Hugging Face, that those stages are right.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ghmpi.errors import InputError
from ghmpi.model.attention import prefill_attention
from ghmpi.model.kvcache import KVCache
from ghmpi.model.llama import Transformer
from ghmpi.model.sampling import sample

FINISH_EOS = 1  # stopped on an id in eos_ids (kept as the last generated id)
FINISH_LENGTH = 2  # max_new_tokens reached, or the model's context limit


@dataclass(slots=True)
class _Seq:
    index: int  # position in the caller's prompt list
    prompt_index: int  # the index that seeds sampling
    prompt: list[int]
    max_new: int
    slot: int = -1
    out: list[int] = field(default_factory=list)
    finish: int = 0

    @property
    def next_position(self) -> int:
        """Position of the token to be generated next."""
        return len(self.prompt) + len(self.out)


def prefill(model: Transformer, cache: KVCache, prompts: Sequence[Sequence[int]],
            slots: Sequence[int]) -> torch.Tensor:
    """Run prompts token-packed through every layer, filling their cache slots from position 0.
    -> logits (len(prompts), vocab) float32 of each prompt's last token."""
    dev = model.device
    lens = [len(p) for p in prompts]
    tokens = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=dev)  # (n,)
    positions = torch.cat([torch.arange(n, device=dev) for n in lens])  # (n,)
    bounds = [0]
    for n in lens:
        bounds.append(bounds[-1] + n)
    x = model.embed(tokens)  # (n, dim)
    for layer in model.layers:
        q, k, v = model.pre_attention(layer, x, positions)
        o = torch.empty(x.shape[0], q.shape[1] * q.shape[2], dtype=q.dtype, device=dev)
        for slot, s, e in zip(slots, bounds[:-1], bounds[1:]):
            cache.write(layer, slot, 0, k[s:e], v[s:e])
            o[s:e] = prefill_attention(q[s:e], k[s:e], v[s:e])
        x = model.post_attention(layer, x, o)
    last = torch.tensor(bounds[1:], device=dev) - 1
    return model.classify(x[last])


def decode_step(model: Transformer, cache: KVCache, tokens: torch.Tensor, slots: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor:
    """One token per row: tokens, slots, positions (B,) long -> logits (B, vocab) float32."""
    x = model.embed(tokens)  # (B, dim)
    ctx_len = int(positions.max()) + 1
    for layer in model.layers:
        q, k, v = model.pre_attention(layer, x, positions)
        o = cache.decode(layer, slots, positions, q, k, v, ctx_len=ctx_len)
        x = model.post_attention(layer, x, o)
    return model.classify(x)


def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int | list[int],
             eos_ids: Sequence[int] = (), temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, prompt_indices: list[int] | None = None,
             batch_size: int = 8) -> list[tuple[list[int], int]]:
    """Generate for every prompt -> per prompt (generated ids, finish_reason) in input order.

    finish_reason 1: stopped on an id in eos_ids (that id is the last one, as HF generate);
    2: max_new_tokens reached or the context is full (prompt + generated == max_seq_len).
    Up to `batch_size` sequences decode together; a finished one's slot takes the next prompt.
    """
    a = model.args
    if not (model.has_embed and model.has_head and len(model.layers) == a.n_layers):
        raise ValueError("generate() needs a Transformer holding every layer, embedding and head")
    n = len(prompts)
    if isinstance(max_new_tokens, int):
        max_new = [max_new_tokens] * n
    else:
        max_new = list(max_new_tokens)
        if len(max_new) != n:
            raise InputError(f"max_new_tokens has {len(max_new)} values for {n} prompts")
    indices = list(range(n)) if prompt_indices is None else list(prompt_indices)
    if len(indices) != n:
        raise InputError(f"prompt_indices has {len(indices)} values for {n} prompts")
    eos = set(int(t) for t in eos_ids)

    seqs: list[_Seq] = []
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
        s = _Seq(i, indices[i], p, min(m, a.max_seq_len - len(p)))
        if s.max_new == 0:
            s.finish = FINISH_LENGTH
        seqs.append(s)

    queue = [s for s in seqs if not s.finish]
    if queue:
        n_slots = max(1, min(batch_size, len(queue)))
        max_len = max(len(s.prompt) + s.max_new for s in queue)
        cache = KVCache(model.layers, n_slots, max_len, a.n_kv_heads, a.head_dim, model.dtype,
                        model.device)
        free = list(range(n_slots))
        active: list[_Seq] = []
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        while queue or active:
            admitted: list[_Seq] = []
            while queue and free:
                s = queue.pop(0)
                s.slot = free.pop(0)
                admitted.append(s)
            if admitted:
                logits = prefill(model, cache, [s.prompt for s in admitted],
                                 [s.slot for s in admitted])
                _choose(admitted, logits, eos, model.device, sampling)
                active += admitted
            else:
                dev = model.device
                tokens = torch.tensor([s.out[-1] for s in active], device=dev)
                slots = torch.tensor([s.slot for s in active], device=dev)
                positions = torch.tensor([s.next_position - 1 for s in active], device=dev)
                logits = decode_step(model, cache, tokens, slots, positions)
                _choose(active, logits, eos, dev, sampling)
            for s in active:
                if s.finish:
                    free.append(s.slot)
            active = [s for s in active if not s.finish]
    return [(s.out, s.finish) for s in seqs]


def _choose(seqs: list[_Seq], logits: torch.Tensor, eos: set[int], device: torch.device,
            sampling: dict) -> None:
    """Sample one token per sequence and mark the ones that finish."""
    index = torch.tensor([s.prompt_index for s in seqs], device=device)
    position = torch.tensor([s.next_position for s in seqs], device=device)
    for s, t in zip(seqs, sample(logits, index, position, **sampling).tolist()):
        s.out.append(t)
        if t in eos:
            s.finish = FINISH_EOS
        elif len(s.out) >= s.max_new:
            s.finish = FINISH_LENGTH
