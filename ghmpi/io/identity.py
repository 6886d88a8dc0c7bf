"""A job's identity: a digest of exactly what its completions depend on.

A rerun resumes the parts of an earlier run only when the identities match, so the identity must
change with anything that changes a completion and with nothing else:

- the prompts' content (`PromptStats.sha256`: offsets, token ids, per-prompt max_new_tokens);
- the model's content: config.json and generation_config.json as data, every safetensors file's
  tensor header (names, dtypes, shapes, offsets), and a few KiB of weight bytes sampled at fixed
  fractions of each file's data section, so that two checkpoints of one shape (a base model and
  its fine-tune) differ. Cheap for a 70B model: headers plus 64 KiB per file;
- the compute dtype (and the KV-cache dtype where it differs from it);
- the generation settings, as data: canonical JSON of the fields that differ from their default,
  so a ghmpi that adds a generation field (at its default) keeps the identity of earlier jobs.

Not in it: paths (a moved or copied model or prompts file resumes), Python reprs, layout and
runtime keys (slices, tier-2 ranks, micro-batching, threads, flush intervals).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

__all__ = ["model_identity", "job_identity", "identity_parts", "identity_digest",
           "identity_difference", "generation_settings", "canonical_json"]

IDENTITY_VERSION = "ghmpi-job-identity-2"
SAMPLES_PER_FILE = 16  # weight samples per safetensors file
SAMPLE_BYTES = 4096  # bytes per sample
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


def canonical_json(value: Any) -> str:
    """One text per value: sorted keys, no whitespace, tuples as lists, UTF-8 kept."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _json_file(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _safetensors_part(path: Path) -> tuple[Any, list[bytes]]:
    """(header as data without __metadata__, sampled weight bytes) of one safetensors file."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(min(n, _MAX_HEADER)))
        header.pop("__metadata__", None)  # free-form provenance: no completion depends on it
        start = 8 + n
        size = max(0, os.fstat(f.fileno()).st_size - start)
        samples = []
        if size:
            chunk = min(SAMPLE_BYTES, size)
            for i in range(SAMPLES_PER_FILE):
                f.seek(start + (size - chunk) * i // max(SAMPLES_PER_FILE - 1, 1))
                samples.append(f.read(chunk))
    return header, samples


def model_identity(path: str | os.PathLike) -> str:
    """Digest of a checkpoint's content (not of its path): config, headers, sampled weights."""
    folder = Path(path)
    h = hashlib.sha256(IDENTITY_VERSION.encode())
    h.update(canonical_json(_json_file(folder / "config.json")).encode())
    gen = folder / "generation_config.json"  # its eos ids stop sequences
    h.update(canonical_json(_json_file(gen) if gen.is_file() else None).encode())
    for f in sorted(folder.glob("*.safetensors")):
        header, samples = _safetensors_part(f)
        h.update(canonical_json(header).encode())
        for s in samples:
            h.update(len(s).to_bytes(8, "little") + s)
    return h.hexdigest()


def generation_settings(cfg: Any) -> dict[str, Any]:
    """The generation section as data: the fields whose value differs from the default."""
    out = {}
    for f in fields(cfg.generation):
        value = getattr(cfg.generation, f.name)
        if value != f.default:
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def identity_parts(cfg: Any, prompts_sha: str, model_id: str) -> dict[str, Any]:
    """What a completion depends on, as data: prompts, model, compute dtype(s), generation
    settings. `cfg` is a `ghmpi.config.Config`. Kept in the parts folder, so that a refusal can
    say what differs."""
    what = {"version": IDENTITY_VERSION, "prompts": prompts_sha, "model": model_id,
            "dtype": cfg.model.dtype, "generation": generation_settings(cfg)}
    if cfg.kv_dtype != cfg.model.dtype:
        what["kv_dtype"] = cfg.kv_dtype
    return what


def job_identity(cfg: Any, prompts_sha: str, model_id: str) -> str:
    """The digest of `identity_parts`: the job id."""
    return identity_digest(identity_parts(cfg, prompts_sha, model_id))


def identity_digest(parts: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(parts).encode()).hexdigest()


_WHAT = {"prompts": "prompts (content)", "model": "model (weights or config)",
         "dtype": "model.dtype", "kv_dtype": "topology.kv_dtype", "version": "ghmpi identity version"}


def identity_difference(ours: dict[str, Any], theirs: Any) -> str:
    """'generation.temperature (0.7 there, default here), model (weights or config)': what
    differs between two `identity_parts`; '' when unknown (an older parts folder)."""
    if not isinstance(theirs, dict):
        return ""
    said = []
    for key in sorted(set(ours) | set(theirs)):
        a, b = ours.get(key), theirs.get(key)
        if a == b:
            continue
        if key == "generation" and isinstance(a, dict) and isinstance(b, dict):
            for name in sorted(set(a) | set(b)):
                if a.get(name) != b.get(name):
                    here = canonical_json(a[name]) if name in a else "default"
                    there = canonical_json(b[name]) if name in b else "default"
                    said.append(f"generation.{name} ({there} there, {here} here)")
        elif key in ("dtype", "kv_dtype"):
            said.append(f"{_WHAT[key]} ({b or 'auto'} there, {a or 'auto'} here)")
        else:
            said.append(_WHAT.get(key, key))
    return ", ".join(said)
