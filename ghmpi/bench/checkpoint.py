"""Random-weight Hugging Face checkpoints of real shapes, built on the machine (no download).

`shapes` names the architectures the benchmarks use; `build(path, name)` writes config.json and
sharded safetensors (bf16, normal weights of std 0.02, norms 1) in the layout transformers and
ghmpi load. The weights are drawn on the GPU when there is one (an 8B model takes seconds).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

SHAPES: dict[str, dict] = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      rope_theta=500000.0, max_position_embeddings=8192),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                      rope_theta=10000.0, max_position_embeddings=4096),
    # Llama-2-70B's layer width; the layer count is chosen by the caller (disk, memory)
    "llama2-70b-width": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=8,
                             num_attention_heads=64, num_key_value_heads=8, vocab_size=32000,
                             rope_theta=10000.0, max_position_embeddings=4096),
    # for CI: the same code paths in seconds on a CPU
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                 rope_theta=10000.0, max_position_embeddings=2048),
}


def hf_config(name: str, n_layers: int | None = None) -> dict:
    cfg = dict(SHAPES[name])
    if n_layers:
        cfg["num_hidden_layers"] = n_layers
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
               rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
               torch_dtype="bfloat16", attention_bias=False, mlp_bias=False)
    return cfg


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    d, h, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = d // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    out = {"model.embed_tokens.weight": (cfg["vocab_size"], d), "model.norm.weight": (d,),
           "lm_head.weight": (cfg["vocab_size"], d)}
    for i in range(L):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                    p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
                    p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
                    p + "mlp.gate_proj.weight": (h, d), p + "mlp.up_proj.weight": (h, d),
                    p + "mlp.down_proj.weight": (d, h)})
    return out


def build(path: str | os.PathLike, name: str, n_layers: int | None = None, seed: int = 0,
          shard_gb: float = 4.0) -> Path:
    """Write a random checkpoint of shape `name` into folder `path` (reused if complete)."""
    from safetensors.torch import save_file

    folder = Path(path)
    cfg = hf_config(name, n_layers)
    if (folder / "model.safetensors.index.json").is_file():
        if json.loads((folder / "config.json").read_text()) == cfg:
            return folder
    folder.mkdir(parents=True, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for tname, shape in tensor_shapes(cfg).items():
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=g, device=dev, dtype=torch.float32) * 0.02)
            t = t.to(torch.bfloat16).cpu()
        nbytes = t.numel() * 2
        if size + nbytes > shard_gb * 2**30 and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][tname] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    return folder
