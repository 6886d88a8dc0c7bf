"""Tiny random Hugging Face checkpoints for the model tests, built once per test session.

Each spec is a real transformers model saved with `save_pretrained` into a temporary folder. The
random weights are scaled up (and norms/biases randomised, since HF initialises them to 1 and 0)
so logits are peaked and a wrong stage shows up as a wrong argmax, not as a 1e-6 wobble.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

_COMMON = dict(vocab_size=96, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1,
               pad_token_id=0)

# name -> (config class, model class, config kwargs, save kwargs)
SPECS: dict[str, tuple[type, type, dict[str, Any], dict[str, Any]]] = {
    # grouped-query attention, eos given as a list
    "llama_gqa": (LlamaConfig, LlamaForCausalLM, dict(
        hidden_size=48, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
        num_hidden_layers=3, eos_token_id=[2, 3], **_COMMON), {}),
    # Llama 3.1 rope scaling (original context 64 puts one of the 8 frequencies in each band:
    # kept (wavelength < 16), smoothed (16..64, here 32.5), divided by factor (> 64)),
    # tied embeddings (no lm_head.weight in the file)
    "llama3_rope": (LlamaConfig, LlamaForCausalLM, dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=1, intermediate_size=96,
        num_hidden_layers=2, tie_word_embeddings=True, eos_token_id=2, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=64),
        **_COMMON), {}),
    # linear rope scaling, head_dim given explicitly (24 != 32 // 4), attention_bias (q/k/v/o)
    "llama_linear_hd": (LlamaConfig, LlamaForCausalLM, dict(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
        intermediate_size=64, num_hidden_layers=2, attention_bias=True, eos_token_id=2,
        rope_scaling=dict(rope_type="linear", factor=4.0), **_COMMON), {}),
    # q/k/v bias, no o bias, tied embeddings
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(
        hidden_size=48, num_attention_heads=6, num_key_value_heads=2, intermediate_size=80,
        num_hidden_layers=2, tie_word_embeddings=True, eos_token_id=2, **_COMMON), {}),
    # sliding_window null, saved as several shards with an index
    "mistral_sharded": (MistralConfig, MistralForCausalLM, dict(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        num_hidden_layers=3, sliding_window=None, eos_token_id=2, **_COMMON),
        dict(max_shard_size="20KB")),
}

_ROOT = Path(tempfile.mkdtemp(prefix="ghmpi-model-tests-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


def _scale_weights(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:  # projections: std 1/sqrt(fan_in) * 1.5 keeps activations O(1) but peaked
                p.copy_(1.5 * torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


@cache
def checkpoint(name: str) -> Path:
    """Folder of a saved tiny checkpoint (shared, read-only: copy it before damaging it)."""
    config_cls, model_cls, cfg, save = SPECS[name]
    torch.manual_seed(0)
    model = model_cls(config_cls(**cfg))
    _scale_weights(model, seed=sorted(SPECS).index(name) + 1)
    folder = _ROOT / name
    model.save_pretrained(folder, **save)
    return folder


@cache
def hf_model(name: str) -> torch.nn.Module:
    """The HF reference, reloaded from the saved folder, eager attention, float32, eval mode."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint(name), dtype=torch.float32,
                                                 attn_implementation="eager")
    return model.eval()


def copy_checkpoint(name: str, dest: Path) -> Path:
    """A private copy of a checkpoint folder that a test may damage."""
    out = dest / name
    shutil.copytree(checkpoint(name), out)
    return out


def random_prompts(n: int, vocab: int, min_len: int, max_len: int, seed: int,
                   avoid: tuple[int, ...] = (0, 1, 2, 3)) -> list[list[int]]:
    """n prompts of lengths in [min_len, max_len], ids drawn away from special tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (), generator=g))
        ids = torch.randint(len(avoid), vocab, (length,), generator=g).tolist()
        out.append(ids)
    return out
