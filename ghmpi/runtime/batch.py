"""The batch features of a job, decided once on rank 0: how many completions (prompts x samples),
whether log-probabilities are stored and how many top ones, whether stop strings are watched.
Also the glue from a finished sequence to the completion store's optional datasets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ghmpi.errors import ConfigError
from ghmpi.io.prompts import PromptFile, PromptStats

__all__ = ["BatchFeatures", "batch_features", "extras_of", "stop_watcher"]


@dataclass(frozen=True)
class BatchFeatures:
    n_rows: int  # completions of the job
    logprobs: int | None  # top-k stored per token (0: the chosen token's only); None: off
    stops: bool  # some prompt ends on stop strings


def batch_features(cfg: Any, args: Any, stats: PromptStats) -> BatchFeatures:
    """Raise ConfigError for settings the model or the files cannot serve."""
    g = cfg.generation
    asked = stats.max_logprobs  # -1: no prompt asked
    k = max(g.logprobs, asked) if (g.logprobs > 0 or asked >= 0) else None
    if k is not None and k > args.vocab_size:
        raise ConfigError(f"generation.logprobs is {k} but the model's vocabulary has only "
                          f"{args.vocab_size} tokens")
    stops = bool(g.stop) or stats.has_stop
    if stops:
        from ghmpi.io.text import load_tokenizer  # ModelError (a GhmpiError) when it has none
        try:
            load_tokenizer(cfg.model.path)
        except Exception as e:
            raise ConfigError(f"stop strings need the model's tokenizer: {e}") from None
    return BatchFeatures(stats.n_rows(g.n), k, stops)


def stop_watcher(cfg: Any, stops: bool):
    """A StopStrings thread with the model's tokenizer when the job has stop strings, else None."""
    if not stops:
        return None
    from ghmpi.io.text import load_tokenizer
    from ghmpi.runtime.stopstrings import StopStrings

    return StopStrings(load_tokenizer(cfg.model.path), keep=cfg.generation.include_stop_str)


def extras_of(f: Any) -> dict | None:
    """A Finished record's optional datasets for the store, or None."""
    if f.logprobs is None and f.prompt_logprobs is None:
        return None
    return {"logprobs": f.logprobs, "top_logprob_ids": f.top_ids,
            "top_logprobs": f.top_logprobs, "prompt_logprobs": f.prompt_logprobs}
