"""Continuous batching on plain data: which prompt sits in which slot, what each pass feeds.

The scheduler lives on slice 0 and never touches tensors or MPI. Per micro-batch it plans a
*pass* (one trip through every layer of every slice): one row per active slot, either a whole
prompt to prefill, the next chunk of a prompt longer than the pass's budget (`prefill_tokens`),
or the last sampled token to decode. When the pass comes back with one sampled token per row,
`commit` applies the stopping rules and frees finished slots, which the next plan refills from
the prompt queue at once.

Several samples of a prompt (generation.n, or its own `n`) share one prefill: the prompt is
admitted into as many free slots of the micro-batch as it has samples left, as one prefill row
whose K/V is stored into every one of those slots (`Row.copies`); its pass samples one first
token per slot. Samples that find no free slot wait for the next free one, prefilled again.
A sequence with stop strings is checked off the hot path (ghmpi/runtime/stopstrings.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Iterator

import numpy as np

from ghmpi.io.completions import FINISH_LENGTH, FINISH_STOP  # the file's finish_reason codes


@dataclass(frozen=True, slots=True)
class Params:
    """How a row's next token is chosen (a prompt's settings, resolved against the job's)."""

    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


GREEDY = Params()


@dataclass(frozen=True, slots=True)
class Request:
    """A prompt waiting for admission, with what is left of it to generate."""

    index: int  # prompt index in the prompts file
    prompt: np.ndarray  # (L,) int32
    max_new: int | None = None  # None: the job's max_new_tokens
    params: Params | None = None  # None: the job's sampling settings
    samples: tuple[int, ...] = (0,)  # sample indices still to generate, ascending
    row0: int | None = None  # completion row of sample 0 (default: the prompt index)
    stop: tuple[str, ...] = ()  # stop strings


@dataclass(slots=True)
class Sequence:
    index: int  # prompt index in the prompts file
    prompt: np.ndarray  # (L,) int32
    max_new: int
    generated: list[int] = field(default_factory=list)
    sample: int = 0
    row: int = 0  # completion row: the prompt's row0 + sample
    stop: tuple[str, ...] = ()
    logprobs: list[float] = field(default_factory=list)
    top_ids: list[np.ndarray] = field(default_factory=list)
    top_logprobs: list[np.ndarray] = field(default_factory=list)
    prompt_logprobs: np.ndarray | None = None
    pending: int = 0  # prompt tokens not prefilled yet (a long prompt is prefilled in chunks)
    prefilling: bool = False  # admitted by the prefill lane, its first token not sampled yet

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
    sample: int = 0  # sample index (seeds its random stream)
    params: Params = GREEDY
    copies: tuple[tuple[int, int], ...] = ()  # (slot, sample) of further samples sharing a prefill
    prompt_logprobs: bool = False  # a prefill row: return its prompt tokens' log-probabilities
    final: bool = True  # False: a chunk of a prompt with more to come (its draw is dropped)

    @property
    def ntok(self) -> int:
        return len(self.tokens)

    @property
    def next_position(self) -> int:
        """Position of the token this row's pass samples."""
        return self.start + len(self.tokens)

    @property
    def draws(self) -> list[tuple[int, int]]:
        """(slot, sample) of every token this row's pass samples: its own, then its copies'."""
        return [(self.slot, self.sample), *self.copies]


@dataclass
class Draws:
    """What a pass sampled, one entry per draw (rows in order, each row's `draws` in order)."""

    tokens: np.ndarray  # (m,) int64
    logprobs: np.ndarray | None = None  # (m,) float32: the chosen tokens' raw log-probabilities
    top_ids: np.ndarray | None = None  # (m, k) int32
    top_logprobs: np.ndarray | None = None  # (m, k) float32
    prompt_logprobs: list[np.ndarray] = field(default_factory=list)  # per row asking, (L,) float32


@dataclass(frozen=True, slots=True)
class Finished:
    index: int  # prompt index
    tokens: list[int]
    reason: int
    row: int | None = None  # completion row (None: the prompt index)
    sample: int = 0
    logprobs: np.ndarray | None = None  # (len(tokens),) float32
    top_ids: np.ndarray | None = None  # (len(tokens), k) int32
    top_logprobs: np.ndarray | None = None  # (len(tokens), k) float32
    prompt_logprobs: np.ndarray | None = None  # (L,) float32, sample 0 only, when asked

    @staticmethod
    def of(seq: Sequence, reason: int, keep: int | None = None) -> "Finished":
        """The finished record of `seq`, its first `keep` tokens (all by default)."""
        n = len(seq.generated) if keep is None else keep
        lp = np.asarray(seq.logprobs[:n], dtype=np.float32) if seq.logprobs else None
        k = len(seq.top_ids[0]) if seq.top_ids else 0
        ti = (np.asarray(seq.top_ids[:n], dtype=np.int32).reshape(n, k) if seq.top_ids else None)
        tl = (np.asarray(seq.top_logprobs[:n], dtype=np.float32).reshape(n, k)
              if seq.top_logprobs else None)
        return Finished(seq.index, seq.generated[:n], reason, seq.row, seq.sample, lp, ti, tl,
                        seq.prompt_logprobs)


class Scheduler:
    def __init__(self, prompts: Iterable[Request | tuple[int, np.ndarray, int | None]],
                 slots_of: list[range],
                 max_new_tokens: int, eos_ids: Iterable[int], stop_ids: Iterable[int],
                 ignore_eos: bool, context_len: int, prefill_tokens: int,
                 params: Params = GREEDY, prompt_logprobs: bool = False, stops=None):
        """`prompts`: Requests (or (index, tokens, max_new_tokens) tuples) in admission order;
        `prefill_tokens`: a pass's prompt-token budget: a prompt longer than what is left of it
        is prefilled in chunks that share passes with the decode rows, on any slot (a chunk
        attends its prefix where the slot's KV lives, tier 1 or tier 2), when it has one sample
        left and the job asks no prompt log-probabilities (those prompts go whole, alone in a
        pass when longer than the budget); `params`: the job's sampling settings; `stops`: a
        StopStrings watcher (needed when a request has stop strings)."""
        self._queue: Iterator = iter(prompts)
        self._peeked: Request | None = None
        self.params = params
        self.prompt_logprobs = prompt_logprobs
        self.stops = stops
        self.slots_of = slots_of  # micro-batch -> its slot ids
        self.active: dict[int, Sequence] = {}  # slot -> sequence
        self.max_new_tokens = max_new_tokens
        self.stop_ids = frozenset(stop_ids) | (frozenset() if ignore_eos else frozenset(eos_ids))
        self.context_len = context_len
        self.prefill_tokens = prefill_tokens
        self.draining = False  # set on SIGTERM/SIGUSR1: admit nothing more
        self.admitted = 0  # prompts whose every sample has been admitted
        self.admitted_samples = 0  # samples admitted (one slot each)
        # whether micro-batch mb takes new prompts now (the driver's TailGuard in hybrid layouts)
        self.admits: Callable[[int], bool] = lambda mb: True
        self._params_of: dict[int, Params] = {}  # slot -> its sequence's own sampling settings
        self._hits: set[int] = set()  # rows the stop-string watcher found done, not yet freed
        # Micro-batches whose prompts the prefill lane admits and prefills (`plan_lane`): their
        # own passes only decode. Empty: every micro-batch admits into its own passes.
        self.lane_mbs: list[int] = []
        self.lane_tokens = prefill_tokens  # the lane's prompt-token budget per pass
        self._lane_next = 0  # the lane fills its micro-batches' free slots in turn from here

    def _next_prompt(self) -> Request | None:
        if self._peeked is None:
            nxt = next(self._queue, None)
            if isinstance(nxt, tuple):
                nxt = Request(nxt[0], nxt[1], nxt[2])
            self._peeked = nxt
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
        free: list[int] = []
        lane = mb in self.lane_mbs
        for slot in self.slots_of[mb]:
            seq = self.active.get(slot)
            if seq is not None and seq.prefilling:  # the prefill lane's (`plan_lane`)
                continue
            if seq is not None and seq.pending:  # the next chunk of its prompt, budget allowing
                if budget > 0:
                    rows.append(self._chunk(slot, seq, min(seq.pending, budget)))
                    budget -= rows[-1].ntok
                continue
            if seq is not None:
                rows.append(Row(slot, seq.index, seq.length - 1,
                                np.asarray(seq.generated[-1:], dtype=np.int64), False, seq.sample,
                                self._params_of.get(slot, self.params)))
            else:
                free.append(slot)
        if lane or (free and not self.admits(mb)):
            return rows
        self._admit(free, budget, self.prefill_tokens, rows)
        return rows

    def plan_lane(self) -> list[Row]:
        """Rows of the prefill lane's next pass: the next chunks of the prompts it prefills in
        chunks, then admissions into the free slots of its micro-batches (`lane_mbs`, each in
        turn) while its budget lasts (`lane_tokens`). The lane's passes carry no decode rows, so
        the prompts' prefill never holds up a micro-batch's decoding; a sequence joins its
        micro-batch's passes once its first token is sampled."""
        if self.draining or not self.lane_mbs:
            return []
        rows: list[Row] = []
        budget = self.lane_tokens
        for mb in self.lane_mbs:
            for slot in self.slots_of[mb]:
                seq = self.active.get(slot)
                if seq is not None and seq.prefilling and seq.pending and budget > 0:
                    rows.append(self._chunk(slot, seq, min(seq.pending, budget)))
                    budget -= rows[-1].ntok
        n = len(self.lane_mbs)
        for i in range(n):
            if budget <= 0:
                break
            mb = self.lane_mbs[(self._lane_next + i) % n]
            if not self.admits(mb):
                continue
            free = [slot for slot in self.slots_of[mb] if slot not in self.active]
            if free:
                budget = self._admit(free, budget, self.lane_tokens, rows, prefilling=True)
        self._lane_next = (self._lane_next + 1) % n
        return rows

    def _admit(self, free: list[int], budget: int, full: int, rows: list[Row],
               prefilling: bool = False) -> int:
        """Admit queued prompts into the `free` slots (of one micro-batch) while `budget` (of a
        pass's `full` budget) lasts, their prefill rows appended to `rows`; returns the budget
        left (0 after a first chunk)."""
        while free and budget > 0:
            nxt = self._next_prompt()
            if nxt is None:
                break
            L = len(nxt.prompt)
            # Samples sharing a prefill (Row.copies) and prompt log-probabilities (computed over
            # a whole prompt's hidden states at the last slice) need the prompt in one pass.
            chunked = budget < L and len(nxt.samples) == 1 and not self.prompt_logprobs
            if budget < L and budget < full and not chunked:
                break
            take, rest = nxt.samples[:len(free)], nxt.samples[len(free):]
            self._peeked = replace(nxt, samples=rest) if rest else None
            slots, free = free[:len(take)], free[len(take):]
            params = nxt.params or self.params
            max_new = nxt.max_new or self.max_new_tokens
            row0 = nxt.index if nxt.row0 is None else nxt.row0
            for slot, sample in zip(slots, take):
                self.active[slot] = Sequence(nxt.index, nxt.prompt, max_new, sample=sample,
                                             row=row0 + sample, stop=nxt.stop,
                                             prefilling=prefilling)
                if params != self.params:
                    self._params_of[slot] = params
                else:
                    self._params_of.pop(slot, None)
            self.admitted += 1 if not rest else 0
            self.admitted_samples += len(take)
            if chunked:  # its first chunk now, the rest in the next passes
                seq = self.active[slots[0]]
                seq.pending = L
                rows.append(self._chunk(slots[0], seq, budget))
                return 0
            budget -= L
            rows.append(Row(slots[0], nxt.index, 0, np.asarray(nxt.prompt, dtype=np.int64), True,
                            take[0], params, tuple(zip(slots[1:], take[1:])),
                            self.prompt_logprobs and take[0] == 0))
        return budget

    def _chunk(self, slot: int, seq: Sequence, size: int) -> Row:
        """The next `size` (or fewer) prompt tokens of a sequence prefilled in chunks."""
        at = len(seq.prompt) - seq.pending
        size = min(size, seq.pending)
        seq.pending -= size
        return Row(slot, seq.index, at, np.asarray(seq.prompt[at:at + size], dtype=np.int64),
                   True, seq.sample, self._params_of.get(slot, self.params),
                   final=seq.pending == 0)

    def commit(self, rows: list[Row], sampled: "Draws | Iterable[int]") -> list[Finished]:
        """Append each draw's token (and log-probabilities); return the sequences that finished
        (slots freed)."""
        d = sampled if isinstance(sampled, Draws) else Draws(np.asarray(list(sampled)))
        done = []
        j = 0  # draw number
        plp = iter(d.prompt_logprobs)
        for row in rows:
            if not row.final:  # a prompt chunk with more to come: its draw means nothing
                j += len(row.draws)
                continue
            for slot, _ in row.draws:
                seq = self.active[slot]
                seq.prefilling = False  # its micro-batch decodes it from now on
                tok = int(d.tokens[j])
                seq.generated.append(tok)
                if d.logprobs is not None:
                    seq.logprobs.append(float(d.logprobs[j]))
                if d.top_ids is not None:
                    seq.top_ids.append(d.top_ids[j])
                    seq.top_logprobs.append(d.top_logprobs[j])
                if row.prompt_logprobs and slot == row.slot:
                    seq.prompt_logprobs = next(plp)
                j += 1
                if seq.stop:
                    self.stops.feed(seq.row, tok, seq.stop)
                if tok in self.stop_ids:
                    reason = FINISH_STOP
                elif len(seq.generated) >= seq.max_new or seq.length >= self.context_len:
                    reason = FINISH_LENGTH
                else:
                    continue
                del self.active[slot]
                if seq.stop:  # the watcher decides once it has read every token
                    self._hits.discard(seq.row)
                    self.stops.end(seq.row, seq, reason)
                else:
                    done.append(Finished.of(seq, reason))
        if self.stops is not None:
            self._hits |= self.stops.pop_hits()
        if self._hits:  # this pass's sequences whose text reached a stop string: free their slots
            for row in rows:  # (only theirs: another micro-batch's slots are out on the ring)
                for slot, _ in row.draws:
                    seq = self.active.get(slot)
                    if seq is not None and seq.row in self._hits:
                        self._hits.discard(seq.row)
                        del self.active[slot]
                        self.stops.end(seq.row, seq, FINISH_LENGTH)  # the watcher says why
        return done

    def drop_active(self) -> None:
        """Forget sequences still in flight (they are generated again when the job resumes)."""
        for seq in self.active.values():
            if seq.stop:
                self.stops.forget(seq.row)
        self.active.clear()
