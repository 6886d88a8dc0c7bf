"""The prompts file: ragged token sequences in HDF5, read and validated in bounded memory.

Layout (DESIGN.md, "Prompts file"): `tokens` int32 (T,) all prompts concatenated, `offsets`
int64 (N+1,) with prompt i = tokens[offsets[i]:offsets[i+1]], optional per-prompt (N,) datasets
`max_new_tokens`, `temperature`, `top_p`, `top_k`, `seed`, `n`, `logprobs`, `stop` (each with a
sentinel meaning "the job's value", ghmpi/io/requests.py) and `custom_id`, `chat` (for export).
A file holding instead one variable-length int32 dataset `prompts` (N,) is read too.

Nothing here loads a whole file: a 10-million-prompt file is streamed in chunks, and only the
caller's `skip` mask is O(N).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import h5py
import numpy as np

from ghmpi.errors import InputError
from ghmpi.io.requests import NUMERIC, SENTINEL, STRINGS, Settings, check_values, parse_stop

__all__ = ["PromptFile", "PromptStats", "PromptWriter", "write_prompts", "ragged_blocks",
           "DIGEST_VERSION"]

# Changing how the digest is computed changes every job id: bump the tag when you do.
DIGEST_VERSION = b"ghmpi-prompts-v1"
MAX_BLOCK_TOKENS = 1 << 22  # tokens read at once by iter_prompts, whatever chunk_prompts says
INT32_MAX = int(np.iinfo(np.int32).max)


@dataclass(frozen=True, slots=True)
class PromptStats:
    n_prompts: int
    n_tokens: int  # all prompts together
    max_prompt_len: int  # tokens of the longest prompt
    max_max_new_tokens: int | None  # largest per-prompt value; None when the file has none
    sha256: str  # digest of (offsets, tokens, per-prompt settings), independent of layout and path
    n_given: int = 0  # sum of the per-prompt sample counts that are set
    n_unset: int = 0  # prompts taking the job's generation.n (all of them without an `n` dataset)
    max_logprobs: int = -1  # widest top-k asked per prompt (-1: none asked)
    has_stop: bool = False  # some prompt has its own stop strings

    def n_rows(self, job_n: int) -> int:
        """Completions of the job (prompts x samples) when generation.n is job_n."""
        return self.n_given + self.n_unset * job_n

    def max_n(self, job_n: int, n_max: int | None = None) -> int:
        return max(job_n if self.n_unset else 1, n_max or 1)


class PromptFile:
    """A prompts file opened for reading. Use as a context manager or call close()."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise InputError(f"prompts file {self.path}: no such file")
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as e:
            raise InputError(f"prompts file {self.path}: not a readable HDF5 file ({e})") from None
        try:
            self._open_layout()
        except BaseException:
            self._f.close()
            raise

    def _open_layout(self) -> None:
        f = self._f
        self._tokens: h5py.Dataset | None = None
        self._offsets: h5py.Dataset | None = None
        self._vlen: h5py.Dataset | None = None
        if "tokens" in f and "offsets" in f:
            self._tokens = self._dataset("tokens")
            self._offsets = self._dataset("offsets")
            self._check_integer("tokens", self._tokens.dtype)
            self._check_integer("offsets", self._offsets.dtype)
            if self._tokens.ndim != 1:
                raise self._error(f"dataset 'tokens' must be 1-D, has shape {self._tokens.shape}")
            if self._offsets.ndim != 1 or self._offsets.shape[0] < 1:
                raise self._error(f"dataset 'offsets' must be 1-D of length N+1 >= 1, has shape "
                                  f"{self._offsets.shape}")
            self.n = int(self._offsets.shape[0]) - 1
        elif "prompts" in f:
            self._vlen = self._dataset("prompts")
            base = h5py.check_vlen_dtype(self._vlen.dtype)
            if base is None:
                raise self._error(f"dataset 'prompts' must be variable-length integers "
                                  f"(h5py.vlen_dtype(numpy.int32)), has dtype {self._vlen.dtype}")
            self._check_integer("prompts", base)
            if self._vlen.ndim != 1:
                raise self._error(f"dataset 'prompts' must be 1-D, has shape {self._vlen.shape}")
            self.n = int(self._vlen.shape[0])
        else:
            raise self._error("holds neither 'tokens' + 'offsets' nor a variable-length "
                              f"'prompts' dataset (found: {sorted(f.keys()) or 'nothing'})")
        self._extra: dict[str, h5py.Dataset] = {}  # the per-prompt datasets present
        for name in (*NUMERIC, *STRINGS):
            if name not in f:
                continue
            ds = self._extra[name] = self._dataset(name)
            if name in STRINGS:
                if h5py.check_string_dtype(ds.dtype) is None:
                    raise self._error(f"dataset '{name}' must hold strings, has dtype {ds.dtype}")
            elif np.issubdtype(NUMERIC[name], np.integer):
                self._check_integer(name, ds.dtype)
            elif not np.issubdtype(ds.dtype, np.floating):
                raise self._error(f"dataset '{name}' must hold floats, has dtype {ds.dtype}")
            if ds.shape != (self.n,):
                raise self._error(f"dataset '{name}' must have shape ({self.n},) like the "
                                  f"prompts, has {ds.shape}")
        self._max_new: h5py.Dataset | None = self._extra.get("max_new_tokens")
        self.has_max_new_tokens = self._max_new is not None
        self.settings_names = tuple(n for n in self._extra if n not in ("custom_id", "chat"))

    def column(self, name: str, a: int, b: int) -> np.ndarray | None:
        """Cells a..b-1 of a per-prompt dataset (strings as str), or None when absent."""
        ds = self._extra.get(name)
        if ds is None:
            return None
        if name in STRINGS:
            return np.asarray(ds.asstr()[a:b], dtype=object)
        return np.asarray(ds[a:b])

    # ---- helpers -------------------------------------------------------------------------------

    def _error(self, what: str) -> InputError:
        return InputError(f"prompts file {self.path}: {what}")

    def _dataset(self, name: str) -> h5py.Dataset:
        obj = self._f[name]
        if not isinstance(obj, h5py.Dataset):
            raise self._error(f"'{name}' is not a dataset")
        return obj

    def _check_integer(self, name: str, dtype: np.dtype) -> None:
        if not np.issubdtype(dtype, np.integer):
            raise self._error(f"dataset '{name}' must hold integers, has dtype {dtype}")

    # ---- validation ----------------------------------------------------------------------------

    def validate(self, vocab_size: int, context_len: int, chunk_tokens: int = 1 << 22) -> PromptStats:
        """Check every prompt against the model, streaming in blocks of about chunk_tokens ids.

        InputError names the file and the first offending prompt (in index order, whatever the
        kind of fault) and the offending value.
        """
        if self.n == 0:
            raise self._error("holds no prompts")
        chunk_tokens = max(1, int(chunk_tokens))
        h_off, h_tok, h_mnt = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
        h_off.update(np.zeros(1, "<i8").tobytes())  # offsets[0]
        n_tokens = max_len = max_mnt = n_given = n_unset = 0
        max_lp, has_stop = -1, False
        # the settings that change completions, hashed when present (older files keep their digest)
        hashes = {name: hashlib.sha256() for name in self.settings_names if name != "max_new_tokens"}
        if self._vlen is None:
            assert self._offsets is not None
            if int(self._offsets[0]) != 0:
                raise self._error(f"offsets[0] must be 0, is {int(self._offsets[0])}")
        for a, lengths, id_slices in self._length_blocks(chunk_tokens):
            b = a + lengths.size
            mnt = np.asarray(self._max_new[a:b]) if self._max_new is not None else None
            bad_len = _first(lengths <= 0) if self._vlen is not None else _first(
                (lengths <= 0) | (n_tokens + np.cumsum(lengths) > self._n_flat_tokens()))
            bad_len = min(bad_len, _first(lengths >= context_len))
            bad_mnt = lengths.size
            self._check_settings(a, b, hashes)
            ok = min(bad_len, bad_mnt)  # prompts a..a+ok-1 are well formed: check their ids
            for first, ids, lens in id_slices(ok):
                j = _first((ids < 0) | (ids >= vocab_size))
                if j < ids.size:
                    ends = np.cumsum(lens)
                    k = int(np.searchsorted(ends, j, side="right"))
                    at = j - (int(ends[k - 1]) if k else 0)
                    raise self._error(f"prompt {first + k} has token id {int(ids[j])} (position "
                                      f"{at} of the prompt) outside the model's vocabulary "
                                      f"[0, {vocab_size})")
                h_tok.update(ids.astype("<i4").tobytes())
            if ok < lengths.size:
                if bad_len == ok:
                    self._length_error(a + ok, int(lengths[ok]), n_tokens + int(lengths[:ok].sum()),
                                       context_len)
                raise AssertionError("unreachable")
            h_off.update((n_tokens + np.cumsum(lengths)).astype("<i8").tobytes())
            n_tokens += int(lengths.sum())
            max_len = max(max_len, int(lengths.max()))
            if mnt is not None:
                max_mnt = max(max_mnt, int(mnt.max()))
                h_mnt.update(mnt.astype("<i4").tobytes())
            n_col = self.column("n", a, b)
            if n_col is not None:
                n_given += int(n_col.sum())
                n_unset += int((n_col == 0).sum())
            else:
                n_unset += int(lengths.size)
            lp = self.column("logprobs", a, b)
            if lp is not None:
                max_lp = max(max_lp, int(lp.max()))
            st = self.column("stop", a, b)
            if st is not None:
                has_stop = has_stop or any(x != "" for x in st)
        if self._vlen is None and n_tokens != self._n_flat_tokens():
            raise self._error(f"offsets[{self.n}] is {n_tokens} but 'tokens' holds "
                              f"{self._n_flat_tokens()} ids")
        digest = hashlib.sha256(DIGEST_VERSION)
        digest.update(np.int64(self.n).astype("<i8").tobytes())
        digest.update(h_off.digest())
        digest.update(h_tok.digest())
        digest.update(h_mnt.digest() if self._max_new is not None else b"no-max-new-tokens")
        for name in sorted(hashes):
            digest.update(name.encode() + hashes[name].digest())
        return PromptStats(self.n, n_tokens, max_len,
                           max_mnt if self._max_new is not None else None, digest.hexdigest(),
                           n_given, n_unset, max_lp, has_stop)

    def _check_settings(self, a: int, b: int, hashes: dict) -> None:
        """Check (and hash) prompts a..b-1 of every per-prompt settings dataset."""
        for name in self.settings_names:
            cells = self.column(name, a, b)
            if name == "stop":
                for i, text in enumerate(cells):
                    try:
                        parse_stop(text)
                    except ValueError as e:
                        raise self._error(f"prompt {a + i} has stop {text!r}: {e}") from None
                    hashes[name].update(text.encode("utf-8") + b"\0")
                continue
            i, rule = check_values(name, cells)
            if i < len(cells):
                raise self._error(f"prompt {a + i} has {name} {cells[i].item()!r}; it must be {rule}")
            if name in hashes:
                hashes[name].update(cells.astype(NUMERIC[name].newbyteorder("<")).tobytes())

    def _n_flat_tokens(self) -> int:
        assert self._tokens is not None
        return int(self._tokens.shape[0])

    def _length_error(self, i: int, length: int, start: int, context_len: int) -> None:
        """Raise the error for prompt i, whose length (or end offset start+length) is bad."""
        if length < 0:
            raise self._error(f"offsets decrease at prompt {i} (offsets[{i}] > offsets[{i + 1}])")
        if length == 0:
            raise self._error(f"prompt {i} is empty")
        if self._vlen is None and start + length > self._n_flat_tokens():
            raise self._error(f"offsets[{i + 1}] is {start + length}, beyond the "
                              f"{self._n_flat_tokens()} ids of 'tokens' (prompt {i})")
        raise self._error(f"prompt {i} has {length} tokens; the model's context is {context_len} "
                          f"tokens, so a prompt may have at most {context_len - 1}")

    def _length_blocks(self, chunk_tokens: int) -> Iterator[tuple[
            int, np.ndarray, "Callable[[int], Iterator[tuple[int, np.ndarray, np.ndarray]]]"]]:
        """Blocks (first prompt a, lengths (k,), id_slices) covering all prompts in order.

        id_slices(m) yields (first prompt, flat ids, lengths) over prompts a..a+m-1 in pieces of
        about chunk_tokens ids; only called on prompts whose lengths are valid.
        """
        if self._vlen is not None:
            step = max(1, min(65536, chunk_tokens // 16))
            for a in range(0, self.n, step):
                rows = [np.asarray(r) for r in self._vlen[a:a + step]]
                lengths = np.fromiter((r.shape[0] for r in rows), np.int64, len(rows))

                def vlen_slices(m: int, a: int = a, rows: list[np.ndarray] = rows,
                                lengths: np.ndarray = lengths):
                    off = np.concatenate([[0], np.cumsum(lengths[:m])])  # (m+1,)
                    for s, e in ragged_blocks(off, chunk_tokens):
                        yield a + s, np.concatenate(rows[s:e]), lengths[s:e]

                yield a, lengths, vlen_slices
            return
        assert self._offsets is not None and self._tokens is not None
        for a in range(0, self.n, chunk_tokens):
            off = np.asarray(self._offsets[a:min(a + chunk_tokens, self.n) + 1], dtype=np.int64)
            lengths = np.diff(off)  # (k,)

            def flat_slices(m: int, a: int = a, off: np.ndarray = off):
                for s, e in ragged_blocks(off[:m + 1] - off[0], chunk_tokens):
                    ids = np.asarray(self._tokens[int(off[s]):int(off[e])])
                    yield a + s, ids, np.diff(off[s:e + 1])

            yield a, lengths, flat_slices

    # ---- reading -------------------------------------------------------------------------------

    def iter_prompts(self, skip: np.ndarray | None = None, chunk_prompts: int = 65536
                     ) -> Iterator[tuple[int, np.ndarray, int | None]]:
        """Yield (index, int32 tokens, max_new_tokens or None) in index order, skipping skip[i]."""
        if skip is not None:
            if skip.dtype != np.bool_ or skip.shape != (self.n,):
                raise ValueError(f"skip must be a bool array of shape ({self.n},), "
                                 f"got {skip.dtype} {skip.shape}")
            skip = skip.copy()  # the caller may mark prompts done while we iterate
        chunk_prompts = max(1, int(chunk_prompts))
        for a in range(0, self.n, chunk_prompts):
            b = min(a + chunk_prompts, self.n)
            if skip is not None and skip[a:b].all():
                continue
            mnt = np.asarray(self._max_new[a:b]) if self._max_new is not None else None
            for i, tokens in self._read_block(a, b, skip):
                yield i, tokens, (int(mnt[i - a]) or None if mnt is not None else None)

    def iter_requests(self, skip: np.ndarray | None = None, chunk_prompts: int = 65536
                      ) -> Iterator[tuple[int, np.ndarray, Settings]]:
        """Yield (index, int32 tokens, the prompt's own Settings) in index order, skipping
        skip[i]."""
        chunk_prompts = max(1, int(chunk_prompts))
        cols: dict[str, np.ndarray] = {}
        block = -1
        for i, tokens, _ in self.iter_prompts(skip, chunk_prompts):
            if i // chunk_prompts != block:
                block = i // chunk_prompts
                a = block * chunk_prompts
                b = min(a + chunk_prompts, self.n)
                cols = {name: self.column(name, a, b) for name in self.settings_names}
            k = i - block * chunk_prompts
            yield i, tokens, Settings.from_cells({name: c[k] for name, c in cols.items()})

    def _read_block(self, a: int, b: int, skip: np.ndarray | None
                    ) -> Iterator[tuple[int, np.ndarray]]:
        if self._vlen is not None:
            for i, row in enumerate(self._vlen[a:b], start=a):
                if skip is None or not skip[i]:
                    yield i, np.asarray(row, dtype=np.int32)
            return
        assert self._offsets is not None and self._tokens is not None
        off = np.asarray(self._offsets[a:b + 1], dtype=np.int64)  # (b-a+1,)
        for s, e in ragged_blocks(off, MAX_BLOCK_TOKENS):
            if skip is not None and skip[a + s:a + e].all():
                continue
            flat = np.asarray(self._tokens[int(off[s]):int(off[e])], dtype=np.int32)
            for k in range(s, e):
                if skip is None or not skip[a + k]:
                    yield a + k, flat[int(off[k] - off[s]):int(off[k + 1] - off[s])]

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "PromptFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PromptWriter:
    """Writes the flat layout, streaming, to `<path>.tmp`; close() renames it over `path`.

    Leaving the `with` block by an exception removes the temporary file and leaves `path` as it
    was. Files are byte-for-byte reproducible (no timestamps stored).
    """

    def __init__(self, path: str | os.PathLike, with_max_new_tokens: bool = False,
                 attrs: Mapping[str, str | int | float] | None = None,
                 chunk_tokens: int = 1 << 16, settings: Sequence[str] = ()) -> None:
        """`settings`: per-prompt datasets to write besides max_new_tokens (names of
        ghmpi/io/requests.py); `add` takes their cells as keywords, a missing one is the
        sentinel ("the job's value")."""
        self.path = os.fspath(path)
        self._tmp = self.path + ".tmp"
        self._chunk = int(chunk_tokens)
        self._f = h5py.File(self._tmp, "w")
        opts = dict(compression="gzip", shuffle=True, track_times=False)
        self._tokens = self._f.create_dataset("tokens", (0,), np.int32, maxshape=(None,),
                                              chunks=(self._chunk,), **opts)
        self._offsets = self._f.create_dataset("offsets", (1,), np.int64, maxshape=(None,),
                                               chunks=(self._chunk,), **opts)
        self._offsets[0] = 0
        self._max_new = (self._f.create_dataset("max_new_tokens", (0,), np.int32, maxshape=(None,),
                                                chunks=(self._chunk,), **opts)
                         if with_max_new_tokens else None)
        self._settings: dict[str, h5py.Dataset] = {}
        for name in settings:
            if name == "max_new_tokens":
                continue
            dtype = h5py.string_dtype() if name in STRINGS else NUMERIC[name]
            self._settings[name] = self._f.create_dataset(
                name, (0,), dtype, maxshape=(None,), chunks=(min(self._chunk, 4096),), **opts)
        for k, v in (attrs or {}).items():
            self._f.attrs[k] = v
        self.n = 0
        self.n_tokens = 0
        self._buf_tokens: list[np.ndarray] = []
        self._buf_lengths: list[int] = []
        self._buf_max_new: list[int] = []
        self._buf_settings: dict[str, list] = {name: [] for name in self._settings}
        self._buffered = 0

    def add(self, tokens: Sequence[int] | np.ndarray, max_new_tokens: int | None = None,
            **settings: object) -> None:
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"prompt {self.n}: tokens must be a non-empty 1-D sequence")
        if max_new_tokens is not None and self._max_new is None:
            raise ValueError(f"prompt {self.n}: max_new_tokens given but the writer was opened "
                             f"with_max_new_tokens=False")
        unknown = set(settings) - set(self._settings)
        if unknown:
            raise ValueError(f"prompt {self.n}: the writer was not opened with {sorted(unknown)}")
        self._buf_tokens.append(ids.astype(np.int32))
        self._buf_lengths.append(int(ids.size))
        if self._max_new is not None:
            self._buf_max_new.append(int(max_new_tokens or 0))
        for name, buf in self._buf_settings.items():
            value = settings.get(name)
            buf.append(SENTINEL[name] if value is None else value)
        self._buffered += int(ids.size)
        self.n += 1
        if self._buffered >= self._chunk:
            self._write_buffer()

    def _write_buffer(self) -> None:
        if not self._buf_lengths:
            return
        flat = np.concatenate(self._buf_tokens)
        ends = self.n_tokens + np.cumsum(np.asarray(self._buf_lengths, dtype=np.int64))
        _append(self._tokens, flat)
        _append(self._offsets, ends)
        if self._max_new is not None:
            _append(self._max_new, np.asarray(self._buf_max_new, dtype=np.int32))
        for name, buf in self._buf_settings.items():
            dtype = object if name in STRINGS else NUMERIC[name]
            _append(self._settings[name], np.asarray(buf, dtype=dtype))
            buf.clear()
        self.n_tokens += int(flat.size)
        self._buf_tokens, self._buf_lengths, self._buf_max_new = [], [], []
        self._buffered = 0

    def close(self) -> None:
        """Write what is buffered and move the finished file into place."""
        if self._f.id.valid:
            self._write_buffer()
            self._f.close()
            os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Discard the temporary file; `path` is left untouched."""
        if self._f.id.valid:
            self._f.close()
        if os.path.exists(self._tmp):
            os.remove(self._tmp)

    def __enter__(self) -> "PromptWriter":
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _first(mask: np.ndarray) -> int:
    """Index of the first True in a 1-D mask, or its length when none is."""
    hits = np.flatnonzero(mask)
    return int(hits[0]) if hits.size else int(mask.shape[0])


def ragged_blocks(offsets: np.ndarray, max_tokens: int) -> Iterator[tuple[int, int]]:
    """Consecutive ranges [s, e) of the sequences whose offsets (N+1,) are given, each holding at
    most max_tokens ids (one sequence at least): how ragged data is read in bounded memory."""
    n = offsets.shape[0] - 1
    s = 0
    while s < n:
        e = int(np.searchsorted(offsets, offsets[s] + max_tokens, side="right")) - 1
        e = min(max(e, s + 1), n)
        yield s, e
        s = e


def _append(ds: h5py.Dataset, values: np.ndarray) -> None:
    n = ds.shape[0]
    ds.resize((n + values.shape[0],))
    ds[n:] = values


def write_prompts(path: str | os.PathLike, prompts: Sequence[Sequence[int] | np.ndarray],
                  max_new_tokens: Sequence[int] | None = None,
                  attrs: Mapping[str, str | int | float] | None = None,
                  **settings: Sequence) -> None:
    """Write a flat-layout prompts file from in-memory prompts (small files, tests).
    `settings`: per-prompt columns by dataset name (None cells take the sentinel)."""
    for name, col in (("max_new_tokens", max_new_tokens), *settings.items()):
        if col is not None and len(col) != len(prompts):
            raise ValueError(f"{len(col)} {name} for {len(prompts)} prompts")
    with PromptWriter(path, with_max_new_tokens=max_new_tokens is not None, attrs=attrs,
                      settings=list(settings)) as w:
        for i, p in enumerate(prompts):
            w.add(p, None if max_new_tokens is None else max_new_tokens[i],
                  **{name: col[i] for name, col in settings.items()})
