"""The single-process reference `generate` (the job's scheduler and pass in one process) against
Hugging Face `generate(do_sample=False)`."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch
from model_fixtures import checkpoint, hf_model, random_prompts

from ghmpi.errors import InputError
from ghmpi.model import Transformer
from ghmpi.runtime.reference import FINISH_EOS, FINISH_LENGTH, generate


def hf_greedy(name: str, prompts: list[list[int]], max_new: list[int], eos: int) -> list[list[int]]:
    """HF greedy completions, one left-padded batch, cut per prompt at its own max_new / EOS
    (greedy decoding is prefix-consistent, so the cut equals a per-prompt run)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # (N, width) left-padded
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf_model(name).generate(ids, attention_mask=mask, do_sample=False,
                                      max_new_tokens=max(max_new), eos_token_id=[eos],
                                      pad_token_id=0)
    result = []
    for row, m in zip(out[:, width:].tolist(), max_new):
        row = row[:m]
        result.append(row[:row.index(eos) + 1] if eos in row else row)
    return result


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2"])
def test_greedy_equals_hf_generate_with_eos(name: str) -> None:
    model = Transformer.load(checkpoint(name))
    prompts = random_prompts(11, model.args.vocab_size, 1, 24, seed=10)
    max_new = [12 + (i % 4) for i in range(len(prompts))]
    # Pick as EOS a token greedy decoding really emits midway (never as the first token), so
    # some prompts stop early and others run to max_new_tokens.
    free = generate(model, prompts, max_new, eos_ids=())
    assert all(reason == FINISH_LENGTH and len(ids) == m for (ids, reason), m in zip(free, max_new))
    firsts = {ids[0] for ids, _ in free}
    counts = Counter(t for ids, _ in free for t in set(ids[2:8]) if t not in firsts)
    eos = counts.most_common(1)[0][0]

    ours = generate(model, prompts, max_new, eos_ids=[eos], batch_size=4)
    reasons = Counter(reason for _, reason in ours)
    assert reasons[FINISH_EOS] >= 1 and reasons[FINISH_LENGTH] >= 1, reasons
    assert [ids for ids, _ in ours] == hf_greedy(name, prompts, max_new, eos)
    for (ids, reason), m in zip(ours, max_new):
        if reason == FINISH_EOS:
            assert ids[-1] == eos and eos not in ids[:-1] and len(ids) <= m
        else:
            assert eos not in ids and len(ids) == m


def test_batch_size_and_order_do_not_change_results() -> None:
    model = Transformer.load(checkpoint("llama_linear_hd"))
    prompts = random_prompts(5, model.args.vocab_size, 1, 15, seed=11)
    max_new = [1, 6, 3, 0, 5]
    for sampling in (dict(), dict(temperature=1.3, top_k=20, top_p=0.9, seed=7)):
        one = generate(model, prompts, max_new, eos_ids=[2], batch_size=1, **sampling)
        many = generate(model, prompts, max_new, eos_ids=[2], batch_size=3, **sampling)
        order = [3, 0, 4, 1, 2]
        shuffled = generate(model, [prompts[i] for i in order], [max_new[i] for i in order],
                            eos_ids=[2], batch_size=16, prompt_indices=order, **sampling)
        assert one == many == [shuffled[order.index(i)] for i in range(len(prompts))]
        assert one[3] == ([], FINISH_LENGTH)
        assert [len(ids) for ids, r in one if r == FINISH_LENGTH] == \
            [m for (ids, r), m in zip(one, max_new) if r == FINISH_LENGTH]


def test_context_limit_and_bad_prompts() -> None:
    model = Transformer.load(checkpoint("mistral_sharded"))
    model.args = dataclasses.replace(model.args, max_seq_len=20)
    vocab = model.args.vocab_size
    p15, p20 = random_prompts(2, vocab, 15, 15, seed=12)[0], random_prompts(1, vocab, 20, 20, 13)[0]
    out = generate(model, [p15, p20], 10)
    assert len(out[0][0]) == 5 and out[0][1] == FINISH_LENGTH  # 15 + 5 == max_seq_len
    assert out[1] == ([], FINISH_LENGTH)
    with pytest.raises(InputError, match="prompt 1 has 21 tokens"):
        generate(model, [p15, p20 + [5]], 3)
    with pytest.raises(InputError, match="prompt 8 is empty"):
        generate(model, [p15, []], 3, prompt_indices=[7, 8])
    with pytest.raises(InputError, match=f"prompt 0: token id {vocab} outside"):
        generate(model, [[4, vocab]], 3)
