"""Writing completion shards off the hot path: a writer thread behind a bounded queue.

`CompletionStore` (ghmpi/io/completions.py) decides what goes into a shard and what it is called;
`ShardWriter` puts it on disk. Each shard is written as `*.tmp`, fsynced, renamed and the folder
fsynced, so a crash at any moment leaves only whole shards. At most `queue_shards` shards wait for
the disk: when it is slow, `submit` blocks (backpressure) instead of memory growing. The first
failed write (ENOSPC, EDQUOT, EROFS, EACCES, EIO, ...) is kept as a `StorageError` naming the path
and the cause; nothing is written after it (shards are numbered in order, so a gap would be
harmless, but the user has to act anyway), and the completions not written are counted in `lost`.
"""

from __future__ import annotations

import os
import queue
import re
import threading
import time
from typing import Callable

import h5py
import numpy as np

from ghmpi.errors import StorageError

__all__ = ["ShardWriter", "Batch", "write_shard", "fsync_path", "os_error", "remove_quietly"]

# (completion row, int32 token ids, finish reason, extras): extras None, or a dict of optional
# arrays: "logprobs" (L,) float32, "top_logprob_ids" (L, k) int32, "top_logprobs" (L, k) float32
# aligned with the ids, "prompt_logprobs" (P,) float32 (a prompt's first sample only).
Batch = list[tuple]


class ShardWriter:
    """`submit(name, batch)` from the job's loop; the thread writes; `wait` until it has."""

    def __init__(self, folder: str, queue_shards: int = 4,
                 on_written: Callable[[np.ndarray], None] = lambda index: None) -> None:
        self.folder = folder
        self.on_written = on_written  # called on the writer thread with the shard's indices
        self.error: StorageError | None = None
        self.lost = 0  # completions handed over but not persisted (after an error)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(queue_shards)))
        self._thread: threading.Thread | None = None
        self._writing: tuple[str, float] | None = None  # (path, since) of the shard being written

    def submit(self, name: str, batch: Batch, timeout: float | None = None) -> bool:
        """Queue one shard; blocks while the queue is full. False if it stayed full `timeout` s."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="ghmpi-shard-writer",
                                            daemon=True)
            self._thread.start()
        try:
            self._queue.put((name, batch), timeout=timeout)
        except queue.Full:
            return False
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the shards submitted are on disk (or failed). False on timeout or error."""
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
        """(shard path, seconds) of a shard being written for over a second."""
        w = self._writing
        if w is None or time.monotonic() - w[1] < 1.0:
            return None
        return w[0], time.monotonic() - w[1]

    def close(self) -> None:
        """Stop the thread once the shards submitted are written (or failed)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                name, batch = item
                if self.error is None:
                    self._write(name, batch)
                if self.error is not None:
                    self.lost += len(batch)
            finally:
                self._queue.task_done()

    def _write(self, name: str, batch: Batch) -> None:
        path = os.path.join(self.folder, name)
        self._writing = (path, time.monotonic())
        try:
            index = write_shard(path, batch)
        except (OSError, RuntimeError) as e:
            self.error = StorageError(path, os_error(e), "write shard")
            remove_quietly(path + ".tmp")  # only whole shards, and the space back
            return
        finally:
            self._writing = None
        self.on_written(index)


def write_shard(path: str, batch: Batch) -> np.ndarray:
    """Write one shard crash-safely (*.tmp, fsync, rename, fsync the folder); its indices.

    Layout: `index` int64 (k,), `offsets` int64 (k+1,), `tokens` int32 (flat),
    `finish_reason` uint8 (k,); with log-probabilities also `logprobs` (flat), `top_logprob_ids`
    and `top_logprobs` (flat, k), `prompt_logprobs` (flat) with `prompt_offsets` (k+1,)."""
    index = np.array([b[0] for b in batch], dtype=np.int64)
    lengths = np.array([b[1].size for b in batch], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # (k+1,)
    tokens = np.concatenate([b[1] for b in batch]).astype(np.int32)
    reasons = np.array([b[2] for b in batch], dtype=np.uint8)
    data = [("index", index), ("offsets", offsets), ("tokens", tokens), ("finish_reason", reasons)]
    extras = [b[3] if len(b) > 3 and b[3] is not None else {} for b in batch]
    for key, dtype in (("logprobs", np.float32), ("top_logprob_ids", np.int32),
                       ("top_logprobs", np.float32)):
        parts = [e[key] for e in extras if e.get(key) is not None]
        if parts:
            if len(parts) != len(batch):
                raise ValueError(f"shard {path}: '{key}' given for some completions only")
            data.append((key, np.concatenate(parts).astype(dtype)))
    plp = [e.get("prompt_logprobs") for e in extras]
    if any(p is not None for p in plp):
        plens = np.array([0 if p is None else p.size for p in plp], dtype=np.int64)
        data.append(("prompt_offsets", np.concatenate([[0], np.cumsum(plens)]).astype(np.int64)))
        data.append(("prompt_logprobs", np.concatenate(
            [np.asarray(p, np.float32) for p in plp if p is not None]).astype(np.float32)))
    with h5py.File(path + ".tmp", "w") as f:
        for key, value in data:
            f.create_dataset(key, data=value, track_times=False)
    fsync_path(path + ".tmp")
    os.rename(path + ".tmp", path)
    fsync_path(os.path.dirname(path))
    return index


def fsync_path(path: str) -> None:
    """fsync a file (after h5py closed it) or a folder (to make a rename durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_ERRNO_IN_TEXT = re.compile(r"errno = (\d+)")


def os_error(e: BaseException) -> OSError:
    """An OSError with an errno and a short text for what h5py raised: HDF5 reports a failed
    write as a RuntimeError (or OSError) whose long text holds `errno = N`."""
    m = _ERRNO_IN_TEXT.search(str(e))
    if m:  # HDF5's own text is a page long: the errno says it in a few words
        n = int(m.group(1))
        return OSError(n, os.strerror(n))
    if isinstance(e, OSError) and e.errno is not None:
        return e
    return OSError(None, " ".join(str(e).split())[:200])


def remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
