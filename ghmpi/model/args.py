"""The model blueprint: what a Hugging Face `config.json` says, reduced to what the math needs.

Supported: Llama-family decoders (`llama`, `mistral`, `qwen2`) with SiLU-gated MLP, RMSNorm,
grouped-query attention and rotary embeddings (default, `linear` or `llama3` scaling). Anything
else is refused here, before a weight is read, with a `ModelError` naming the file and key.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ghmpi.errors import ModelError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass(frozen=True, slots=True)
class ModelArgs:
    model_type: str  # llama | mistral | qwen2
    dim: int  # hidden_size
    n_layers: int  # num_hidden_layers
    n_heads: int  # num_attention_heads (query heads)
    n_kv_heads: int  # num_key_value_heads; divides n_heads
    head_dim: int  # config head_dim when given, else dim // n_heads
    hidden_dim: int  # intermediate_size of the MLP
    vocab_size: int
    norm_eps: float  # rms_norm_eps
    rope_theta: float  # RoPE base
    rope_scaling: dict[str, Any] | None  # None, or {"rope_type": "linear" | "llama3", ...params}
    max_seq_len: int  # max_position_embeddings: prompt + generated tokens never exceed it
    tie_word_embeddings: bool  # LM head reuses the embedding matrix
    qkv_bias: bool  # q/k/v projections carry a bias (qwen2; llama with attention_bias)
    eos_token_ids: tuple[int, ...]  # config.json and generation_config.json, merged in that order
    bos_token_id: int | None
    o_bias: bool = False  # output projection carries a bias (llama with attention_bias)

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim",
                     "vocab_size", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ModelError(f"model {name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ModelError(f"num_attention_heads ({self.n_heads}) is not a multiple of "
                             f"num_key_value_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ModelError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> "ModelArgs":
        """Read `config.json` (and `generation_config.json` if present) of a model folder."""
        folder = Path(path)
        if not folder.is_dir():
            raise ModelError(f"model folder {folder} does not exist or is not a directory")
        config_file = folder / "config.json"
        cfg = _read_json(config_file)
        gen_file = folder / "generation_config.json"
        gen = _read_json(gen_file) if gen_file.is_file() else {}
        return cls.from_config(cfg, gen, where=str(config_file))

    @classmethod
    def from_config(cls, cfg: dict[str, Any], gen: dict[str, Any] | None = None,
                    where: str = "config.json") -> "ModelArgs":
        """Build from already-parsed config dicts; `where` names the source in errors."""
        gen = gen or {}
        if not isinstance(cfg, dict):
            raise ModelError(f"{where}: expected a JSON object")
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelError(f"{where}: model_type {model_type!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")

        def need(key: str, kind: type = int) -> Any:
            if key not in cfg or cfg[key] is None:
                raise ModelError(f"{where}: required key {key!r} is missing")
            value = cfg[key]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ModelError(f"{where}: key {key!r} must be {kind.__name__}, got {value!r}")
            return value

        def optional(key: str, default: int) -> int:
            if cfg.get(key) is None:
                return default
            return need(key)

        dim = need("hidden_size")
        n_heads = need("num_attention_heads")
        if n_heads <= 0:
            raise ModelError(f"{where}: num_attention_heads must be positive, got {n_heads}")
        n_kv_heads = optional("num_key_value_heads", n_heads)
        head_dim = optional("head_dim", dim // n_heads)
        max_seq_len = need("max_position_embeddings")

        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ModelError(f"{where}: hidden_act {act!r} is not supported (only silu)")
        if cfg.get("mlp_bias"):
            raise ModelError(f"{where}: mlp_bias true is not supported")
        _check_sliding_window(cfg, model_type, max_seq_len, where)
        rope_theta, rope_scaling = _rope(cfg, where)

        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(cfg.get("attention_bias", False))

        eos: list[int] = []
        for source, name in ((cfg, where), (gen, "generation_config.json")):
            for token in _int_list(source.get("eos_token_id"), name):
                if token not in eos:
                    eos.append(token)
        bos = cfg.get("bos_token_id")
        if bos is None:
            bos = gen.get("bos_token_id")
        if isinstance(bos, list):  # a few configs give a list; the first is the one used
            bos = bos[0] if bos else None

        fields = dict(
            model_type=model_type,
            dim=dim,
            n_layers=need("num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            hidden_dim=need("intermediate_size"),
            vocab_size=need("vocab_size"),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_seq_len=max_seq_len,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            eos_token_ids=tuple(eos),
            bos_token_id=bos,
            o_bias=o_bias,
        )
        try:
            return cls(**fields)
        except ModelError as e:  # __post_init__ checks: name the file
            raise ModelError(f"{where}: {e}") from None


def _read_json(file: Path) -> dict[str, Any]:
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ModelError(f"{file} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{file} is not readable JSON: {e}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{file}: expected a JSON object")
    return data


def _int_list(value: Any, where: str) -> list[int]:
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise ModelError(f"{where}: eos_token_id must be an int or a list of ints, got {value!r}")
    return list(items)


def _check_sliding_window(cfg: dict[str, Any], model_type: str, max_seq_len: int,
                          where: str) -> None:
    """Sliding-window attention changes the math once a sequence outgrows the window: refuse it."""
    window = cfg.get("sliding_window")
    layer_types = cfg.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise ModelError(f"{where}: layer_types {sorted(set(layer_types))} is not supported "
                         f"(only full_attention)")
    if model_type == "qwen2":
        # Qwen2 ignores sliding_window unless use_sliding_window is set (and then only for layers
        # from max_window_layers on).
        if not cfg.get("use_sliding_window", False):
            return
        if cfg.get("max_window_layers", 0) >= cfg.get("num_hidden_layers", 0):
            return
    if window is not None and window < max_seq_len:
        raise ModelError(f"{where}: sliding_window {window} smaller than max_position_embeddings "
                         f"{max_seq_len} is not supported")


def _rope(cfg: dict[str, Any], where: str) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either the transformers 5 `rope_parameters` dict or the
    older top-level `rope_theta` + `rope_scaling` pair."""
    params = cfg.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict) or ("rope_type" not in params and "type" not in params
                                            and "rope_theta" not in params):
            raise ModelError(f"{where}: rope_parameters {params!r} is not supported")
        merged = dict(params)
    else:
        merged = dict(cfg.get("rope_scaling") or {})
        if not isinstance(cfg.get("rope_scaling") or {}, dict):
            raise ModelError(f"{where}: rope_scaling must be an object")
    theta = merged.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise ModelError(f"{where}: rope_theta must be a positive number, got {theta!r}")
    rope_type = merged.pop("rope_type", None) or merged.pop("type", None) or "default"
    merged.pop("type", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelError(f"{where}: rope type {rope_type!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    partial = merged.pop("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ModelError(f"{where}: partial_rotary_factor {partial} is not supported")
    if rope_type == "default":
        return float(theta), None
    needed = ("factor",) if rope_type == "linear" else _LLAMA3_KEYS
    for key in needed:
        value = merged.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ModelError(f"{where}: rope scaling {rope_type!r} needs a positive {key!r}, "
                             f"got {value!r}")
    scaling: dict[str, Any] = {"rope_type": rope_type}
    scaling.update({key: merged[key] for key in needed})
    if rope_type == "llama3" and scaling["high_freq_factor"] == scaling["low_freq_factor"]:
        raise ModelError(f"{where}: llama3 rope scaling needs high_freq_factor != low_freq_factor")
    return float(theta), scaling
