"""Errors a user can act on.

Anything raised as a `GhmpiError` is reported as one line, ``ghmpi: error: <message>``, on stderr
by rank 0, and the job exits with status 2 (`EXIT_USAGE`). Every other exception is a bug or a
failure at run time: it names the rank and role and ends the whole job.
"""

import errno

EXIT_OK = 0
EXIT_FAILURE = 1  # a rank failed while running
EXIT_USAGE = 2  # bad input, caught before any work started
EXIT_STORAGE = 74  # the output's filesystem failed (full, quota, read-only, denied, I/O error);
#                   finished shards are valid, rerun to resume once it is fixed (EX_IOERR)
EXIT_INTERRUPTED = 75  # stopped by SIGTERM/SIGUSR1; finished work is saved, rerun to resume (EX_TEMPFAIL)
EXIT_STALLED = 76  # no token for runtime.stall_timeout seconds: a rank hangs; finished work is
#                   saved, the ranks waited on are named, rerun to resume


class StorageError(Exception):
    """Persisting or finalising completions failed on the filesystem (ENOSPC, EDQUOT, EROFS,
    EACCES, EIO, ...). Not bad input: work was done and what is persisted is valid. The message
    names the path and the cause; `job.run` adds how many completions are safe."""

    def __init__(self, path: str, error: OSError, doing: str) -> None:
        self.path, self.error, self.doing = path, error, doing
        cause = error.strerror or str(error)
        if error.errno is not None:
            cause += f" ({errno.errorcode.get(error.errno, error.errno)})"
        super().__init__(f"cannot {doing} {path}: {cause}")


class GhmpiError(Exception):
    """Bad input: config, files, token ids, rank count. The message says what and where."""


class ConfigError(GhmpiError):
    """A config key is unknown, mistyped or out of range."""


class ModelError(GhmpiError):
    """A model folder is missing, unsupported or damaged."""


class InputError(GhmpiError):
    """A prompts or completions file is missing, malformed or belongs to another job."""
