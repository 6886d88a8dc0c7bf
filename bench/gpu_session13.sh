#!/usr/bin/env bash
# Session 13 on the GPU machine.
#   a: the MPI progress thread's cost to tier 2's kernel on the Xeon (bench/progress_cost.py: a
#      rank's 2 threads pinned to 2 CPUs, and 16 threads on 16), then the job (256 x 512
#      -> 128, -n 9) with tier 2's progress thread probing all the time (GHMPI_PROGRESS_ALWAYS=1,
#      as before this session) and on demand (the new default), and on demand with 4x longer
#      windows, interleaved, traced (each job's decode phase). Ran the code of 83a12e0; the
#      on-demand thread lost and was reverted, so `demand` and `wide` now run as `always` does
#   b: target 6 with tier 2's held replies sent on time by its progress thread (before, a reply
#      due while the rank was in its kernel left only after that message): 1,024 prompts x 512
#      -> 32 at no delay and at 10 ms (automatic count), traced
#   c: target 4: `bench pipeline` of the issue's job (both capacities, the job traced)
#   d: the native MPI progress thread against the Python one (GHMPI_PROGRESS_NATIVE=0):
#      bench/progress_cost.py on 2 pinned threads, then the job at 64 new tokens (to fit
#      the device time left), interleaved twice
# b, c and d did not run in session 13: no machine could be started in five tries, then too
# little device time was left to start one. Session 14 ran them (bench/gpu_session14.sh).
# Usage (repo root): OUT=dir bash bench/gpu_session13.sh a|b|c|d
. bench/steps.sh
TRACE_LINES="phase:|round trip|busy"
case ${1:-a} in
a)
  T=60 step cost2 $PY bench/progress_cost.py --threads 2 --rounds 5
  T=60 step cost16 $PY bench/progress_cost.py --threads 16 --rows 144 --rounds 3
  cat "$OUT/cost2.txt" "$OUT/cost16.txt" | cut -c1-200
  T=500 variants prog-ab "always;0;0;GHMPI_PROGRESS_ALWAYS=1 GHMPI_TRACE=/tmp/tr-al1" \
    "demand;0;0;GHMPI_TRACE=/tmp/tr-de1" \
    "wide;0;0;GHMPI_PROGRESS_BASE_US=400 GHMPI_PROGRESS_GBPS=0.25 GHMPI_TRACE=/tmp/tr-wi1" \
    "always;0;0;GHMPI_PROGRESS_ALWAYS=1 GHMPI_TRACE=/tmp/tr-al2" \
    "demand;0;0;GHMPI_TRACE=/tmp/tr-de2"
  ;;
b)
  T=330 step latency $PY bench/ring_variants.py --prompts 1024 --new 32 "$W" "p1024-d0;0;0" \
    "p1024-d10;10;0;GHMPI_TRACE=/tmp/tr-d10" "p1024-d10-m2;10;2;GHMPI_TRACE=/tmp/tr-d10m2"
  cut -c1-300 "$OUT/latency.txt" | grep -E "tokens/s|failed"
  traces d10 d10m2
  ;;
c)
  pipeline ring
  ;;
d)
  T=40 step cost2 $PY bench/progress_cost.py --threads 2 --rounds 3 --calls 60
  cut -c1-200 "$OUT/cost2.txt"
  T=200 step native-ab $PY bench/ring_variants.py --new 64 "$W" "python;0;0;GHMPI_PROGRESS_NATIVE=0" \
    "native;0;0;" "python;0;0;GHMPI_PROGRESS_NATIVE=0" "native;0;0;"
  cut -c1-300 "$OUT/native-ab.txt" | grep -E "tokens/s|failed"
  ;;
esac
