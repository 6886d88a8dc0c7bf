"""Stop strings: incremental detokenization on a thread of its own, off the ring's hot path.

Slice 0's loop only queues each new token of a sequence that has stop strings (`feed`); a worker
thread decodes the tokens incrementally (a few tokens' text at a time, the way vLLM does: the new
text is decode(ids[prefix:]) less decode(ids[prefix:read]), deferred while it ends in an
incomplete UTF-8 character) and looks for the stop strings in the text that the new token
completed. A sequence whose text reached one is reported (`pop_hits`); the scheduler frees its
slot at its next commit. Tokens it generated meanwhile are dropped, so the result does not depend
on how far the thread lags: it is cut at the first token whose text completes a stop string, the
token at which transformers' `generate(stop_strings=...)` stops.

What is kept (generation.include_stop_str): false (the default) keeps the ids before the first
token whose text overlaps the stop string, so the stored completion decodes to text ending before
it (a token straddling the stop string's start is dropped whole); true keeps the ids through the
token that completed it, as transformers does. Either way finish_reason is 3 (FINISH_STOP_STRING).

A sequence that ends otherwise (EOS, length) is handed over with `end`: the thread finishes
reading its tokens first, so a stop string in its last tokens still counts. Finished records come
back from `take`, in the order the thread completed them. Plain data and a tokenizer; no torch.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any

from ghmpi.io.completions import FINISH_STOP_STRING
from ghmpi.runtime.scheduler import Finished, Sequence

__all__ = ["StopStrings", "cut_at_stop"]


@dataclass(slots=True)
class _Text:
    ids: list[int] = field(default_factory=list)
    text: str = ""
    ends: list[int] = field(default_factory=list)  # len(text) once token i's text was in
    prefix: int = 0  # ids[prefix:read] decode to the text's tail already taken
    read: int = 0
    cut: int | None = None  # tokens kept, once a stop string was found


class StopStrings:
    def __init__(self, tokenizer: Any, keep: bool = False, threaded: bool = True) -> None:
        self.tok = tokenizer
        self.keep = keep
        self._state: dict[int, _Text] = {}  # completion row -> its text (thread's own)
        self._hits: set[int] = set()
        self._done: list[Finished] = []
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue | None = queue.SimpleQueue() if threaded else None
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    # -- the job's side ------------------------------------------------------------------------
    def feed(self, row: int, token: int, stops: tuple[str, ...]) -> None:
        self._put(("feed", row, token, stops))

    def end(self, row: int, seq: Sequence, reason: int) -> None:
        """`seq` (off the scheduler's books) is finished: report it once its text is read."""
        self._put(("end", row, seq, reason))

    def forget(self, row: int) -> None:
        self._put(("forget", row, None, None))

    def pop_hits(self) -> set[int]:
        """Rows whose text reached a stop string since the last call."""
        if not self._hits:
            return set()
        with self._lock:
            hits, self._hits = self._hits, set()
        return hits

    def take(self) -> list[Finished]:
        """Finished records completed by the thread since the last call."""
        if self.error is not None:
            raise RuntimeError(f"stop-string thread failed: {self.error}") from self.error
        if not self._done:
            return []
        with self._lock:
            done, self._done = self._done, []
        return done

    def close(self) -> list[Finished]:
        """Wait for everything queued; the records not taken yet."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        return self.take()

    def _put(self, item: tuple) -> None:
        if self._queue is None:
            self._handle(item)
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="ghmpi-stop-strings",
                                            daemon=True)
            self._thread.start()
        self._queue.put(item)

    # -- the thread's side ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self._handle(item)
            except BaseException as e:  # reported to the loop by take()
                self.error = e

    def _handle(self, item: tuple) -> None:
        what, row, a, b = item
        if what == "feed":
            st = self._state.setdefault(row, _Text())
            if st.cut is None and self._step(st, a, b):
                with self._lock:
                    self._hits.add(row)
        elif what == "end":
            st = self._state.pop(row, None)
            seq, reason = a, b
            if st is not None and st.cut is not None:
                fin = Finished.of(seq, FINISH_STOP_STRING, keep=st.cut)
            else:
                fin = Finished.of(seq, reason)
            with self._lock:
                self._done.append(fin)
        else:
            self._state.pop(row, None)

    def _step(self, st: _Text, token: int, stops: tuple[str, ...]) -> bool:
        """Take in one token; True when the text now holds a stop string (st.cut set)."""
        st.ids.append(token)
        before = len(st.text)
        head = self.tok.decode(st.ids[st.prefix:st.read], skip_special_tokens=True)
        full = self.tok.decode(st.ids[st.prefix:], skip_special_tokens=True)
        if len(full) > len(head) and not full.endswith("\ufffd"):
            st.text += full[len(head):]
            st.prefix, st.read = st.read, len(st.ids)
        st.ends.append(len(st.text))
        if len(st.text) == before:
            return False
        found = [at for s in stops if (at := st.text.find(s, max(0, before - len(s) + 1))) >= 0]
        if not found:
            return False
        at = min(found)
        st.cut = len(st.ids) if self.keep else sum(1 for e in st.ends if e <= at)
        return True


def cut_at_stop(tokenizer: Any, ids: list[int], stops: tuple[str, ...], keep: bool
                ) -> list[int] | None:
    """Reference of the rule above on a whole list (tests): the kept ids, or None when no stop
    string occurs."""
    st = StopStrings(tokenizer, keep=keep, threaded=False)
    for t in ids:
        st.feed(0, t, stops)
        if st.pop_hits():
            return list(ids[:st._state[0].cut])
    return None
