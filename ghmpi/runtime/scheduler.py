"""Continuous batching on plain data: which prompt sits in which slot, what each pass feeds.

The scheduler lives on slice 0 and never touches tensors or MPI. Per micro-batch it plans a
*pass* (one trip through every layer of every slice): one row per active slot, either a whole
prompt to prefill or the last sampled token to decode. When the pass comes back with one sampled
token per row, `commit` applies the stopping rules and frees finished slots, which the next plan
refills from the prompt queue at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from ghmpi.io.completions import FINISH_LENGTH, FINISH_STOP  # the file's finish_reason codes


@dataclass(slots=True)
class Sequence:
    index: int  # prompt index in the prompts file
    prompt: np.ndarray  # (L,) int32
    max_new: int
    generated: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.generated)


@dataclass(frozen=True, slots=True)
class Row:
    """One sequence's share of a pass: `tokens` are fed at positions start, start+1, ..."""

    slot: int
    index: int  # prompt index (seeds its random stream)
    start: int
    tokens: np.ndarray  # (ntok,) int
    prefill: bool

    @property
    def ntok(self) -> int:
        return len(self.tokens)

    @property
    def next_position(self) -> int:
        """Position of the token this row's pass samples."""
        return self.start + len(self.tokens)


@dataclass(frozen=True, slots=True)
class Finished:
    index: int
    tokens: list[int]
    reason: int


class Scheduler:
    def __init__(self, prompts: Iterable[tuple[int, np.ndarray, int | None]], slots_of: list[range],
                 max_new_tokens: int, eos_ids: Iterable[int], stop_ids: Iterable[int],
                 ignore_eos: bool, context_len: int, prefill_tokens: int):
        self._queue: Iterator[tuple[int, np.ndarray, int | None]] = iter(prompts)
        self._peeked: tuple[int, np.ndarray, int | None] | None = None
        self.slots_of = slots_of  # micro-batch -> its slot ids
        self.active: dict[int, Sequence] = {}  # slot -> sequence
        self.max_new_tokens = max_new_tokens
        self.stop_ids = frozenset(stop_ids) | (frozenset() if ignore_eos else frozenset(eos_ids))
        self.context_len = context_len
        self.prefill_tokens = prefill_tokens
        self.draining = False  # set on SIGTERM/SIGUSR1: admit nothing more
        self.admitted = 0

    def _next_prompt(self) -> tuple[int, np.ndarray, int | None] | None:
        if self._peeked is None:
            self._peeked = next(self._queue, None)
        return self._peeked

    @property
    def queue_empty(self) -> bool:
        return self._next_prompt() is None

    def plan(self, mb: int) -> list[Row]:
        """Rows of micro-batch `mb`'s next pass: decodes of its active slots, then admissions
        into its free slots while the pass's prefill budget lasts (always at least one)."""
        if self.draining:
            return []
        rows: list[Row] = []
        budget = self.prefill_tokens
        for slot in self.slots_of[mb]:
            seq = self.active.get(slot)
            if seq is not None:
                rows.append(Row(slot, seq.index, seq.length - 1,
                                np.asarray(seq.generated[-1:], dtype=np.int64), False))
                continue
            nxt = self._next_prompt()
            if nxt is None or (budget < len(nxt[1]) and budget < self.prefill_tokens):
                continue
            self._peeked = None
            index, prompt, max_new = nxt
            self.active[slot] = Sequence(index, prompt, max_new or self.max_new_tokens)
            self.admitted += 1
            budget -= len(prompt)
            rows.append(Row(slot, index, 0, np.asarray(prompt, dtype=np.int64), True))
        return rows

    def commit(self, rows: list[Row], sampled: Iterable[int]) -> list[Finished]:
        """Append each row's sampled token; return the sequences that finished (slots freed)."""
        done = []
        for row, tok in zip(rows, sampled):
            seq = self.active[row.slot]
            tok = int(tok)
            seq.generated.append(tok)
            if tok in self.stop_ids:
                reason = FINISH_STOP
            elif len(seq.generated) >= seq.max_new or seq.length >= self.context_len:
                reason = FINISH_LENGTH
            else:
                continue
            del self.active[row.slot]
            done.append(Finished(seq.index, seq.generated, reason))
        return done

    def drop_active(self) -> None:
        """Forget sequences still in flight (they are generated again when the job resumes)."""
        self.active.clear()
