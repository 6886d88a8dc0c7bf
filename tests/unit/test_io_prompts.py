"""PromptFile / PromptWriter: both layouts, streaming reads, every validation error and its index."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

import ghmpi.io.prompts as prompts_mod
from ghmpi.errors import InputError
from ghmpi.io.prompts import PromptFile, PromptWriter, write_prompts

VOCAB, CONTEXT = 100, 16


def sample_prompts(n: int = 50, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, int(rng.integers(1, CONTEXT))).astype(np.int32)
            for _ in range(n)]


def raw(path: Path, **datasets: np.ndarray) -> Path:
    """An HDF5 file holding exactly the given datasets (for malformed files)."""
    with h5py.File(path, "w") as f:
        for name, value in datasets.items():
            f.create_dataset(name, data=value)
    return path


def flat(prompts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in prompts])]).astype(np.int64)
    return np.concatenate(prompts).astype(np.int32), offsets


def vlen_file(path: Path, prompts: list[np.ndarray], **extra: np.ndarray) -> Path:
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("prompts", (len(prompts),), dtype=h5py.vlen_dtype(np.int32))
        for i, p in enumerate(prompts):
            ds[i] = p
        for name, value in extra.items():
            f.create_dataset(name, data=value)
    return path


def read_all(path: Path, **kw) -> list[tuple[int, list[int], int | None]]:
    with PromptFile(path) as pf:
        return [(i, t.tolist(), m) for i, t, m in pf.iter_prompts(**kw)]


def test_flat_round_trip_and_stats(tmp_path: Path) -> None:
    ps = sample_prompts()
    mnt = [i % 7 + 1 for i in range(len(ps))]
    write_prompts(tmp_path / "p.h5", ps, max_new_tokens=mnt, attrs={"source": "x.txt"})
    with h5py.File(tmp_path / "p.h5", "r") as f:
        assert f["tokens"].dtype == np.int32 and f["offsets"].dtype == np.int64
        assert f["max_new_tokens"].dtype == np.int32
        assert f["tokens"].compression == "gzip" and f["tokens"].shuffle
        assert f.attrs["source"] == "x.txt"
    with PromptFile(tmp_path / "p.h5") as pf:
        assert pf.n == len(ps) and pf.has_max_new_tokens
        stats = pf.validate(VOCAB, CONTEXT)
    assert stats.n_prompts == len(ps)
    assert stats.n_tokens == sum(len(p) for p in ps)
    assert stats.max_prompt_len == max(len(p) for p in ps)
    assert stats.max_max_new_tokens == 7
    got = read_all(tmp_path / "p.h5")
    assert [g[0] for g in got] == list(range(len(ps)))
    assert all(g[1] == p.tolist() and g[2] == m for g, p, m in zip(got, ps, mnt))


def test_iter_prompts_skip_and_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ps = sample_prompts(40)
    write_prompts(tmp_path / "p.h5", ps)
    skip = np.zeros(40, dtype=bool)
    skip[[0, 3, 4, 5, 6, 7, 39]] = True
    skip[10:20] = True  # a whole chunk of 10
    expect = [(i, ps[i].tolist(), None) for i in range(40) if not skip[i]]
    assert read_all(tmp_path / "p.h5", skip=skip, chunk_prompts=10) == expect
    monkeypatch.setattr(prompts_mod, "MAX_BLOCK_TOKENS", 5)  # reads cut inside a chunk
    assert read_all(tmp_path / "p.h5", skip=skip, chunk_prompts=7) == expect
    assert read_all(tmp_path / "p.h5", chunk_prompts=1) == [(i, p.tolist(), None)
                                                            for i, p in enumerate(ps)]
    with PromptFile(tmp_path / "p.h5") as pf, pytest.raises(ValueError, match="bool array"):
        next(pf.iter_prompts(skip=np.zeros(39, dtype=bool)))
    vlen_file(tmp_path / "v.h5", ps)
    assert read_all(tmp_path / "v.h5", skip=skip, chunk_prompts=7) == expect


def test_vlen_layout_and_digest(tmp_path: Path) -> None:
    ps = sample_prompts(30)
    write_prompts(tmp_path / "flat.h5", ps, max_new_tokens=[5] * 30)
    vlen_file(tmp_path / "vlen.h5", ps, max_new_tokens=np.full(30, 5, np.int32))
    with PromptFile(tmp_path / "flat.h5") as a, PromptFile(tmp_path / "vlen.h5") as b:
        assert b.n == 30 and b.has_max_new_tokens
        sa, sb = a.validate(VOCAB, CONTEXT), b.validate(VOCAB, CONTEXT, chunk_tokens=7)
    assert sa == sb  # same prompts, same stats and digest, whatever the layout
    assert read_all(tmp_path / "vlen.h5") == read_all(tmp_path / "flat.h5")
    # The digest follows content only: other chunking, other path -> same; one id -> different.
    write_prompts(tmp_path / "copy.h5", ps, max_new_tokens=[5] * 30)
    changed = [p.copy() for p in ps]
    changed[17][0] = (changed[17][0] + 1) % VOCAB
    write_prompts(tmp_path / "changed.h5", changed, max_new_tokens=[5] * 30)
    write_prompts(tmp_path / "nomnt.h5", ps)
    digests = {}
    for name in ("copy", "changed", "nomnt"):
        with PromptFile(tmp_path / f"{name}.h5") as pf:
            digests[name] = pf.validate(VOCAB, CONTEXT, chunk_tokens=3).sha256
    assert digests["copy"] == sa.sha256
    assert len({sa.sha256, digests["changed"], digests["nomnt"]}) == 3


def test_writer_is_reproducible_and_atomic(tmp_path: Path) -> None:
    ps = sample_prompts(200)
    write_prompts(tmp_path / "a.h5", ps)
    write_prompts(tmp_path / "b.h5", ps)
    assert (tmp_path / "a.h5").read_bytes() == (tmp_path / "b.h5").read_bytes()
    before = (tmp_path / "a.h5").read_bytes()
    with pytest.raises(RuntimeError):
        with PromptWriter(tmp_path / "a.h5") as w:
            w.add([1, 2, 3])
            raise RuntimeError("tokenizer failed half way")
    assert (tmp_path / "a.h5").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5", "b.h5"]
    with PromptWriter(tmp_path / "c.h5", chunk_tokens=4) as w:  # many appends
        for p in ps:
            w.add(p)
    assert read_all(tmp_path / "c.h5") == read_all(tmp_path / "a.h5")


def good_flat(n: int = 12) -> tuple[np.ndarray, np.ndarray]:
    return flat([np.arange(i % 5 + 1, dtype=np.int32) for i in range(n)])


def errors_cases(tmp_path: Path) -> list[tuple[str, Path, str]]:
    """(name, file, regex of the message) for every malformed prompts file."""
    tokens, offsets = good_flat()  # prompt i has i % 5 + 1 tokens
    cases = []

    def case(name: str, regex: str, **ds: np.ndarray) -> None:
        cases.append((name, raw(tmp_path / f"{name}.h5", **ds), regex))

    bad = tokens.copy()
    bad[offsets[9] + 1] = VOCAB  # prompt 9 (5 tokens) has an id == vocab
    case("id_too_big", r"prompt 9 has token id 100 .*\[0, 100\)", tokens=bad, offsets=offsets)
    bad = tokens.copy()
    bad[offsets[7]] = -3
    case("id_negative", r"prompt 7 has token id -3 \(position 0 of", tokens=bad, offsets=offsets)
    # The first offending prompt is named, whatever the kinds of the faults after it.
    bad, off = tokens.copy(), offsets.copy()
    bad[offsets[4] + 2] = 999
    off[9] = off[8]
    case("first_id_then_empty", r"prompt 4 has token id 999", tokens=bad, offsets=off)
    bad = tokens.copy()
    bad[offsets[9]] = 999
    mnt = np.full(12, 4, np.int32)
    mnt[3] = -1
    case("first_mnt_then_id", r"prompt 3 has max_new_tokens -1", tokens=bad, offsets=offsets,
         max_new_tokens=mnt)
    case("first_id_then_long", r"prompt 1 has token id 999",
         tokens=np.array([1, 2, 999] + [1] * CONTEXT, np.int32),
         offsets=np.array([0, 1, 3, 3 + CONTEXT], np.int64))
    off = offsets.copy()
    off[4] = off[3]
    case("empty", r"prompt 3 is empty", tokens=tokens, offsets=off)
    off = offsets.copy()
    off[6] = off[5] - 1
    case("decrease", r"offsets decrease at prompt 5", tokens=tokens, offsets=off)
    case("first_offset", r"offsets\[0\] must be 0, is 1", tokens=tokens, offsets=offsets + 1)
    case("offset_beyond", r"offsets\[12\] is 33, beyond the 32 ids of 'tokens' \(prompt 11\)",
         tokens=tokens[:-1], offsets=offsets)
    case("last_offset", r"offsets\[12\] is 33 but 'tokens' holds 34",
         tokens=np.concatenate([tokens, [1]]), offsets=offsets)
    long_tokens, long_offsets = flat([np.ones(3, np.int32)] * 8 + [np.ones(CONTEXT, np.int32)])
    case("too_long", rf"prompt 8 has {CONTEXT} tokens; .*context is {CONTEXT} tokens.*at most "
                     rf"{CONTEXT - 1}", tokens=long_tokens, offsets=long_offsets)
    case("float_tokens", r"'tokens' must hold integers", tokens=tokens.astype(np.float32),
         offsets=offsets)
    case("float_offsets", r"'offsets' must hold integers", tokens=tokens,
         offsets=offsets.astype(np.float64))
    case("tokens_2d", r"'tokens' must be 1-D", tokens=tokens[:32].reshape(2, 16), offsets=offsets)
    case("mnt_shape", r"'max_new_tokens' must have shape \(12,\)", tokens=tokens,
         offsets=offsets, max_new_tokens=np.ones(11, np.int32))
    mnt = np.full(12, 4, np.int32)
    mnt[10] = -2  # 0 is the sentinel "the job's value"
    case("mnt_negative", r"prompt 10 has max_new_tokens -2; it must be an integer >= 1", tokens=tokens,
         offsets=offsets, max_new_tokens=mnt)
    mnt = np.full(12, 4, np.int64)
    mnt[11] = 1 << 40
    case("mnt_huge", r"prompt 11 has max_new_tokens 1099511627776", tokens=tokens,
         offsets=offsets, max_new_tokens=mnt)
    case("mnt_float", r"'max_new_tokens' must hold integers", tokens=tokens, offsets=offsets,
         max_new_tokens=np.ones(12, np.float32))
    case("no_layout", r"neither 'tokens' \+ 'offsets' nor .*found: \['ids'\]", ids=tokens)
    case("vlen_not_vlen", r"'prompts' must be variable-length", prompts=tokens)
    vl = [np.arange(i % 5 + 1, dtype=np.int32) for i in range(12)]
    vl[6] = np.array([1, 2, 500], np.int32)
    cases.append(("vlen_id", vlen_file(tmp_path / "vlen_id.h5", vl),
                  r"prompt 6 has token id 500 \(position 2 of the prompt\)"))
    vl = [np.arange(i % 5 + 1, dtype=np.int32) for i in range(12)]
    vl[11] = np.zeros(0, np.int32)
    cases.append(("vlen_empty", vlen_file(tmp_path / "vlen_empty.h5", vl), r"prompt 11 is empty"))
    return cases


def test_every_validation_error_names_file_and_prompt(tmp_path: Path) -> None:
    for name, path, regex in errors_cases(tmp_path):
        for chunk in (4, 1 << 22):  # the fault in a later block, or all in one block
            with pytest.raises(InputError, match=regex) as info:
                with PromptFile(path) as pf:
                    pf.validate(VOCAB, CONTEXT, chunk_tokens=chunk)
            assert str(info.value).startswith(f"prompts file {path}:"), name


def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"prompts file .*missing\.h5: no such file"):
        PromptFile(tmp_path / "missing.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(InputError, match=r"text\.h5: not a readable HDF5 file"):
        PromptFile(tmp_path / "text.h5")
    with h5py.File(tmp_path / "group.h5", "w") as f:
        f.create_group("tokens")
        f.create_dataset("offsets", data=np.zeros(1, np.int64))
    with pytest.raises(InputError, match="'tokens' is not a dataset"):
        PromptFile(tmp_path / "group.h5")
