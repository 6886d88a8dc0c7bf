"""`python -m ghmpi bench SUITE [--json]`: measurements set against a reference taken in the same run.

Every suite reports ratios: a figure over the hardware limit (DRAM or HBM bandwidth, GEMM peak)
or over a baseline (transformers, the single tier) that the same command measured. Absolute times
hold only for the machine they ran on. Each suite is a module `ghmpi.bench.<name>` with
`add_arguments(parser)` and `run(args) -> dict`; the dict is printed as a table (or as JSON with
`--json`). The suites also run on a CPU at tiny sizes, which is how CI checks them (for
correctness, never for speed).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any

SUITES = {
    "attention": "tier-2 decode attention: KV bytes read per second over the DRAM read bandwidth",
    "decode": "tier-1 decode step over the HBM roofline (weights + KV bytes / copy bandwidth)",
    "prefill": "tier-1 prefill tokens/s over the bf16 GEMM peak measured in the same run",
    "pipeline": "tier-1 and tier-2 capacities and the ring's throughput against them",
    "job": "the whole job (mpirun ... python -m ghmpi) vs transformers generate, same run",
}


def register(subparsers: "argparse._SubParsersAction") -> None:
    """Add `bench SUITE [options]` to the ghmpi command line. A suite's own options are parsed
    only when it runs, so `ghmpi --help` imports no suite (nor torch)."""
    b = subparsers.add_parser("bench", help="measure a component against its hardware limit",
                              description=__doc__)
    b.add_argument("suite", choices=list(SUITES), metavar="SUITE",
                   help="; ".join(f"{k}: {v}" for k, v in SUITES.items()))
    b.add_argument("options", nargs=argparse.REMAINDER,
                   help="the suite's options (`ghmpi bench SUITE --help`)")
    b.set_defaults(func=_run_suite)


def suite_parser(name: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"ghmpi bench {name}", description=SUITES[name])
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("-o", "--output", default=None, metavar="FILE",
                   help="also write the JSON result to FILE")
    importlib.import_module(f"ghmpi.bench.{name}").add_arguments(p)
    return p


def _run_suite(ns: argparse.Namespace) -> int:
    args = suite_parser(ns.suite).parse_args(ns.options)
    result = importlib.import_module(f"ghmpi.bench.{ns.suite}").run(args)
    text = json.dumps(result, indent=1, default=float)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    if args.json:
        print(text)
    else:
        print(format_table(result))
    return 0


def format_table(result: dict[str, Any]) -> str:
    """Scalars as `key: value` lines, then each list of dicts (`rows`, ...) as a markdown table."""
    lines = []
    tables = {k: v for k, v in result.items() if isinstance(v, list) and v and isinstance(v[0], dict)}
    for k, v in result.items():
        if k not in tables:
            lines.append(f"{k}: {_fmt(v)}")
    for name, rows in tables.items():
        cols = list(dict.fromkeys(c for r in rows for c in r))
        lines += ["", f"{name}:", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.0f}"
    return str(v)


def log(message: str) -> None:
    """Progress for people: on stderr, so --json output stays clean."""
    print(f"ghmpi bench: {message}", file=sys.stderr, flush=True)
