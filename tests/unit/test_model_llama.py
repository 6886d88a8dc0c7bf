"""Stage functions (embed, pre_attention, attention, post_attention, classify) against HF logits."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import SPECS, checkpoint, hf_model, random_prompts

from ghmpi.model import KVCache, ModelArgs, Transformer, prefill_attention
from ghmpi.model.stages import decode_step, prefill

ATOL = 1e-4


def hf_logits(name: str, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(name)(torch.tensor([tokens])).logits[0].float()  # (L, vocab)


def stage_logits(slices: list[Transformer], tokens: list[int]) -> torch.Tensor:
    """The tier path by hand: embed on the first slice, layers slice by slice, head on the last."""
    t = torch.tensor(tokens)
    positions = torch.arange(len(tokens))
    x = slices[0].embed(t)
    for part in slices:
        for layer in part.layers:
            q, k, v = part.pre_attention(layer, x, positions)
            x = part.post_attention(layer, x, prefill_attention(q, k, v))
    return slices[-1].classify(x)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_stage_path_matches_hf(name: str) -> None:
    model = Transformer.load(checkpoint(name))
    for tokens in random_prompts(3, model.args.vocab_size, 1, 40, seed=1):
        logits = stage_logits([model], tokens)
        assert logits.dtype == torch.float32
        torch.testing.assert_close(logits, hf_logits(name, tokens), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["llama_gqa", "mistral_sharded", "qwen2"])
def test_two_slices_chained_match_hf(name: str) -> None:
    path = checkpoint(name)
    n = ModelArgs.from_folder(path).n_layers
    k = n // 2 + 1 if n > 2 else 1
    first = Transformer.load(path, layers=range(0, k), embed=True, head=False)
    second = Transformer.load(path, layers=range(k, n), embed=False, head=True)
    assert not first.has_head and not second.has_embed
    tokens = random_prompts(1, first.args.vocab_size, 30, 30, seed=2)[0]
    torch.testing.assert_close(stage_logits([first, second], tokens), hf_logits(name, tokens),
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["llama_gqa", "llama3_rope", "llama_linear_hd", "qwen2"])
def test_decode_path_matches_hf(name: str) -> None:
    """Batched prefill into the cache, then several batched decode steps through KVCache.decode,
    rows at different positions; each step's logits equal HF's full-sequence logits."""
    model = Transformer.load(checkpoint(name))
    a = model.args
    prompts = random_prompts(3, a.vocab_size, 3, 25, seed=3)
    steps = 5
    continuations = random_prompts(3, a.vocab_size, steps, steps, seed=4)
    # slots deliberately not 0..B-1 and the cache larger than needed
    slots = [4, 0, 2]
    cache = KVCache(model.layers, 5, 64, a.n_kv_heads, a.head_dim, torch.float32)
    logits = prefill(model, cache, prompts, slots)
    refs = [hf_logits(name, p + c) for p, c in zip(prompts, continuations)]
    for b, p in enumerate(prompts):
        torch.testing.assert_close(logits[b], refs[b][len(p) - 1], atol=ATOL, rtol=0)
    for step in range(steps):
        tokens = torch.tensor([c[step] for c in continuations])
        positions = torch.tensor([len(p) + step for p in prompts])
        logits = decode_step(model, cache, tokens, torch.tensor(slots), positions)
        for b, p in enumerate(prompts):
            torch.testing.assert_close(logits[b], refs[b][len(p) + step], atol=ATOL, rtol=0)


def test_kvcache_decode_masks_garbage_and_any_slot_order() -> None:
    """Rows of different lengths in one decode batch: each attends over exactly [0, pos] of its
    slot. The cache starts as garbage (here NaN, as torch.empty may hand out): the masked tail of
    a shorter row must not leak into its output (0 * NaN would). Contiguous slot runs (a view) and
    scattered slots (a gather) give the same answer."""
    torch.manual_seed(0)
    n_kv, D, H = 2, 8, 4
    lengths = [70, 2, 9]  # a long row beside short ones: their masked tails cross a zeroing chunk
    seqs = [(torch.randn(L + 1, H, D), torch.randn(L + 1, n_kv, D), torch.randn(L + 1, n_kv, D))
            for L in lengths]
    expected = torch.stack([prefill_attention(q, k, v)[-1] for q, k, v in seqs])  # (3, H*D)
    for slots in ([1, 2, 3], [3, 0, 2], [0, 2, 3]):  # one run, no run, runs of 1 and 2
        cache = KVCache([7], n_slots=4, max_len=160, n_kv_heads=n_kv, head_dim=D,
                        dtype=torch.float32)
        cache.k[7].fill_(float("nan"))
        cache.v[7].fill_(float("nan"))
        for slot, L, (q, k, v) in zip(slots, lengths, seqs):
            cache.write(7, slot, 0, k[:L], v[:L])
        o = cache.decode(7, torch.tensor(slots), torch.tensor(lengths),
                         torch.stack([q[-1] for q, _, _ in seqs]),
                         torch.stack([k[-1] for _, k, _ in seqs]),
                         torch.stack([v[-1] for _, _, v in seqs]))
        torch.testing.assert_close(o, expected, atol=1e-5, rtol=0)
        for slot, L, (q, k, v) in zip(slots, lengths, seqs):  # stored in place, readable back
            torch.testing.assert_close(cache.read(7, slot, L + 1)[0], k)
    assert cache.nbytes == KVCache.nbytes_for(1, 4, 160, n_kv, D, torch.float32) == 2 * 4 * 160 * 2 * 8 * 4
    assert KVCache.nbytes_for(4, 2, 10, 2, 8, torch.bfloat16) == 2 * 4 * 2 * 10 * 2 * 8 * 2
    with pytest.raises(IndexError):
        cache.write(7, 0, 158, seqs[0][1][:3], seqs[0][2][:3])


def test_bf16_weights_and_cache_stay_close() -> None:
    """bfloat16 compute with a bfloat16 cache: same shapes and dtypes, logits near float32's."""
    path = checkpoint("llama_gqa")
    m32 = Transformer.load(path)
    m16 = Transformer.load(path, dtype=torch.bfloat16)
    assert m16.weights[0].wqkv.dtype == torch.bfloat16
    tokens = random_prompts(1, m32.args.vocab_size, 12, 12, seed=5)[0]
    a = m16.args
    cache = KVCache(m16.layers, 1, 32, a.n_kv_heads, a.head_dim, torch.bfloat16)
    logits16 = prefill(m16, cache, [tokens], [0])
    assert logits16.dtype == torch.float32
    logits32 = m32.forward(torch.tensor(tokens))[-1]
    assert (logits16[0] - logits32).abs().max() < 0.1 * logits32.abs().max()


@pytest.mark.parametrize("name", ["llama3_rope", "llama_linear_hd", "qwen2"])
def test_rope_frequencies_match_hf(name: str) -> None:
    from ghmpi.model.rope import inv_freq

    args = ModelArgs.from_folder(checkpoint(name))
    ours = inv_freq(args)
    assert torch.equal(ours, hf_model(name).model.rotary_emb.inv_freq)
    if name == "llama3_rope":  # every band of the llama3 scaling is present
        plain = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2).float() / args.head_dim))
        ratio = plain / ours
        assert (ratio == 1).any() and (ratio == 8).any() and ((ratio > 1) & (ratio < 8)).any()
