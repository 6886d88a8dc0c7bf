"""Errors a user can act on.

Anything raised as a `GhmpiError` is reported as one line, ``ghmpi: error: <message>``, on stderr
by rank 0, and the job exits with status 2 (`EXIT_USAGE`). Every other exception is a bug or a
failure at run time: it names the rank and role and ends the whole job.
"""

EXIT_OK = 0
EXIT_FAILURE = 1  # a rank failed while running
EXIT_USAGE = 2  # bad input, caught before any work started
EXIT_INTERRUPTED = 75  # stopped by SIGTERM/SIGUSR1; finished work is saved, rerun to resume (EX_TEMPFAIL)


class GhmpiError(Exception):
    """Bad input: config, files, token ids, rank count. The message says what and where."""


class ConfigError(GhmpiError):
    """A config key is unknown, mistyped or out of range."""


class ModelError(GhmpiError):
    """A model folder is missing, unsupported or damaged."""


class InputError(GhmpiError):
    """A prompts or completions file is missing, malformed or belongs to another job."""
