"""The prompts file: ragged token sequences in HDF5, read and validated in bounded memory.

Layout (DESIGN.md, "Prompts file"): `tokens` int32 (T,) all prompts concatenated, `offsets`
int64 (N+1,) with prompt i = tokens[offsets[i]:offsets[i+1]], optional `max_new_tokens` int32
(N,). A file holding instead one variable-length int32 dataset `prompts` (N,) is read too.

Nothing here loads a whole file: a 10-million-prompt file is streamed in chunks, and only the
caller's `skip` mask is O(N).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import h5py
import numpy as np

from ghmpi.errors import InputError

__all__ = ["PromptFile", "PromptStats", "PromptWriter", "write_prompts", "DIGEST_VERSION"]

# Changing how the digest is computed changes every job id: bump the tag when you do.
DIGEST_VERSION = b"ghmpi-prompts-v1"
MAX_BLOCK_TOKENS = 1 << 22  # tokens read at once by iter_prompts, whatever chunk_prompts says


@dataclass(frozen=True, slots=True)
class PromptStats:
    n_prompts: int
    n_tokens: int  # all prompts together
    max_prompt_len: int  # tokens of the longest prompt
    max_max_new_tokens: int | None  # largest per-prompt value; None when the file has none
    sha256: str  # digest of (offsets, tokens, max_new_tokens), independent of layout and path


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
        self._max_new: h5py.Dataset | None = None
        if "max_new_tokens" in f:
            self._max_new = self._dataset("max_new_tokens")
            self._check_integer("max_new_tokens", self._max_new.dtype)
            if self._max_new.shape != (self.n,):
                raise self._error(f"dataset 'max_new_tokens' must have shape ({self.n},) like the "
                                  f"prompts, has {self._max_new.shape}")
        self.has_max_new_tokens = self._max_new is not None

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

    def _offsets_block(self, a: int, b: int) -> np.ndarray:
        """offsets[a:b+1] of prompts a..b-1 as int64, for either layout (vlen: only while
        iterating, where the caller passes lengths itself)."""
        assert self._offsets is not None
        return np.asarray(self._offsets[a:b + 1], dtype=np.int64)

    # ---- validation ----------------------------------------------------------------------------

    def validate(self, vocab_size: int, context_len: int, chunk_tokens: int = 1 << 22) -> PromptStats:
        """Check every prompt against the model, streaming; InputError at the first bad prompt."""
        h_off, h_tok = hashlib.sha256(), hashlib.sha256()
        if self._vlen is not None:
            n_tokens, max_len = self._validate_vlen(vocab_size, context_len, chunk_tokens, h_off, h_tok)
        else:
            n_tokens, max_len = self._validate_flat(vocab_size, context_len, chunk_tokens, h_off, h_tok)
        max_mnt, h_mnt = self._validate_max_new_tokens(chunk_tokens)
        digest = hashlib.sha256(DIGEST_VERSION)
        digest.update(np.int64(self.n).astype("<i8").tobytes())
        for h in (h_off, h_tok):
            digest.update(h.digest())
        digest.update(h_mnt.digest() if h_mnt is not None else b"no-max-new-tokens")
        return PromptStats(self.n, n_tokens, max_len, max_mnt, digest.hexdigest())

    def _check_lengths(self, first: int, lengths: np.ndarray, context_len: int) -> None:
        """lengths of prompts first, first+1, ...: none empty, none >= context_len."""
        bad = np.flatnonzero((lengths <= 0) | (lengths >= context_len))
        if bad.size:
            i = int(bad[0])
            n = int(lengths[i])
            if n < 0:
                raise self._error(f"offsets decrease at prompt {first + i} (offsets[{first + i}] > "
                                  f"offsets[{first + i + 1}])")
            if n == 0:
                raise self._error(f"prompt {first + i} is empty")
            raise self._error(f"prompt {first + i} has {n} tokens; the model's context is "
                              f"{context_len} tokens, so a prompt may have at most {context_len - 1}")

    def _check_ids(self, ids: np.ndarray, vocab_size: int) -> int:
        """Index into ids of the first id outside [0, vocab_size), or -1."""
        bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
        return int(bad[0]) if bad.size else -1

    def _validate_flat(self, vocab_size, context_len, chunk, h_off, h_tok) -> tuple[int, int]:
        assert self._offsets is not None and self._tokens is not None
        n_tok_ds = int(self._tokens.shape[0])
        first = int(self._offsets[0])
        if first != 0:
            raise self._error(f"offsets[0] must be 0, is {first}")
        max_len = 0
        for a in range(0, self.n, chunk):
            b = min(a + chunk, self.n)
            off = self._offsets_block(a, b)  # (b-a+1,)
            lengths = np.diff(off)
            self._check_lengths(a, lengths, context_len)
            max_len = max(max_len, int(lengths.max()))
            h_off.update((off[1:] if a else off).astype("<i8").tobytes())
        last = int(self._offsets[self.n])
        if last != n_tok_ds:
            raise self._error(f"offsets[{self.n}] is {last} but 'tokens' holds {n_tok_ds} ids")
        for a in range(0, n_tok_ds, chunk):
            ids = np.asarray(self._tokens[a:a + chunk])
            j = self._check_ids(ids, vocab_size)
            if j >= 0:
                pos = a + j
                raise self._error(f"prompt {self._prompt_of(pos)} has token id {int(ids[j])} "
                                  f"(at tokens[{pos}]) outside the model's vocabulary [0, {vocab_size})")
            h_tok.update(ids.astype("<i4").tobytes())
        return n_tok_ds, max_len

    def _prompt_of(self, pos: int) -> int:
        """Index of the prompt holding tokens[pos]: binary search reading single offsets."""
        assert self._offsets is not None
        lo, hi = 0, self.n  # invariant: offsets[lo] <= pos < offsets[hi]
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if int(self._offsets[mid]) <= pos:
                lo = mid
            else:
                hi = mid
        return lo

    def _validate_vlen(self, vocab_size, context_len, chunk, h_off, h_tok) -> tuple[int, int]:
        assert self._vlen is not None
        total, max_len = 0, 0
        h_off.update(np.zeros(1, "<i8").tobytes())
        for a, rows in self._vlen_blocks(chunk):
            lengths = np.fromiter((r.shape[0] for r in rows), np.int64, len(rows))
            self._check_lengths(a, lengths, context_len)
            max_len = max(max_len, int(lengths.max()))
            h_off.update((total + np.cumsum(lengths)).astype("<i8").tobytes())
            total += int(lengths.sum())
            for i, row in enumerate(rows):
                j = self._check_ids(row, vocab_size)
                if j >= 0:
                    raise self._error(f"prompt {a + i} has token id {int(row[j])} (at position {j}) "
                                      f"outside the model's vocabulary [0, {vocab_size})")
            h_tok.update(np.concatenate(rows).astype("<i4").tobytes())
        return total, max_len

    def _vlen_blocks(self, chunk_tokens: int) -> Iterator[tuple[int, list[np.ndarray]]]:
        """(first index, rows) of the vlen dataset, about chunk_tokens ids per block."""
        assert self._vlen is not None
        step = max(1, min(65536, chunk_tokens // 64))
        for a in range(0, self.n, step):
            yield a, [np.asarray(r) for r in self._vlen[a:a + step]]

    def _validate_max_new_tokens(self, chunk: int) -> tuple[int | None, "hashlib._Hash | None"]:
        if self._max_new is None:
            return None, None
        h = hashlib.sha256()
        best = 0
        for a in range(0, self.n, chunk):
            v = np.asarray(self._max_new[a:a + chunk])
            bad = np.flatnonzero(v < 1)
            if bad.size:
                i = int(bad[0])
                raise self._error(f"prompt {a + i} has max_new_tokens {int(v[i])}; it must be >= 1")
            if int(v.max()) > np.iinfo(np.int32).max:
                raise self._error(f"max_new_tokens of a prompt in [{a}, {a + len(v)}) exceeds int32")
            best = max(best, int(v.max()))
            h.update(v.astype("<i4").tobytes())
        return (best if self.n else None), h

    # ---- reading -------------------------------------------------------------------------------

    def iter_prompts(self, skip: np.ndarray | None = None, chunk_prompts: int = 65536
                     ) -> Iterator[tuple[int, np.ndarray, int | None]]:
        """Yield (index, int32 tokens, max_new_tokens or None) in index order, skipping skip[i]."""
        if skip is not None:
            skip = np.asarray(skip)
            if skip.dtype != np.bool_ or skip.shape != (self.n,):
                raise ValueError(f"skip must be a bool array of shape ({self.n},), "
                                 f"got {skip.dtype} {skip.shape}")
        chunk_prompts = max(1, int(chunk_prompts))
        for a in range(0, self.n, chunk_prompts):
            b = min(a + chunk_prompts, self.n)
            if skip is not None and skip[a:b].all():
                continue
            mnt = np.asarray(self._max_new[a:b]) if self._max_new is not None else None
            for i, tokens in self._read_block(a, b, skip):
                yield i, tokens, (int(mnt[i - a]) if mnt is not None else None)

    def _read_block(self, a: int, b: int, skip: np.ndarray | None
                    ) -> Iterator[tuple[int, np.ndarray]]:
        if self._vlen is not None:
            for i, row in enumerate(self._vlen[a:b], start=a):
                if skip is None or not skip[i]:
                    yield i, np.asarray(row, dtype=np.int32)
            return
        assert self._tokens is not None
        off = self._offsets_block(a, b)  # (b-a+1,)
        i = a
        while i < b:
            # Cut the block so that no read exceeds MAX_BLOCK_TOKENS (one prompt at least).
            limit = off[i - a] + MAX_BLOCK_TOKENS
            j = max(i + 1, a + int(np.searchsorted(off, limit, side="right")) - 1)
            j = min(j, b)
            if skip is None or not skip[i:j].all():
                base = int(off[i - a])
                flat = np.asarray(self._tokens[base:int(off[j - a])], dtype=np.int32)
                for k in range(i, j):
                    if skip is None or not skip[k]:
                        yield k, flat[int(off[k - a]) - base:int(off[k - a + 1]) - base]
            i = j

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
                 chunk_tokens: int = 1 << 16) -> None:
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
        for k, v in (attrs or {}).items():
            self._f.attrs[k] = v
        self.n = 0
        self.n_tokens = 0
        self._buf_tokens: list[np.ndarray] = []
        self._buf_lengths: list[int] = []
        self._buf_max_new: list[int] = []
        self._buffered = 0

    def add(self, tokens: Sequence[int] | np.ndarray, max_new_tokens: int | None = None) -> None:
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"prompt {self.n}: tokens must be a non-empty 1-D sequence")
        if (self._max_new is None) != (max_new_tokens is None):
            raise ValueError(f"prompt {self.n}: max_new_tokens given "
                             f"{'without' if self._max_new is None else 'missing'} "
                             f"with_max_new_tokens")
        self._buf_tokens.append(ids.astype(np.int32))
        self._buf_lengths.append(int(ids.size))
        if max_new_tokens is not None:
            self._buf_max_new.append(int(max_new_tokens))
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


def _append(ds: h5py.Dataset, values: np.ndarray) -> None:
    n = ds.shape[0]
    ds.resize((n + values.shape[0],))
    ds[n:] = values


def write_prompts(path: str | os.PathLike, prompts: Sequence[Sequence[int] | np.ndarray],
                  max_new_tokens: Sequence[int] | None = None,
                  attrs: Mapping[str, str | int | float] | None = None) -> None:
    """Write a flat-layout prompts file from in-memory prompts (small files, tests)."""
    if max_new_tokens is not None and len(max_new_tokens) != len(prompts):
        raise ValueError(f"{len(max_new_tokens)} max_new_tokens for {len(prompts)} prompts")
    with PromptWriter(path, with_max_new_tokens=max_new_tokens is not None, attrs=attrs) as w:
        for i, p in enumerate(prompts):
            w.add(p, None if max_new_tokens is None else max_new_tokens[i])
