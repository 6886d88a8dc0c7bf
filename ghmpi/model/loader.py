"""Reading Hugging Face safetensors checkpoints: only the tensors asked for, memory-mapped.

A rank holding layers 10-19 of a 70B model opens the shards it needs and copies out only its
tensors; the rest of the files are never read. Headers are parsed here directly (8-byte length +
JSON), which lets `check_checkpoint` validate names, shapes and file sizes without touching data.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ghmpi.errors import ModelError
from ghmpi.model.args import ModelArgs

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_FLOAT_DTYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True, slots=True)
class TensorInfo:
    dtype: str  # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # byte offsets into the data section
    end: int


@dataclass(frozen=True, slots=True)
class Header:
    file: Path
    tensors: dict[str, TensorInfo]
    data_start: int  # 8 + header length
    data_size: int  # bytes the header says the data section holds
    file_size: int

    @property
    def truncated(self) -> bool:
        return self.file_size < self.data_start + self.data_size


def read_header(file: Path) -> Header:
    """Parse a safetensors header without reading any tensor data."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelError(f"{file}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise ModelError(f"{file}: truncated or corrupt safetensors file (header of {n} "
                                 f"bytes declared, file has {size} bytes)")
            raw = f.read(n)
    except FileNotFoundError:
        raise ModelError(f"{file} not found") from None
    except OSError as e:
        raise ModelError(f"{file} is not readable: {e}") from None
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelError(f"{file}: corrupt safetensors header (not JSON)") from None
    if not isinstance(meta, dict):
        raise ModelError(f"{file}: corrupt safetensors header (not a JSON object)")
    tensors: dict[str, TensorInfo] = {}
    data_size = 0
    for name, entry in meta.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = entry["dtype"], tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{file}: corrupt safetensors header entry for tensor {name}") from None
        numel = 1
        for d in shape:
            numel *= d
        if dtype not in _ITEMSIZE or end - begin != numel * _ITEMSIZE[dtype] or begin < 0:
            raise ModelError(f"{file}: corrupt safetensors header entry for tensor {name}")
        tensors[name] = TensorInfo(dtype, shape, begin, end)
        data_size = max(data_size, end)
    return Header(file, tensors, 8 + n, data_size, size)


class Checkpoint:
    """The tensor-name -> file map of a model folder, with headers parsed lazily per file."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.folder = Path(path)
        self._headers: dict[Path, Header] = {}
        index = self.folder / INDEX_FILE
        single = self.folder / SINGLE_FILE
        if index.is_file():
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
                raise ModelError(f"{index} is not a valid safetensors index "
                                 f"(no weight_map)") from None
            self.files = {name: self.folder / fname for name, fname in weight_map.items()}
        elif single.is_file():
            header = self.header(single)
            self.files = {name: single for name in header.tensors}
        else:
            raise ModelError(f"{self.folder}: neither {SINGLE_FILE} nor {INDEX_FILE} found")

    def header(self, file: Path) -> Header:
        if file not in self._headers:
            self._headers[file] = read_header(file)
        return self._headers[file]

    def info(self, name: str) -> tuple[Path, TensorInfo]:
        """File and header entry of one tensor; ModelError when it is absent."""
        file = self.files.get(name)
        if file is None:
            raise ModelError(f"{self.folder}: tensor {name} is missing from the checkpoint")
        entry = self.header(file).tensors.get(name)
        if entry is None:
            raise ModelError(f"{file}: tensor {name} is missing (listed in the index, "
                             f"absent from the file)")
        return file, entry

    def check(self, name: str, shape: tuple[int, ...]) -> Path:
        """Validate one tensor's presence, shape, dtype and that its bytes lie inside the file."""
        file, entry = self.info(name)
        if entry.shape != tuple(shape):
            raise ModelError(f"{file}: tensor {name} has shape {list(entry.shape)}, "
                             f"expected {list(shape)}")
        if entry.dtype not in _FLOAT_DTYPES:
            raise ModelError(f"{file}: tensor {name} has dtype {entry.dtype}, expected one of "
                             f"{', '.join(_FLOAT_DTYPES)}")
        self.check_whole(file, f"; tensor {name} cannot be read")
        return file

    def check_whole(self, file: Path, consequence: str = "") -> None:
        """ModelError if `file` is shorter than its header says (a copy cut short)."""
        header = self.header(file)
        if header.truncated:
            raise ModelError(f"{file}: truncated safetensors file (header declares "
                             f"{header.data_start + header.data_size} bytes, file has "
                             f"{header.file_size}){consequence}")

    def load(self, wanted: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        """Read exactly the tensors in `wanted` (name -> expected shape), as stored, on the CPU."""
        by_file: dict[Path, list[str]] = {}
        for name, shape in wanted.items():
            by_file.setdefault(self.check(name, shape), []).append(name)
        out: dict[str, torch.Tensor] = {}
        for file, names in by_file.items():
            name = names[0]
            try:
                with safe_open(str(file), framework="pt", device="cpu") as f:
                    for name in names:
                        out[name] = f.get_tensor(name)
            except (SafetensorError, OSError, RuntimeError) as e:
                raise ModelError(f"{file}: cannot read tensor {name}: {e}") from None
        return out


def tensor_shapes(args: ModelArgs, layers: range, embed: bool, head: bool
                  ) -> dict[str, tuple[int, ...]]:
    """Checkpoint names and shapes a slice needs. A tied head reads the embedding matrix."""
    shapes: dict[str, tuple[int, ...]] = {}
    if embed or (head and args.tie_word_embeddings):
        shapes["model.embed_tokens.weight"] = (args.vocab_size, args.dim)
    for i in layers:
        shapes.update(layer_shapes(args, i))
    if head:
        shapes["model.norm.weight"] = (args.dim,)
        if not args.tie_word_embeddings:
            shapes["lm_head.weight"] = (args.vocab_size, args.dim)
    return shapes


def layer_shapes(args: ModelArgs, i: int) -> dict[str, tuple[int, ...]]:
    p = f"model.layers.{i}."
    shapes = {
        p + "input_layernorm.weight": (args.dim,),
        p + "self_attn.q_proj.weight": (args.q_size, args.dim),
        p + "self_attn.k_proj.weight": (args.kv_size, args.dim),
        p + "self_attn.v_proj.weight": (args.kv_size, args.dim),
        p + "self_attn.o_proj.weight": (args.dim, args.q_size),
        p + "post_attention_layernorm.weight": (args.dim,),
        p + "mlp.gate_proj.weight": (args.hidden_dim, args.dim),
        p + "mlp.up_proj.weight": (args.hidden_dim, args.dim),
        p + "mlp.down_proj.weight": (args.dim, args.hidden_dim),
    }
    if args.qkv_bias:
        shapes[p + "self_attn.q_proj.bias"] = (args.q_size,)
        shapes[p + "self_attn.k_proj.bias"] = (args.kv_size,)
        shapes[p + "self_attn.v_proj.bias"] = (args.kv_size,)
    if args.o_bias:
        shapes[p + "self_attn.o_proj.bias"] = (args.dim,)
    return shapes


def check_checkpoint(path: str | os.PathLike) -> ModelArgs:
    """Cheap validation for rank 0 before the job starts: config supported, every tensor the whole
    model needs present with the right shape, no file truncated. Reads headers only."""
    args = ModelArgs.from_folder(path)
    ckpt = Checkpoint(path)
    for name, shape in tensor_shapes(args, range(args.n_layers), embed=True, head=True).items():
        ckpt.check(name, shape)
    for file in sorted(set(ckpt.files.values())):  # truncation anywhere, even in unused tensors
        ckpt.check_whole(file)
    return args
