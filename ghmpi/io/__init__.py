"""Batch-job I/O: the prompts file, the crash-safe completions store, and `prepare` / `export`.

Imports only numpy and h5py; transformers (for tokenizers) is loaded by `prepare`/`export` alone.
"""

from ghmpi.io.completions import (FINISH_LENGTH, FINISH_STOP, FINISH_STOP_STRING, CompletionFile,
                                  CompletionStore, read_completions)
from ghmpi.io.prompts import PromptFile, PromptStats, PromptWriter, write_prompts

__all__ = [
    "FINISH_LENGTH",
    "FINISH_STOP",
    "FINISH_STOP_STRING",
    "CompletionFile",
    "CompletionStore",
    "PromptFile",
    "PromptStats",
    "PromptWriter",
    "read_completions",
    "write_prompts",
]
