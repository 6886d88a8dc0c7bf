"""Timestamps of a rank's ring events, to find where a micro-batch waits (GHMPI_TRACE=dir).

Off unless GHMPI_TRACE names a folder; then `mark` records (seconds since the epoch, event,
micro-batch, layer, rows, tokens) in memory and `dump` writes <dir>/rank<N>.json when the rank ends.
Read them with `python bench/trace_summary.py dir`. Events: tier 1 `ship` / `shipped` (a layer's
messages out), `replied` (its replies all in), `sample`; tier 2 `got` (a message received: rows =
microseconds the receive took, tokens = its bytes), `recv` (decoded), `served` (its reply sent or
held); every rank `gc` (a pause of Python's garbage collector: layer = its generation, rows =
microseconds).
"""

from __future__ import annotations

import gc
import json
import os
import time

_FOLDER = os.environ.get("GHMPI_TRACE")
_events: list[tuple[float, str, int, int, int, int]] = []


def mark(event: str, mb: int = -1, layer: int = -1, rows: int = 0, tokens: int = 0) -> None:
    if _FOLDER:
        _events.append((time.time(), event, mb, layer, rows, tokens))


_gc_start = [0.0]


def _gc_pause(phase: str, info: dict) -> None:
    if phase == "start":
        _gc_start[0] = time.perf_counter()
    else:
        mark("gc", layer=info.get("generation", -1),
             rows=int(1e6 * (time.perf_counter() - _gc_start[0])))


if _FOLDER:
    gc.callbacks.append(_gc_pause)


def dump(rank: int) -> None:
    if _FOLDER:
        os.makedirs(_FOLDER, exist_ok=True)
        with open(os.path.join(_FOLDER, f"rank{rank}.json"), "w") as f:
            json.dump(_events, f)
