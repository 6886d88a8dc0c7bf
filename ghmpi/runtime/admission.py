"""What slice 0's scheduler admits: the prompts file's prompts as `Request`s, each with its own
settings resolved against the job's, and with only the samples not done by an earlier run.

Completion rows are prompt-major: prompt i's samples are rows row0[i] .. row0[i] + n[i] - 1,
with n[i] the prompt's own `n` (or generation.n) and row0 the running sum. Plain data.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from ghmpi.io.prompts import PromptFile
from ghmpi.runtime.scheduler import Params, Request

__all__ = ["samples_per_prompt", "row_starts", "requests", "job_params"]


def samples_per_prompt(pf: PromptFile, job_n: int, chunk: int = 1 << 20) -> np.ndarray:
    """(N,) int64: each prompt's number of samples."""
    out = np.full(pf.n, job_n, dtype=np.int64)
    if "n" in pf.settings_names:
        for a in range(0, pf.n, chunk):
            col = pf.column("n", a, min(a + chunk, pf.n)).astype(np.int64)
            out[a:a + col.size] = np.where(col == 0, job_n, col)
    return out


def row_starts(n: np.ndarray) -> np.ndarray:
    """(N,) int64: the first completion row of each prompt."""
    return np.concatenate([[0], np.cumsum(n)[:-1]]).astype(np.int64) if n.size else n


def job_params(g: Any) -> Params:
    """The job's sampling settings (`g`: the config's generation section)."""
    return Params(g.temperature, g.top_k, g.top_p, g.seed)


def requests(pf: PromptFile, done: np.ndarray, g: Any, n: np.ndarray | None = None
             ) -> Iterator[Request]:
    """The prompts still to generate, in order, as Requests; `done` (rows,) bool marks the
    completion rows an earlier run persisted; `g` the config's generation section."""
    n = samples_per_prompt(pf, g.n) if n is None else n
    row0 = row_starts(n)
    whole = np.add.reduceat(done.astype(np.int64), row0) == n if n.size else np.zeros(0, bool)
    base = job_params(g)
    for i, tokens, s in pf.iter_requests(skip=whole):
        samples = tuple(k for k in range(int(n[i])) if not done[row0[i] + k])
        params = Params(g.temperature if s.temperature is None else s.temperature,
                        g.top_k if s.top_k is None else s.top_k,
                        g.top_p if s.top_p is None else s.top_p,
                        g.seed if s.seed is None else s.seed)
        yield Request(i, tokens, s.max_new_tokens, None if params == base else params, samples,
                      int(row0[i]), g.stop if s.stop is None else s.stop)
