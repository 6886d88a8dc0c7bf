"""The -n 9 job (8B shape, 256 prompts x 512 -> 64 unless told) under several settings, one line each.

Usage: python bench/ring_variants.py [--prompts N] [--new N] [--ranks N] WORKDIR
           'NAME;DELAY_MS;MICRO_BATCHES;KEY=VAL ...' ...
(MICRO_BATCHES 0: automatic; KEY=VAL: a config key (section.key, e.g.
topology.prefill_tokens=16384) or a variable for mpirun (e.g. an Open MPI MCA parameter, or
GHMPI_TRACE=dir))."""

from __future__ import annotations

import argparse
from pathlib import Path

from ghmpi.bench.job import make_inputs, run_ghmpi


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--ranks", type=int, default=9, help="mpirun -n (1: the single tier)")
    ap.add_argument("workdir")
    ap.add_argument("variants", nargs="+")
    args = ap.parse_args()
    work = Path(args.workdir)
    model_dir, prompts, _ = make_inputs(work, "llama3-8b", None, args.prompts, 512)
    for spec in args.variants:
        name, delay, mbs, *env = spec.split(";")
        sets = [f"runtime.reply_delay_ms={delay}"]
        if int(mbs):
            sets.append(f"topology.micro_batches={mbs}")
        pairs = [kv.split("=", 1) for kv in " ".join(env).split() if "=" in kv]
        sets += [f"{k}={v}" for k, v in pairs if "." in k]
        env = {k: v for k, v in pairs if "." not in k}
        try:
            job = run_ghmpi(model_dir, prompts, work / "variant.h5", args.ranks, args.new,
                            "bfloat16", sets, env=env)
            print(f"{name}: {job['generate_tokens_per_s']:.0f} tokens/s |",
                  " | ".join(l for l in job["summary"]
                             if "busy" in l or "micro-batches x" in l or "measured at" in l),
                  flush=True)
        except (Exception, SystemExit) as e:  # a setting the launcher refuses: say so, go on
            print(f"{name}: failed: {str(e)[-400:]}", flush=True)


if __name__ == "__main__":
    main()
