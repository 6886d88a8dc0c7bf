"""Job identity = what the completions depend on: content, not paths, reprs, layout or runtime."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from ghmpi.config import load_config
from ghmpi.io.identity import generation_settings, job_identity, model_identity

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "data" / "tiny-llama"


@pytest.fixture()
def model_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "models" / "a"
    shutil.copytree(MODEL, dst)
    return dst


def _flip_weight_byte(folder: Path, fraction: float) -> None:
    """Change one byte inside the data section (a fine-tune of the same shape)."""
    f = folder / "model.safetensors"
    data = bytearray(f.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    at = start + int((len(data) - start - 1) * fraction)
    data[at] ^= 0xFF
    f.write_bytes(bytes(data))


def test_model_identity_is_content_not_path(tmp_path: Path, model_copy: Path) -> None:
    base = model_identity(MODEL)
    assert model_identity(model_copy) == base  # copied
    moved = tmp_path / "elsewhere" / "b"
    moved.parent.mkdir()
    model_copy.rename(moved)
    assert model_identity(moved) == base  # moved
    cfg = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps(cfg, indent=7))  # reformatted, same data
    assert model_identity(moved) == base
    (moved / "tokenizer.json").unlink()  # the tokenizer makes no completion
    assert model_identity(moved) == base


def test_model_identity_tells_checkpoints_apart(model_copy: Path) -> None:
    base = model_identity(MODEL)
    _flip_weight_byte(model_copy, 0.0)  # a byte the samples cover: the data section's first
    assert model_identity(model_copy) != base
    shutil.rmtree(model_copy)
    shutil.copytree(MODEL, model_copy)
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["rope_theta"] = 500000.0
    (model_copy / "config.json").write_text(json.dumps(cfg))
    assert model_identity(model_copy) != base
    shutil.rmtree(model_copy)
    shutil.copytree(MODEL, model_copy)
    (model_copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    assert model_identity(model_copy) != base


def test_a_fine_tune_of_one_shape_differs_wherever_weights_differ(model_copy: Path) -> None:
    # A real fine-tune changes nearly every weight; any sample position must catch it.
    f = model_copy / "model.safetensors"
    data = bytearray(f.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    for i in range(start, len(data), 64):  # one byte in every 64: every sample sees changes
        data[i] ^= 0x01
    f.write_bytes(bytes(data))
    assert model_identity(model_copy) != model_identity(MODEL)


def _cfg(*overrides: str):
    return load_config(None, list(overrides))


def test_job_identity_ignores_paths_layout_and_runtime() -> None:
    base = job_identity(_cfg(), "p" * 64, "m" * 64)
    for o in ("model.path=/somewhere/else", "io.prompts=/x/p.h5", "io.output=/y/c.h5",
              "io.flush_every=3", "io.flush_seconds=1", "topology.slices=2",
              "topology.micro_batches=4", "topology.micro_batch_size=8", "topology.hybrid_slots=1",
              "topology.prefill_tokens=17", "runtime.torch_threads=3", "runtime.stall_timeout=5",
              "runtime.progress_seconds=2", "generation.temperature=0",
              "topology.kv_dtype=bfloat16"):  # = model.dtype: the same numbers
        assert job_identity(_cfg(o), "p" * 64, "m" * 64) == base, o


def test_job_identity_changes_with_what_completions_depend_on() -> None:
    base = job_identity(_cfg(), "p" * 64, "m" * 64)
    assert job_identity(_cfg(), "q" * 64, "m" * 64) != base
    assert job_identity(_cfg(), "p" * 64, "n" * 64) != base
    seen = {base}
    for o in ("model.dtype=float32", "topology.kv_dtype=float16", "generation.temperature=0.5",
              "generation.top_k=5", "generation.top_p=0.9", "generation.seed=1",
              "generation.max_new_tokens=65", "generation.stop_token_ids=[3]",
              "generation.ignore_eos=true", "generation.n=2", "generation.logprobs=1",
              "generation.prompt_logprobs=true", "generation.stop=[x]",
              "generation.include_stop_str=true"):
        ident = job_identity(_cfg(o), "p" * 64, "m" * 64)
        assert ident not in seen, o
        seen.add(ident)


def test_a_new_generation_field_at_its_default_keeps_the_identity() -> None:
    """A later ghmpi with one more generation field resumes an earlier ghmpi's job."""
    cfg = _cfg("generation.temperature=0.7")
    gen = cfg.generation
    newer_cls = dataclasses.make_dataclass(
        "NewerGeneration",
        [(f.name, f.type, dataclasses.field(default=f.default)) for f in dataclasses.fields(gen)]
        + [("repetition_penalty", float, dataclasses.field(default=1.0))], frozen=True)
    newer = SimpleNamespace(model=cfg.model, kv_dtype=cfg.kv_dtype,
                            generation=newer_cls(**{f.name: getattr(gen, f.name)
                                                    for f in dataclasses.fields(gen)}))
    assert generation_settings(newer) == {"temperature": 0.7}
    assert job_identity(newer, "p", "m") == job_identity(cfg, "p", "m")
    changed = SimpleNamespace(model=cfg.model, kv_dtype=cfg.kv_dtype,
                              generation=dataclasses.replace(newer.generation,
                                                             repetition_penalty=1.2))
    assert job_identity(changed, "p", "m") != job_identity(cfg, "p", "m")


def test_a_refusal_says_what_differs(tmp_path: Path) -> None:
    from ghmpi.errors import InputError
    from ghmpi.io.completions import CompletionStore
    from ghmpi.io.identity import identity_difference, identity_digest, identity_parts

    first = identity_parts(_cfg(), "p" * 64, "m" * 64)
    with CompletionStore(tmp_path / "c.h5", 3, identity_digest(first), identity=first) as s:
        s.add(0, [1], 1)
    second = identity_parts(_cfg("generation.temperature=0.7", "model.dtype=float32"),
                            "p" * 64, "n" * 64)
    assert identity_difference(second, first) == (
        "model.dtype (bfloat16 there, float32 here), generation.temperature (default there, "
        "0.7 here), model (weights or config)")
    with pytest.raises(InputError, match=r"another job \(it differs in: model\.dtype .*"
                                         r"generation\.temperature .*model \(weights or config\)\)"):
        CompletionStore(tmp_path / "c.h5", 3, identity_digest(second), identity=second)
    assert identity_difference(second, None) == ""  # parts of an older ghmpi: no details
