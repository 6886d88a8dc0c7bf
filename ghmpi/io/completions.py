"""Completions: persisted as they finish (crash-safe, resumable), assembled in prompt order at the end.

While a job runs, finished completions are buffered and written as small HDF5 *shards* into
`<output>.parts/`, next to a `job.json` naming the job. A writer thread (ghmpi/io/shards.py)
writes each shard as `*.tmp`, fsyncs it, renames it and fsyncs the folder, off the job's loop: a
job killed at any moment (SIGKILL, node failure) leaves only whole shards, and loses at most the
completions still buffered or queued. A new `CompletionStore` over
the same folder finds what is done; `finalize` writes the final file (DESIGN.md, "Completions
file") in prompt order from the shards. The final file's datasets depend only on the completions,
so a job run in one go and the same job resumed after kills produce identical datasets.

Shard layout: `index` int64 (k,) completion rows, `offsets` int64 (k+1,), `tokens` int32 (flat),
`finish_reason` uint8 (k,), and with log-probabilities the datasets of ghmpi/io/shards.py.

A completion is a *row*: with several samples per prompt (generation.n or the prompts file's
`n`) rows are prompt-major, row r is prompt p's sample r - row0(p) (row0 = the samples of the
prompts before it); with one sample per prompt a row is a prompt.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator, Mapping, Sequence

import h5py
import numpy as np

from ghmpi.errors import InputError, StorageError
from ghmpi.io.identity import identity_difference
from ghmpi.io.shards import ShardWriter, fsync_path, os_error, remove_quietly
from ghmpi.io.prompts import ragged_blocks

__all__ = ["FINISH_STOP", "FINISH_LENGTH", "FINISH_STOP_STRING", "CompletionStore", "CompletionFile", "read_completions",
           "check_output_path"]

FINISH_STOP = 1  # stopped on EOS or a stop token (that token is the last id)
FINISH_LENGTH = 2  # reached max_new_tokens or the model's context limit
FINISH_STOP_STRING = 3  # its text reached a stop string (generation.stop, or the prompt's own)
JOB_FILE = "job.json"
_SHARD = re.compile(r"^shard-(\d{8})\.h5$")
_WRITE_BLOCK_TOKENS = 1 << 22  # tokens held in memory at once while finalizing
_CHUNK = 1 << 16  # HDF5 chunk length of the final file's datasets


class CompletionStore:
    """Completions of one job: persisted as they come, resumable, finalized in prompt order.

    Only rank 0 uses it. A store over an output that belongs to another job (a different
    `job_id`) refuses to start unless `overwrite`, which discards the other job's parts; the other
    job's final output is only replaced by `finalize`, so a failed run never damages it.
    """

    def __init__(self, output: str | os.PathLike, n_prompts: int, job_id: str,
                 overwrite: bool = False, flush_every: int = 256, flush_seconds: float = 5.0,
                 queue_shards: int = 4, identity: dict | None = None) -> None:
        self.output = os.fspath(output)
        self.parts = self.output + ".parts"
        self.n_prompts = int(n_prompts)
        self.job_id = str(job_id)
        self.flush_every = max(1, int(flush_every))
        self.flush_seconds = float(flush_seconds)
        self.ignored_shards: list[str] = []  # unreadable shards found on open (names)

        # -- checks first: nothing is created or removed unless they all pass --
        check_output_path(self.output)
        if os.path.exists(self.parts) and not os.path.isdir(self.parts):
            raise InputError(f"{self.parts} is in the way: it should be this job's parts folder")
        self.complete = False
        if os.path.exists(self.output):
            final_job, final_n = _final_identity(self.output)
            if final_job == self.job_id:
                if final_n != self.n_prompts:
                    raise InputError(f"output {self.output} has job id {self.job_id} but holds "
                                     f"{final_n} completions, not {self.n_prompts}; is it damaged?")
                self.complete = True
            elif not overwrite:
                raise InputError(f"output {self.output} belongs to another job (job id "
                                 f"{final_job or 'unknown'}); set io.overwrite: true to start afresh "
                                 "(it is replaced when the new job finishes)")
        has_parts = os.path.isdir(self.parts)
        meta = self._read_job_file() if has_parts else None
        meta_ok = meta is not None and (meta["job_id"], meta["n_prompts"]) == (self.job_id,
                                                                              self.n_prompts)
        # Parts without a readable job.json are ours only if nothing was ever persisted there.
        parts_ours = not has_parts or meta_ok or (meta is None and not self._shard_names())
        if not parts_ours and not overwrite and not self.complete:
            differs = identity_difference(identity or {}, (meta or {}).get("identity"))
            raise InputError(f"{self.parts} holds the partial results of another job"
                             f"{f' (it differs in: {differs})' if differs else ''}; set "
                             "io.overwrite: true to discard them and start afresh")

        # -- act --
        if self.complete:
            if has_parts and parts_ours:  # left over from a kill right after the final rename
                shutil.rmtree(self.parts)
            self.done = np.ones(self.n_prompts, dtype=np.bool_)
        else:
            try:
                if not parts_ours:
                    shutil.rmtree(self.parts)
                os.makedirs(self.parts, exist_ok=True)
                if not meta_ok:
                    meta_new = {"job_id": self.job_id, "n_prompts": self.n_prompts}
                    if identity is not None:
                        meta_new["identity"] = identity
                    _write_atomic(os.path.join(self.parts, JOB_FILE),
                                  json.dumps(meta_new, indent=2).encode() + b"\n")
                self.done = self._scan_shards()
            except OSError as e:  # read-only, full, denied: before any work
                raise StorageError(self.parts, e, "prepare the parts folder") from None
        self._taken = self.done.copy()  # done or buffered: add() refuses these
        self._buffer: list[tuple[int, np.ndarray, int]] = []
        self._last_flush = time.monotonic()
        # The writer thread: shards wait in a bounded queue, so a slow disk slows `add` (the
        # caller) instead of growing memory; the lock guards the buffer and `done`.
        self._lock = threading.Lock()
        self._writer = ShardWriter(self.parts, queue_shards, on_written=self._written)

    @property
    def n_done(self) -> int:
        return int(np.count_nonzero(self.done))

    # ---- opening ------------------------------------------------------------------------------

    def _read_job_file(self) -> dict | None:
        """The parts folder's job.json as {job_id, n_prompts}, or None when unreadable."""
        try:
            with open(os.path.join(self.parts, JOB_FILE), encoding="utf-8") as f:
                meta = json.load(f)
            return {"job_id": meta["job_id"], "n_prompts": meta["n_prompts"],
                    **({"identity": meta["identity"]} if "identity" in meta else {})}
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _shard_names(self) -> list[str]:
        return sorted(name for name in os.listdir(self.parts) if _SHARD.match(name))

    def _scan_shards(self) -> np.ndarray:
        for name in os.listdir(self.parts):
            if name.endswith(".tmp"):  # a write cut short: never renamed, never counted
                os.remove(os.path.join(self.parts, name))
        done = np.zeros(self.n_prompts, dtype=np.bool_)
        names = self._shard_names()
        self._next_shard = int(_SHARD.match(names[-1]).group(1)) + 1 if names else 0
        for name in names:
            try:
                index = self._read_shard(name, tokens=False)[0]
            except (OSError, KeyError, ValueError, RuntimeError, TypeError):
                self.ignored_shards.append(name)  # damaged: whatever h5py makes of it
                continue
            done[index] = True
        return done

    def _read_shard(self, name: str, tokens: bool = True
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """(index, offsets, finish_reason, tokens or None) of a shard, checked for consistency
        (ValueError); one file open."""
        with h5py.File(os.path.join(self.parts, name), "r") as f:
            index = np.asarray(f["index"][:], dtype=np.int64)  # (k,)
            offsets = np.asarray(f["offsets"][:], dtype=np.int64)  # (k+1,)
            reasons = np.asarray(f["finish_reason"][:], dtype=np.uint8)  # (k,)
            if (offsets.shape != (index.shape[0] + 1,) or reasons.shape != index.shape
                    or offsets[0] != 0 or offsets[-1] != f["tokens"].shape[0]
                    or (index.size and (index.min() < 0 or index.max() >= self.n_prompts))):
                raise ValueError(f"shard {name} is inconsistent")
            flat = np.asarray(f["tokens"][:], dtype=np.int32) if tokens else None
        return index, offsets, reasons, flat

    # ---- writing ------------------------------------------------------------------------------

    def add(self, index: int, tokens: Sequence[int] | np.ndarray, finish_reason: int,
            extras: Mapping[str, np.ndarray | None] | None = None) -> None:
        """Record completion row `index`; persisted at the next (possibly automatic) flush.
        `extras`: its log-probabilities (ghmpi/io/shards.py, `Batch`), or None.

        An automatic flush hands a shard to the writer thread and returns: it blocks only while
        `queue_shards` shards already wait for the disk (backpressure, bounded memory)."""
        if not 0 <= index < self.n_prompts:
            raise ValueError(f"prompt index {index} out of range [0, {self.n_prompts})")
        if finish_reason not in (FINISH_STOP, FINISH_LENGTH, FINISH_STOP_STRING):
            raise ValueError(f"finish_reason must be {FINISH_STOP}, {FINISH_LENGTH} or "
                             f"{FINISH_STOP_STRING}, got {finish_reason}")
        with self._lock:
            if self._taken[index]:
                raise ValueError(f"prompt {index} already has a completion")
            self._taken[index] = True
            self._buffer.append((int(index), np.asarray(tokens, dtype=np.int32).reshape(-1),
                                 int(finish_reason),
                                 {k: v for k, v in extras.items() if v is not None}
                                 if extras else None))
            due = (len(self._buffer) >= self.flush_every
                   or time.monotonic() - self._last_flush >= self.flush_seconds)
        if due:
            self._submit()

    def flush(self) -> None:
        """Persist the buffered completions as one new shard (atomically, durably) and wait until
        every shard handed to the writer is on disk. Raises StorageError if one could not be."""
        self._submit()
        self._writer.wait()
        if self.error is not None:
            raise self.error

    def persist(self, timeout: float) -> bool:
        """Like `flush`, from any thread, waiting at most `timeout` seconds (the disk itself may
        hang). True when everything finished so far is on disk."""
        deadline = time.monotonic() + timeout
        return self._submit(timeout=timeout) and self.wait(max(0.0, deadline - time.monotonic()))

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the shards handed to the writer are on disk (or failed); False on timeout."""
        return self._writer.wait(timeout)

    @property
    def error(self) -> StorageError | None:
        """The first failed shard write; nothing is written after it."""
        return self._writer.error

    @property
    def lost(self) -> int:
        """Completions handed to the writer but not persisted (after an error)."""
        return self._writer.lost

    @property
    def stuck_on(self) -> tuple[str, float] | None:
        """(shard path, seconds) of a shard the writer has been writing for over a second."""
        return self._writer.stuck_on

    def _submit(self, timeout: float | None = None) -> bool:
        """Hand the buffer to the writer thread as the next shard. False if its queue stayed
        full for `timeout` seconds (the completions go back into the buffer)."""
        with self._lock:
            self._last_flush = time.monotonic()
            if not self._buffer:
                return True
            batch, self._buffer = self._buffer, []
            name = f"shard-{self._next_shard:08d}.h5"
            self._next_shard += 1
        if not self._writer.submit(name, batch, timeout=timeout):
            with self._lock:  # a later flush writes them (under another name)
                self._buffer[:0] = batch
            return False
        return True

    def _written(self, index: np.ndarray) -> None:
        with self._lock:
            self.done[index] = True

    def finalize(self, attrs: Mapping[str, str | int | float],
                 n_per_prompt: np.ndarray | None = None) -> None:
        """Write the final file in row order, replace the output with it, drop the parts.

        Needs every row done. A no-op when the output was already complete. `n_per_prompt`
        (N,): samples of each prompt; stored as the `n` dataset when it varies, as the root
        attribute `n` when it does not.
        """
        self._n_per_prompt = n_per_prompt
        if self.complete:
            return
        self.flush()
        if self.n_done != self.n_prompts:
            missing = np.flatnonzero(~self.done)
            raise RuntimeError(f"finalize with {missing.size} prompts not done "
                               f"(first: {int(missing[0])})")
        names, shard_of, start, lengths, reasons = self._locate()
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # (N+1,)
        tmp = self.output + ".tmp"
        try:
            self._write_final(tmp, attrs, names, shard_of, start, lengths, offsets, reasons)
            fsync_path(tmp)
            os.replace(tmp, self.output)
            fsync_path(os.path.dirname(os.path.abspath(self.output)))
        except (OSError, RuntimeError) as e:
            remove_quietly(tmp)
            raise StorageError(tmp, os_error(e), "write the final file") from None
        shutil.rmtree(self.parts, ignore_errors=True)  # a leftover is removed by the next run
        self.complete = True

    def _write_final(self, tmp: str, attrs: Mapping[str, str | int | float], names: list[str],
                     shard_of: np.ndarray, start: np.ndarray, lengths: np.ndarray,
                     offsets: np.ndarray, reasons: np.ndarray) -> None:
        total = int(offsets[-1])
        opts = dict(compression="gzip", shuffle=True, track_times=False)
        with h5py.File(tmp, "w") as f:
            tok_ds = f.create_dataset("tokens", (total,), np.int32,
                                      chunks=(max(1, min(total, _CHUNK)),), **opts)
            f.create_dataset("offsets", data=offsets, chunks=(min(offsets.size, _CHUNK),), **opts)
            f.create_dataset("finish_reason", data=reasons,
                             chunks=(max(1, min(reasons.size, _CHUNK)),), **opts)
            for a, b in ragged_blocks(offsets, _WRITE_BLOCK_TOKENS):
                buf = np.empty(int(offsets[b] - offsets[a]), dtype=np.int32)
                for s in np.unique(shard_of[a:b]):
                    idx = a + np.flatnonzero(shard_of[a:b] == s)  # prompts of this block in shard s
                    src, dst = _segments(start[idx], offsets[idx] - offsets[a], lengths[idx])
                    buf[dst] = self._read_shard(names[s])[3][src]
                tok_ds[int(offsets[a]):int(offsets[b])] = buf
            self._write_extras(f, names, shard_of, start, lengths, offsets)
            n = getattr(self, "_n_per_prompt", None)
            if n is not None and n.size and (n != n[0]).any():
                f.create_dataset("n", data=n.astype(np.int32),
                                 chunks=(max(1, min(n.size, _CHUNK)),), **opts)
            elif n is not None and n.size:
                f.attrs["n"] = int(n[0])
            for key, value in {**attrs, "job_id": self.job_id}.items():
                f.attrs[key] = value

    def _shard_data(self, name: str, key: str) -> np.ndarray:
        with h5py.File(os.path.join(self.parts, name), "r") as f:
            return np.asarray(f[key][:])

    def _write_extras(self, f: h5py.File, names: list[str], shard_of: np.ndarray,
                      start: np.ndarray, lengths: np.ndarray, offsets: np.ndarray) -> None:
        """The optional datasets: per-token log-probabilities (aligned with `tokens`), and the
        prompts' log-probabilities (aligned with the prompts' flat tokens, from each prompt's
        first sample)."""
        if not len(shard_of):
            return
        present: dict[str, tuple] = {}
        for s in np.unique(shard_of):  # a shard of later samples only has no prompt_logprobs
            with h5py.File(os.path.join(self.parts, names[s]), "r") as sh:
                present.update({k: (sh[k].dtype, sh[k].shape[1:]) for k in sh.keys()})
        opts = dict(compression="gzip", shuffle=True, track_times=False)
        for key in ("logprobs", "top_logprob_ids", "top_logprobs"):
            if key in present:
                self._copy_segments(f, key, *present[key], names, shard_of, start, lengths,
                                    offsets, opts)
        if "prompt_logprobs" in present:
            pstart = np.zeros(len(shard_of), dtype=np.int64)
            plen = np.zeros(len(shard_of), dtype=np.int64)
            for s in np.unique(shard_of):
                idx = self._shard_data(names[s], "index")
                try:
                    poff = self._shard_data(names[s], "prompt_offsets")
                except KeyError:
                    continue
                mine = shard_of[idx] == s  # rows this shard supplies (first shard wins)
                pstart[idx[mine]] = poff[:-1][mine]
                plen[idx[mine]] = np.diff(poff)[mine]
            poffsets = np.concatenate([[0], np.cumsum(plen)]).astype(np.int64)
            self._copy_segments(f, "prompt_logprobs", np.dtype(np.float32), (), names, shard_of,
                                pstart, plen, poffsets, opts)

    def _copy_segments(self, f: h5py.File, key: str, dtype: np.dtype, tail: tuple,
                       names: list[str], shard_of: np.ndarray, start: np.ndarray,
                       lengths: np.ndarray, offsets: np.ndarray, opts: dict) -> None:
        total = int(offsets[-1])
        ds = f.create_dataset(key, (total, *tail), dtype,
                              chunks=(max(1, min(total, _CHUNK)), *tail), **opts)
        for a, b in ragged_blocks(offsets, _WRITE_BLOCK_TOKENS):
            buf = np.empty((int(offsets[b] - offsets[a]), *tail), dtype=dtype)
            for s in np.unique(shard_of[a:b]):
                idx = a + np.flatnonzero(shard_of[a:b] == s)
                src, dst = _segments(start[idx], offsets[idx] - offsets[a], lengths[idx])
                if src.size:
                    buf[dst] = self._shard_data(names[s], key)[src]
            ds[int(offsets[a]):int(offsets[b])] = buf

    def _locate(self) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Shard names, and per prompt: shard number (into names), token start in that shard,
        length, finish reason. O(N) index arrays; the first shard (by name) holding a prompt wins.
        """
        n = self.n_prompts
        shard_of = np.full(n, -1, dtype=np.int32)
        start = np.zeros(n, dtype=np.int64)
        lengths = np.zeros(n, dtype=np.int64)
        reasons = np.zeros(n, dtype=np.uint8)
        names = self._shard_names()
        for s, name in enumerate(names):
            if name in self.ignored_shards:
                continue
            index, offsets, shard_reasons, _ = self._read_shard(name, tokens=False)
            new = shard_of[index] < 0
            index = index[new]
            shard_of[index] = s
            start[index] = offsets[:-1][new]
            lengths[index] = np.diff(offsets)[new]
            reasons[index] = shard_reasons[new]
        if (shard_of < 0).any():  # a shard vanished since it was counted
            raise RuntimeError(f"prompt {int(np.flatnonzero(shard_of < 0)[0])} is in no shard "
                               f"of {self.parts}")
        return names, shard_of, start, lengths, reasons

    def close(self) -> None:
        """Persist whatever is buffered (finished completions are never thrown away) and stop
        the writer thread."""
        try:
            if not self.complete:
                self.flush()
        finally:
            self.close_writer()

    def close_writer(self) -> None:
        """Stop the writer thread once the shards handed to it are written (or failed)."""
        self._writer.close()

    def __enter__(self) -> "CompletionStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_output_path(path: str) -> None:
    """InputError unless `path` can be written: its folder exists and is writable, and it is not
    itself a folder. Creates nothing."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f"output {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"output {path}: folder {folder} is not writable")
    if os.path.isdir(path):
        raise InputError(f"output {path} is a folder, not a file")


def _segments(src_starts: np.ndarray, dst_starts: np.ndarray, lengths: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """Element positions (source, destination) of segments copied between flat arrays."""
    total = int(lengths.sum())
    within = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # (total,)
    return np.repeat(src_starts, lengths) + within, np.repeat(dst_starts, lengths) + within


def _final_identity(path: str) -> tuple[str | None, int | None]:
    """(job_id, number of completions) of an existing final file; (None, None) if unreadable."""
    try:
        with h5py.File(path, "r") as f:
            job = f.attrs.get("job_id")
            n = f["finish_reason"].shape[0] if "finish_reason" in f else None
    except (OSError, KeyError):
        return None, None
    if isinstance(job, bytes):
        job = job.decode()
    return (str(job) if job is not None else None), n


def _write_atomic(path: str, data: bytes) -> None:
    with open(path + ".tmp", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(path + ".tmp", path)
    fsync_path(os.path.dirname(path))


class CompletionFile:
    """A final completions file opened for reading (streaming). Context manager."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise InputError(f"completions file {self.path}: no such file")
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as e:
            raise InputError(f"completions file {self.path}: not a readable HDF5 file ({e})") from None
        try:
            missing = [k for k in ("tokens", "offsets", "finish_reason") if k not in self._f]
            if missing:
                raise InputError(f"completions file {self.path}: no dataset {', '.join(missing)}")
            self._tokens, self._offsets = self._f["tokens"], self._f["offsets"]
            self._reasons = self._f["finish_reason"]
            self.n = int(self._reasons.shape[0])
            if self._offsets.shape != (self.n + 1,):
                raise InputError(f"completions file {self.path}: 'offsets' has shape "
                                 f"{self._offsets.shape}, expected ({self.n + 1},)")
        except BaseException:
            self._f.close()
            raise
        self.attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in self._f.attrs.items()}

    def iter_completions(self, chunk_prompts: int = 65536
                         ) -> Iterator[tuple[int, np.ndarray, int]]:
        """Yield (index, int32 generated ids, finish_reason) in prompt order."""
        for a in range(0, self.n, chunk_prompts):
            b = min(a + chunk_prompts, self.n)
            off = np.asarray(self._offsets[a:b + 1], dtype=np.int64)  # (b-a+1,)
            reasons = np.asarray(self._reasons[a:b])
            for s, e in ragged_blocks(off - off[0], _WRITE_BLOCK_TOKENS):
                flat = np.asarray(self._tokens[int(off[s]):int(off[e])], dtype=np.int32)
                for i in range(s, e):
                    yield a + i, flat[off[i] - off[s]:off[i + 1] - off[s]], int(reasons[i])

    def samples_per_prompt(self) -> np.ndarray:
        """(N prompts,) int64: each prompt's number of rows (the `n` dataset or attribute)."""
        if "n" in self._f:
            return np.asarray(self._f["n"][:], dtype=np.int64)
        n = int(self.attrs.get("n", 1))
        if self.n % n:
            raise InputError(f"completions file {self.path}: {self.n} rows are not a multiple "
                             f"of its attribute n = {n}")
        return np.full(self.n // n, n, dtype=np.int64)

    def has(self, key: str) -> bool:
        return key in self._f

    def iter_rows(self, chunk_rows: int = 4096) -> Iterator[tuple[int, np.ndarray, int, dict]]:
        """Yield (row, int32 ids, finish_reason, {dataset: per-token values}) in row order, with
        the per-token datasets present (logprobs, top_logprob_ids, top_logprobs)."""
        keys = [k for k in ("logprobs", "top_logprob_ids", "top_logprobs") if k in self._f]
        for a in range(0, self.n, chunk_rows):
            b = min(a + chunk_rows, self.n)
            off = np.asarray(self._offsets[a:b + 1], dtype=np.int64)
            reasons = np.asarray(self._reasons[a:b])
            lo, hi = int(off[0]), int(off[-1])
            flat = np.asarray(self._tokens[lo:hi], dtype=np.int32)
            extra = {k: np.asarray(self._f[k][lo:hi]) for k in keys}
            for i in range(b - a):
                s, e = int(off[i] - lo), int(off[i + 1] - lo)
                yield a + i, flat[s:e], int(reasons[i]), {k: v[s:e] for k, v in extra.items()}

    def prompt_logprobs(self, start: int, stop: int) -> np.ndarray | None:
        """prompt_logprobs[start:stop] (aligned with the prompts' flat tokens), or None."""
        if "prompt_logprobs" not in self._f:
            return None
        return np.asarray(self._f["prompt_logprobs"][start:stop])

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "CompletionFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_completions(path: str | os.PathLike) -> tuple[list[np.ndarray], np.ndarray]:
    """(per-prompt generated ids, finish_reason uint8 (N,)) of a final completions file."""
    with CompletionFile(path) as cf:
        tokens = [t.copy() for _, t, _ in cf.iter_completions()]
        reasons = np.asarray(cf._reasons[:], dtype=np.uint8)
    return tokens, reasons
