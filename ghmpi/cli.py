"""Command line: `python -m ghmpi [run] [-c CONFIG.yaml] [--set KEY=VALUE ...]`, `prepare`, `export`.

Under mpirun every rank runs `main()`. Every rank loads the config itself, so a bad file makes every
rank exit 2 and none is left waiting; only world rank 0 prints. The rank is read from the launcher's
environment, so the error path (and `--help`) never imports mpi4py or torch: the MPI job is
imported only once the config is known to be good.
"""

import argparse
import importlib
import os
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import NoReturn, Sequence

import ghmpi
from ghmpi import signals
from ghmpi.config import SECTIONS, config_to_yaml, load_config
from ghmpi.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, GhmpiError

DEFAULT_JOB = Path("jobs") / "default.yaml"
RANK_ENV_VARS = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID")
SIZE_ENV_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS")
COMMANDS = ("run", "prepare", "export", "bench")


def world_rank() -> int:
    """This process's world rank as the launcher announced it (Open MPI, PMIx, MPICH, Slurm); 0 alone."""
    for name in RANK_ENV_VARS:
        value = os.environ.get(name)
        if value is not None:
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def world_size() -> int:
    """The world size the launcher announced; 1 when started without one."""
    for name in SIZE_ENV_VARS:
        value = os.environ.get(name)
        if value is not None and value.isdigit():
            return int(value)
    return 1


def default_config_path() -> Path:
    """jobs/default.yaml of the checkout ghmpi was imported from, else of the current directory."""
    in_checkout = Path(ghmpi.__file__).resolve().parent.parent / DEFAULT_JOB
    return in_checkout if in_checkout.is_file() else DEFAULT_JOB


def report_error(message: str) -> None:
    """`ghmpi: error: <message>` as one line on stderr, from world rank 0 only."""
    if world_rank() == 0:
        one_line = " ".join(str(message).split())
        print(f"ghmpi: error: {one_line}", file=sys.stderr, flush=True)


def _keys_epilog() -> str:
    keys = "\n".join(
        f"  {section}: {', '.join(f.name for f in fields(cls))}" for section, cls in SECTIONS.items())
    return (
        "config keys (--set SECTION.KEY=VALUE; `python -m ghmpi.config` prints the reference):\n"
        f"{keys}\n\n"
        "examples:\n"
        "  python -m ghmpi                                  # jobs/default.yaml, one rank\n"
        "  mpirun -n 5 python -m ghmpi -c jobs/example-cluster.yaml\n"
        "  python -m ghmpi --set generation.max_new_tokens=32 --set model.dtype=float32\n"
        "  python -m ghmpi run -c job.yaml --print-config   # check a job file, run nothing")


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c", "--config", metavar="CONFIG.yaml", default=None,
        help=f"job file (default: {DEFAULT_JOB}, looked up in the ghmpi checkout, "
             "then in the current directory)")
    parser.add_argument(
        "--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
        help="override one config key, e.g. generation.max_new_tokens=32 (repeatable; the value "
             "is YAML: --set generation.stop_token_ids=[2,3])")
    parser.add_argument(
        "--print-config", action="store_true",
        help="print the resolved config as YAML and exit without running")


def _register_io(subparsers: "argparse._SubParsersAction") -> None:
    try:
        text = importlib.import_module("ghmpi.io.text")
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("ghmpi.io"):
            raise  # a missing dependency (h5py, ...) is loud
        return  # prepare/export (or the io modules they need) not written yet: `run` still works
    text.register(subparsers)


class _Parser(argparse.ArgumentParser):
    """Usage errors exit 2 on every rank, but only rank 0 prints them (subcommands inherit this)."""

    def error(self, message: str) -> NoReturn:
        if world_rank() == 0:
            self.print_usage(sys.stderr)
            self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")
        self.exit(EXIT_USAGE)


def build_parser(with_io: bool = True) -> argparse.ArgumentParser:
    """The whole command line; with_io=False leaves out prepare/export (and their h5py import)."""
    parser = _Parser(
        prog="ghmpi",
        description="Offline LLM batch inference as an MPI job: the GPU ranks (tier 1) run the "
                    "weights, the CPU ranks (tier 2) hold the KV cache and run attention. "
                    "With no command, `run` is assumed.",
        epilog="exit status: 0 done; 1 a rank failed; 2 bad input (one `ghmpi: error:` line) or "
               "the output in use by another job; 74 the output's filesystem failed (full, quota, "
               "read-only); 75 interrupted; 76 stalled (no token for runtime.stall_timeout s); "
               "after 74, 75 and 76 finished work is saved: rerun to resume",
    )
    parser.add_argument("--version", action="version", version=f"ghmpi {ghmpi.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = subparsers.add_parser(
        "run", help="run a batch job (the default command; start it under mpirun or srun)",
        description="Run a batch job: generate completions for every prompt of io.prompts into\n"
                    "io.output. Start it under mpirun or srun: world ranks 0..topology.slices-1\n"
                    "are tier 1 (GPU), the others tier 2 (CPU); one rank alone is the single-tier\n"
                    "baseline. A job that was killed resumes where it stopped when run again.",
        epilog=_keys_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_run_arguments(run)
    run.set_defaults(func=run_command)
    if with_io:
        _register_io(subparsers)
        importlib.import_module("ghmpi.bench").register(subparsers)
    return parser


def run_command(args: argparse.Namespace) -> int:
    """Check the config, then hand over to the MPI job.

    Alone, the config is checked before mpi4py and torch are imported (a quick error). In a world
    of several ranks only rank 0 reads it, inside the job, and the others learn the verdict from
    rank 0: were every rank to fail on its own, the launcher could kill rank 0 on the first
    rank's exit before rank 0 had printed why."""
    signals.install()  # before the heavy imports: a stop request during start-up is kept
    config_path = Path(args.config) if args.config is not None else default_config_path()
    if args.print_config:
        config = load_config(config_path, args.overrides)
        if world_rank() == 0:
            sys.stdout.write(config_to_yaml(config))
        return EXIT_OK
    if world_size() <= 1:
        config = load_config(config_path, args.overrides)  # ConfigError -> exit 2, no MPI needed
        loader = lambda: config  # noqa: E731
    else:
        loader = lambda: load_config(config_path, args.overrides)  # noqa: E731  (rank 0 only)
    job = importlib.import_module("ghmpi.runtime.job")  # imports mpi4py and torch: only now
    return job.run(loader, config_path)


def _with_default_command(argv: list[str]) -> list[str]:
    """`ghmpi`, `ghmpi -c x.yaml`, `ghmpi --set ...` mean `ghmpi run ...`."""
    if not argv:
        return ["run"]
    first = argv[0]
    if first in COMMANDS or first in ("-h", "--help", "--version"):
        return argv
    if first.startswith("-"):
        return ["run", *argv]
    return argv  # an unknown command: let argparse name it


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m ghmpi` and the `ghmpi` script; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    args_list = _with_default_command(args_list)
    # `run` needs nothing of prepare/export: every rank of a job is spared importing them.
    parser = build_parser(with_io=args_list[0] != "run")
    try:
        args = parser.parse_args(args_list)  # usage errors: SystemExit(2)
    except SystemExit as exc:
        if exc.code and world_rank() != 0:
            time.sleep(3)  # let rank 0 print the usage error before the launcher ends the job
        raise
    try:
        return int(args.func(args))
    except GhmpiError as exc:
        report_error(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        if world_rank() == 0:
            print("ghmpi: interrupted; finished work is saved, rerun to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `ghmpi export ... | head`: not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
