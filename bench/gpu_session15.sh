#!/usr/bin/env bash
# Session 15 on the GPU machine.
#   a: target 4 on this host with the code as session 14 left it (`bench pipeline` of the issue's
#      job, traced), then target 6 with 256 prompts (256 x 512 -> 32): no delay, 10 ms with the
#      automatic count (4 a slice since session 14), with session 13's 10 and with 2
#   b: tier 2 receiving ahead (the native progress thread takes the next message off the wire as
#      its envelope arrives, `transport.NativeInbox`) against the code before it (build/old:
#      `git archive 110866b ghmpi jobs`, carried; each job's ranks start outside the checkout, so
#      PYTHONPATH decides), the job at 64 new tokens, interleaved twice; then target 4 with
#      the new code (`bench pipeline`, traced)
#   c: this session's two changes together (tier-2 slots dealt by each rank's measured attention
#      rate, GHMPI_TIER2_SHARES=measured, opt-in; receiving ahead, the default) against the code's
#      behaviour before them (GHMPI_TIER2_SHARES=threads GHMPI_RECEIVE_AHEAD=0), the job
#      at 64 new tokens, traced, interleaved twice. Not run in session 15 (no machine started);
#      the next session's first call
# Usage (repo root): OUT=dir bash bench/gpu_session15.sh a|b|c
. bench/steps.sh
TRACE_LINES="phase:|round trip|busy"
case ${1:-a} in
a)
  pipeline ring
  T=330 step latency256 $PY bench/ring_variants.py --prompts 256 --new 32 "$W" "p256-d0;0;0" \
    "p256-d10;10;0" "p256-d10-m10;10;10" "p256-d10-m2;10;2"
  cut -c1-300 "$OUT/latency256.txt" | grep -E "tokens/s|failed"
  ;;
b)
  R=$PWD
  T=330 step ahead-ab $PY bench/ring_variants.py --new 64 "$W" \
    "old;0;0;PYTHONPATH=$R/build/old" "ahead;0;0;PYTHONPATH=$R" \
    "old;0;0;PYTHONPATH=$R/build/old" "ahead;0;0;PYTHONPATH=$R"
  cut -c1-300 "$OUT/ahead-ab.txt" | grep -E "tokens/s|failed"
  pipeline ring
  grep -o "MPI progress: [^']*" "$OUT/pipeline.txt" | head -1
  ;;
c)
  traced_jobs shares "before:t0:GHMPI_TIER2_SHARES=threads GHMPI_RECEIVE_AHEAD=0" \
    "after:m:GHMPI_TIER2_SHARES=measured" "before:t0b:GHMPI_TIER2_SHARES=threads GHMPI_RECEIVE_AHEAD=0" \
    "after:mb:GHMPI_TIER2_SHARES=measured"
  ;;
esac
