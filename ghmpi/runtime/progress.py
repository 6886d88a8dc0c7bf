"""Rank 0's progress line and final summary: for people watching a job at 3 a.m."""

from __future__ import annotations

import resource
import sys
import time
from collections import Counter

from ghmpi.io.completions import FINISH_LENGTH, FINISH_STOP, FINISH_STOP_STRING


def peak_rss_mib() -> float:
    """This process's peak resident memory (MiB)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def _clock(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    def __init__(self, total: int, done_before: int, interval: float):
        self.total, self.done_before, self.interval = total, done_before, interval
        self.start = time.monotonic()
        self.last = self.start
        self.done = 0  # prompts finished in this run
        self.tokens = 0  # tokens of those completions
        self.sampled = 0  # every token sampled in this run, unfinished sequences' too
        self.reasons: Counter[int] = Counter()
        self.chunked = (0, 0)  # prompts prefilled in chunks on tier-1 slots, on tier-2 slots

    def finished(self, finished: list) -> None:
        for f in finished:
            self.done += 1
            self.tokens += len(f.tokens)
            self.reasons[f.reason] += 1

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        done = self.done_before + self.done
        rate = self.done / elapsed
        eta = _clock((self.total - done) / rate) if rate > 0 else "?"
        return (f"ghmpi: progress: {done}/{self.total} prompts ({100 * done / max(self.total, 1):.1f}%), "
                f"{self.sampled} tokens, {self.sampled / elapsed:.1f} tokens/s, "
                f"elapsed {_clock(elapsed)}, ETA {eta}")

    def tick(self, sampled: int) -> None:
        self.sampled = sampled
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            print(self.line(), flush=True)

    def _chunked(self) -> str:
        t1, t2 = self.chunked
        return (f"; {t1 + t2} prompts prefilled in chunks ({t1} on tier-1 slots, {t2} on tier-2 "
                f"slots)" if t1 + t2 else "")

    def summary(self, wall: float, output: str) -> None:
        print(f"ghmpi: done: {self.done_before + self.done} prompts ({self.done} in this run), "
              f"{self.tokens} tokens generated in {wall:.1f} s, {self.sampled / max(wall, 1e-9):.1f} "
              f"tokens/s; finished on stop token {self.reasons[FINISH_STOP]}, on length "
              f"{self.reasons[FINISH_LENGTH]}"
              f"{f', on a stop string {self.reasons[FINISH_STOP_STRING]}' if self.reasons[FINISH_STOP_STRING] else ''}"
              f"{self._chunked()}; rank 0 peak memory {peak_rss_mib():.0f} MiB; "
              f"wrote {output}", flush=True)
