"""ModelArgs from config.json, the safetensors loader, check_checkpoint: real folders, real damage."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from model_fixtures import checkpoint, copy_checkpoint
from safetensors.torch import load_file, save_file

import ghmpi.model.loader as loader
from ghmpi.errors import ModelError
from ghmpi.model import ModelArgs, Transformer, check_checkpoint
from ghmpi.model.loader import INDEX_FILE, layer_shapes, read_header


def edit_json(file: Path, **changes) -> None:
    data = json.loads(file.read_text())
    for key, value in changes.items():
        if value is None and key.startswith("DEL_"):
            data.pop(key[4:], None)
        else:
            data[key] = value
    file.write_text(json.dumps(data))


def resave(file: Path, edit) -> None:
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


# ---- ModelArgs -------------------------------------------------------------------------------

def test_args_of_every_kind() -> None:
    a = ModelArgs.from_folder(checkpoint("llama_gqa"))
    assert (a.model_type, a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim) == \
        ("llama", 48, 3, 4, 2, 12)
    assert a.eos_token_ids == (2, 3) and a.bos_token_id == 1 and a.rope_scaling is None
    assert not a.qkv_bias and not a.tie_word_embeddings and a.max_seq_len == 256

    a = ModelArgs.from_folder(checkpoint("llama3_rope"))
    assert a.tie_word_embeddings and a.rope_theta == 500000.0 and a.n_kv_heads == 1
    assert a.rope_scaling == dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                  high_freq_factor=4.0, original_max_position_embeddings=64)

    a = ModelArgs.from_folder(checkpoint("llama_linear_hd"))
    assert a.head_dim == 24 and a.qkv_bias and a.o_bias
    assert a.rope_scaling == dict(rope_type="linear", factor=4.0)

    a = ModelArgs.from_folder(checkpoint("qwen2"))
    assert a.model_type == "qwen2" and a.qkv_bias and not a.o_bias and a.eos_token_ids == (2,)

    a = ModelArgs.from_folder(checkpoint("mistral_sharded"))
    assert a.model_type == "mistral" and a.hidden_dim == 64


def test_old_style_rope_keys_and_generation_config_eos(tmp_path: Path) -> None:
    folder = copy_checkpoint("llama_gqa", tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg.update(rope_theta=20000.0, rope_scaling={"type": "linear", "factor": 2.0}, eos_token_id=3)
    (folder / "config.json").write_text(json.dumps(cfg))
    edit_json(folder / "generation_config.json", eos_token_id=[3, 7, 9])
    a = ModelArgs.from_folder(folder)
    assert a.rope_theta == 20000.0 and a.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert a.eos_token_ids == (3, 7, 9)


@pytest.mark.parametrize("change, message", [
    (dict(model_type="gpt2"), "model_type 'gpt2' is not supported"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}),
     "rope type 'yarn' is not supported"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(num_key_value_heads=3), "not a multiple of num_key_value_heads"),
    (dict(DEL_hidden_size=None), "'hidden_size' is missing"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}),
     "needs a positive 'low_freq_factor'"),
])
def test_unsupported_configs(tmp_path: Path, change: dict, message: str) -> None:
    folder = copy_checkpoint("llama_gqa", tmp_path)
    edit_json(folder / "config.json", **change)
    with pytest.raises(ModelError, match="config.json.*" + message):
        ModelArgs.from_folder(folder)
    with pytest.raises(ModelError, match=message):
        check_checkpoint(folder)


def test_mistral_sliding_window_is_refused(tmp_path: Path) -> None:
    folder = copy_checkpoint("mistral_sharded", tmp_path)
    edit_json(folder / "config.json", sliding_window=64)
    with pytest.raises(ModelError, match="sliding_window 64 smaller than max_position_embeddings 256"):
        ModelArgs.from_folder(folder)
    edit_json(folder / "config.json", sliding_window=4096)  # larger than the context: harmless
    assert ModelArgs.from_folder(folder).max_seq_len == 256


def test_missing_or_unreadable_config(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        ModelArgs.from_folder(tmp_path / "nope")
    folder = copy_checkpoint("qwen2", tmp_path)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="config.json is not readable JSON"):
        Transformer.load(folder)
    (folder / "config.json").unlink()
    with pytest.raises(ModelError, match="config.json not found"):
        check_checkpoint(folder)


# ---- loader ----------------------------------------------------------------------------------

def test_missing_tensor(tmp_path: Path) -> None:
    folder = copy_checkpoint("llama_gqa", tmp_path)
    name = "model.layers.1.mlp.up_proj.weight"
    resave(folder / "model.safetensors", lambda t: t.pop(name))
    with pytest.raises(ModelError, match=f"tensor {name} is missing"):
        check_checkpoint(folder)
    with pytest.raises(ModelError, match=f"tensor {name} is missing"):
        Transformer.load(folder)
    Transformer.load(folder, layers=range(0, 1), head=False)  # a slice without it still loads


def test_wrong_shape(tmp_path: Path) -> None:
    folder = copy_checkpoint("qwen2", tmp_path)
    name = "model.layers.0.self_attn.k_proj.bias"
    resave(folder / "model.safetensors", lambda t: t.update({name: torch.zeros(17)}))
    expected = rf"model.safetensors: tensor {name} has shape \[17\], expected \[16\]"
    with pytest.raises(ModelError, match=expected):
        check_checkpoint(folder)
    with pytest.raises(ModelError, match=expected):
        Transformer.load(folder, layers=range(0, 1), embed=False, head=False)


def test_truncated_file(tmp_path: Path) -> None:
    folder = copy_checkpoint("llama_gqa", tmp_path)
    file = folder / "model.safetensors"
    os.truncate(file, file.stat().st_size - 100)
    with pytest.raises(ModelError, match="model.safetensors: truncated safetensors file"):
        check_checkpoint(folder)
    with pytest.raises(ModelError, match="model.safetensors: truncated.*tensor model"):
        Transformer.load(folder)
    os.truncate(file, 5)
    with pytest.raises(ModelError, match="model.safetensors: truncated safetensors file"):
        check_checkpoint(folder)


def test_check_checkpoint_reads_headers_only(tmp_path: Path, monkeypatch) -> None:
    """Overwrite every data byte with garbage and forbid safe_open: check_checkpoint still passes
    (it never looks at weights), while a real load sees the garbage."""
    folder = copy_checkpoint("llama3_rope", tmp_path)
    file = folder / "model.safetensors"
    header = read_header(file)
    with open(file, "r+b") as f:
        f.seek(header.data_start)
        f.write(b"\xff" * header.data_size)  # 0xffff... is NaN in float32
    def forbidden(*args, **kwargs):
        raise AssertionError("check_checkpoint opened tensor data")
    monkeypatch.setattr(loader, "safe_open", forbidden)
    args = check_checkpoint(folder)
    assert args.model_type == "llama" and args.tie_word_embeddings
    monkeypatch.undo()
    assert torch.isnan(Transformer.load(folder, layers=range(0, 1), head=False).weights[0].w2).all()


def test_corrupt_header_and_missing_shard(tmp_path: Path) -> None:
    folder = copy_checkpoint("mistral_sharded", tmp_path)
    index = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
    shard = folder / index["model.layers.2.mlp.down_proj.weight"]
    shard.unlink()
    with pytest.raises(ModelError, match=f"{shard.name} not found"):
        check_checkpoint(folder)
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage, no json")
    with pytest.raises(ModelError, match=f"{shard.name}: corrupt safetensors header"):
        Transformer.load(folder, layers=range(2, 3), embed=False, head=False)


def test_loads_only_the_requested_slice(tmp_path: Path) -> None:
    path = checkpoint("llama_gqa")
    mid = Transformer.load(path, layers=range(1, 2), embed=False, head=False)
    args = mid.args
    assert mid.loaded_names == set(layer_shapes(args, 1))
    assert list(mid.weights) == [1] and not mid.has_embed and not mid.has_head
    with pytest.raises(ValueError, match="layer 0 is not held"):
        mid.pre_attention(0, torch.zeros(1, args.dim), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="without the head"):
        mid.classify(torch.zeros(1, args.dim))
    first = Transformer.load(path, layers=range(0, 1), head=False)
    assert "lm_head.weight" not in first.loaded_names and "model.norm.weight" not in first.loaded_names
    assert "model.embed_tokens.weight" in first.loaded_names
    last = Transformer.load(path, layers=range(2, 3), embed=False)
    assert "model.embed_tokens.weight" not in last.loaded_names and last.has_head
    # a tied head reads the embedding matrix, but does not make the slice an embedding slice
    tied = Transformer.load(checkpoint("llama3_rope"), layers=range(1, 2), embed=False)
    assert "model.embed_tokens.weight" in tied.loaded_names and not tied.has_embed
    with pytest.raises(ModelError, match="not a contiguous slice"):
        Transformer.load(path, layers=range(2, 4))

    # The strongest form: destroy every shard that holds nothing of layer 2; layer 2 still loads.
    folder = copy_checkpoint("mistral_sharded", tmp_path)
    weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
    needed = {weight_map[name] for name in layer_shapes(ModelArgs.from_folder(folder), 2)}
    others = set(weight_map.values()) - needed
    assert others, "the sharded fixture should spread over several files"
    for fname in others:
        os.truncate(folder / fname, 0)
    part = Transformer.load(folder, layers=range(2, 3), embed=False, head=False)
    full = Transformer.load(checkpoint("mistral_sharded"), layers=range(2, 3), embed=False, head=False)
    assert torch.equal(part.weights[2].w13, full.weights[2].w13)
    with pytest.raises(ModelError):
        check_checkpoint(folder)
