"""Per-prompt settings: the optional (N,) datasets of a prompts file beside the token ids.

Each one holds, for every prompt, either a value or the dataset's *sentinel*, meaning "use the
job's setting" (generation.<name> in the config), so a file may set them for some prompts only:

| dataset          | dtype   | sentinel ("use the job's value") | valid values                   |
|------------------|---------|----------------------------------|--------------------------------|
| `max_new_tokens` | int32   | 0                                | >= 1                           |
| `temperature`    | float32 | NaN                              | >= 0 (0 = greedy)              |
| `top_p`          | float32 | NaN                              | (0, 1]                         |
| `top_k`          | int32   | -1                               | >= 0 (0 = off)                 |
| `seed`           | int64   | -1                               | >= 0                           |
| `n`              | int32   | 0                                | 1 .. 65536 (samples)           |
| `logprobs`       | int32   | -1 (not asked)                   | 0 .. 20: chosen + k top        |
| `stop`           | string  | "" (the job's generation.stop)   | JSON list of non-empty strings |
| `custom_id`      | string  | ""                               | any (kept for `export`)        |

`logprobs` records what an OpenAI batch request asked (`logprobs`, `top_logprobs`); the job
computes log-probabilities when generation.logprobs > 0 or any prompt asks, with the widest k.
`custom_id` and `chat` (uint8, 1 = a chat request) only serve `export --format openai`.
Plain data: no torch, no MPI.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["NUMERIC", "STRINGS", "SENTINEL", "Settings", "check_values", "parse_stop",
           "MAX_N", "MAX_TOP_LOGPROBS"]

MAX_N = 1 << 16  # samples per prompt
MAX_TOP_LOGPROBS = 20  # as the OpenAI API

# name -> numpy dtype of the numeric per-prompt datasets, in file order
NUMERIC: dict[str, np.dtype] = {
    "max_new_tokens": np.dtype(np.int32), "temperature": np.dtype(np.float32),
    "top_p": np.dtype(np.float32), "top_k": np.dtype(np.int32), "seed": np.dtype(np.int64),
    "n": np.dtype(np.int32), "logprobs": np.dtype(np.int32), "chat": np.dtype(np.uint8),
}
STRINGS = ("stop", "custom_id")
SENTINEL: dict[str, Any] = {"max_new_tokens": 0, "temperature": math.nan, "top_p": math.nan,
                            "top_k": -1, "seed": -1, "n": 0, "logprobs": -1, "chat": 0,
                            "stop": "", "custom_id": ""}
_RULE = {"max_new_tokens": "an integer >= 1 (0: the job's value)",
         "temperature": "a number >= 0 (NaN: the job's value)",
         "top_p": "a number in (0, 1] (NaN: the job's value)",
         "top_k": "an integer >= 0 (-1: the job's value)",
         "seed": "an integer >= 0 (-1: the job's value)",
         "n": f"an integer in [1, {MAX_N}] (0: the job's value)",
         "logprobs": f"an integer in [0, {MAX_TOP_LOGPROBS}] (-1: not asked)",
         "chat": "0 or 1"}


def check_values(name: str, values: np.ndarray) -> tuple[int, str]:
    """(index of the first bad value or len(values), the rule it breaks) for a block of a numeric
    per-prompt dataset."""
    v = values
    if name == "max_new_tokens":
        bad = (v < 0) | (v > np.iinfo(np.int32).max)
    elif name == "temperature":
        bad = ~np.isnan(v) & ~((v >= 0) & np.isfinite(v))
    elif name == "top_p":
        bad = ~np.isnan(v) & ~((v > 0) & (v <= 1))
    elif name in ("top_k", "seed"):
        bad = v < -1
    elif name == "n":
        bad = (v < 0) | (v > MAX_N)
    elif name == "logprobs":
        bad = (v < -1) | (v > MAX_TOP_LOGPROBS)
    else:  # chat
        bad = (v != 0) & (v != 1)
    hits = np.flatnonzero(bad)
    return (int(hits[0]) if hits.size else len(v)), _RULE[name]


def parse_stop(text: str | bytes) -> tuple[str, ...] | None:
    """A `stop` cell: None for "" (the job's value), else the tuple of strings it lists.
    ValueError when it is not a JSON list of non-empty strings."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    if text == "":
        return None
    value = json.loads(text)
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise ValueError("must be a JSON list of non-empty strings")
    return tuple(value)


@dataclass(frozen=True, slots=True)
class Settings:
    """One prompt's own settings as read from the file; None = the job's value."""

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    n: int | None = None
    logprobs: int | None = None  # k asked by an OpenAI request (None: not asked)
    stop: tuple[str, ...] | None = None

    @staticmethod
    def from_cells(cells: dict[str, Any]) -> "Settings":
        """From one prompt's raw cells (dataset name -> value), sentinels -> None."""
        out: dict[str, Any] = {}
        for name, value in cells.items():
            if name in ("chat", "custom_id"):
                continue
            if name == "stop":
                out[name] = parse_stop(value)
            elif name in ("temperature", "top_p"):
                out[name] = None if math.isnan(float(value)) else float(value)
            else:
                out[name] = None if int(value) == SENTINEL[name] else int(value)
        return Settings(**out)
