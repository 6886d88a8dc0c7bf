"""Completions: persisted as they finish (crash-safe, resumable), assembled in prompt order at the end.

While a job runs, finished completions are buffered and written as small HDF5 *shards* into
`<output>.parts/`, next to a `job.json` naming the job. A shard is written as `*.tmp`, fsynced,
then renamed, and the folder fsynced: a job killed at any moment (SIGKILL, node failure) leaves
only whole shards, and loses at most the completions still buffered. A new `CompletionStore` over
the same folder finds what is done; `finalize` writes the final file (DESIGN.md, "Completions
file") in prompt order from the shards. The final file's datasets depend only on the completions,
so a job run in one go and the same job resumed after kills produce identical datasets.

Shard layout: `index` int64 (k,) prompt indices, `offsets` int64 (k+1,), `tokens` int32 (flat),
`finish_reason` uint8 (k,).
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import threading
import time
from collections.abc import Iterator, Mapping, Sequence

import h5py
import numpy as np

from ghmpi.errors import InputError, StorageError
from ghmpi.io.identity import identity_difference
from ghmpi.io.prompts import ragged_blocks

__all__ = ["FINISH_STOP", "FINISH_LENGTH", "CompletionStore", "CompletionFile", "read_completions",
           "check_output_path"]

FINISH_STOP = 1  # stopped on EOS or a stop token (that token is the last id)
FINISH_LENGTH = 2  # reached max_new_tokens or the model's context limit
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
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(queue_shards)))
        self._writer: threading.Thread | None = None
        self._writing: tuple[str, float] | None = None  # (path, since) of the shard being written
        self.error: StorageError | None = None  # the first failed write; nothing written after it
        self.lost = 0  # completions handed to the writer but not persisted (after an error)

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

    def add(self, index: int, tokens: Sequence[int] | np.ndarray, finish_reason: int) -> None:
        """Record prompt `index`'s completion; persisted at the next (possibly automatic) flush.

        An automatic flush hands a shard to the writer thread and returns: it blocks only while
        `queue_shards` shards already wait for the disk (backpressure, bounded memory)."""
        if not 0 <= index < self.n_prompts:
            raise ValueError(f"prompt index {index} out of range [0, {self.n_prompts})")
        if finish_reason not in (FINISH_STOP, FINISH_LENGTH):
            raise ValueError(f"finish_reason must be {FINISH_STOP} or {FINISH_LENGTH}, "
                             f"got {finish_reason}")
        with self._lock:
            if self._taken[index]:
                raise ValueError(f"prompt {index} already has a completion")
            self._taken[index] = True
            self._buffer.append((int(index), np.asarray(tokens, dtype=np.int32).reshape(-1),
                                 int(finish_reason)))
            due = (len(self._buffer) >= self.flush_every
                   or time.monotonic() - self._last_flush >= self.flush_seconds)
        if due:
            self._submit()

    def flush(self) -> None:
        """Persist the buffered completions as one new shard (atomically, durably) and wait until
        every shard handed to the writer is on disk. Raises StorageError if one could not be."""
        self._submit()
        self._queue.join()
        if self.error is not None:
            raise self.error

    def persist(self, timeout: float) -> bool:
        """Like `flush`, from any thread, waiting at most `timeout` seconds (the disk itself may
        hang). True when everything finished so far is on disk."""
        deadline = time.monotonic() + timeout
        return self._submit(timeout=timeout) and self.wait(max(0.0, deadline - time.monotonic()))

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the shards handed to the writer are on disk (or failed); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        q = self._queue
        with q.all_tasks_done:
            while q.unfinished_tasks:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                q.all_tasks_done.wait(left)
        return self.error is None

    @property
    def stuck_on(self) -> tuple[str, float] | None:
        """(shard path, seconds) of a shard the writer has been writing for over a second."""
        w = self._writing
        if w is None or time.monotonic() - w[1] < 1.0:
            return None
        return w[0], time.monotonic() - w[1]

    def _submit(self, timeout: float | None = None) -> bool:
        """Hand the buffer to the writer thread as the next shard. False if the queue stayed full
        for `timeout` seconds (the shard stays queued for the writer all the same)."""
        with self._lock:
            self._last_flush = time.monotonic()
            if not self._buffer:
                return True
            batch, self._buffer = self._buffer, []
            name = f"shard-{self._next_shard:08d}.h5"
            self._next_shard += 1
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="ghmpi-shard-writer",
                                            daemon=True)
            self._writer.start()
        try:
            self._queue.put((name, batch), timeout=timeout)
        except queue.Full:  # back into the buffer: a later flush writes it (under another name)
            with self._lock:
                self._buffer[:0] = batch
            return False
        return True

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                name, batch = item
                if self.error is None:
                    self._write_shard(name, batch)
                if self.error is not None:
                    self.lost += len(batch)
            finally:
                self._queue.task_done()

    def _write_shard(self, name: str, batch: list[tuple[int, np.ndarray, int]]) -> None:
        """Write one shard as *.tmp, fsync, rename, fsync the folder (writer thread)."""
        index = np.array([b[0] for b in batch], dtype=np.int64)
        lengths = np.array([b[1].size for b in batch], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # (k+1,)
        tokens = np.concatenate([b[1] for b in batch]).astype(np.int32)
        reasons = np.array([b[2] for b in batch], dtype=np.uint8)
        path = os.path.join(self.parts, name)
        self._writing = (path, time.monotonic())
        try:
            with h5py.File(path + ".tmp", "w") as f:
                for key, value in (("index", index), ("offsets", offsets), ("tokens", tokens),
                                   ("finish_reason", reasons)):
                    f.create_dataset(key, data=value, track_times=False)
            _fsync_path(path + ".tmp")
            os.rename(path + ".tmp", path)
            _fsync_path(self.parts)
        except (OSError, RuntimeError) as e:
            self.error = StorageError(path, _os_error(e), "write shard")
            _remove_quietly(path + ".tmp")  # only whole shards, and the space back
            return
        finally:
            self._writing = None
        with self._lock:
            self.done[index] = True

    def finalize(self, attrs: Mapping[str, str | int | float]) -> None:
        """Write the final file in prompt order, replace the output with it, drop the parts.

        Needs every prompt done. A no-op when the output was already complete.
        """
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
            _fsync_path(tmp)
            os.replace(tmp, self.output)
            _fsync_path(os.path.dirname(os.path.abspath(self.output)))
        except (OSError, RuntimeError) as e:
            _remove_quietly(tmp)
            raise StorageError(tmp, _os_error(e), "write the final file") from None
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
            for key, value in {**attrs, "job_id": self.job_id}.items():
                f.attrs[key] = value

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
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join()
            self._writer = None

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


_ERRNO_IN_TEXT = re.compile(r"errno = (\d+)")


def _os_error(e: BaseException) -> OSError:
    """An OSError with an errno and a short text for what h5py raised: HDF5 reports a failed
    write as a RuntimeError (or OSError) whose long text holds `errno = N`."""
    m = _ERRNO_IN_TEXT.search(str(e))
    if m:  # HDF5's own text is a page long: the errno says it in a few words
        n = int(m.group(1))
        return OSError(n, os.strerror(n))
    if isinstance(e, OSError) and e.errno is not None:
        return e
    return OSError(None, " ".join(str(e).split())[:200])


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _write_atomic(path: str, data: bytes) -> None:
    with open(path + ".tmp", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(path + ".tmp", path)
    _fsync_path(os.path.dirname(path))


def _fsync_path(path: str) -> None:
    """fsync a file (after h5py closed it) or a folder (to make a rename durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
