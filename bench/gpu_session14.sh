#!/usr/bin/env bash
# Session 14 on the GPU machine (session 13's calls b, c and d, which found no machine, and a
# sweep of the micro-batch count at a 10 ms reply delay now that held replies leave on time).
#   a: the native MPI progress thread against the Python one (GHMPI_PROGRESS_NATIVE=0), the
#      issue's job at 64 new tokens, interleaved twice; then target 4: `bench pipeline` of the
#      issue's job (both capacities, the job traced); then a tier-2 rank's cost per message
#      beyond its kernel (bench/tier2_overhead.py, 2 threads, a rank's 18 rows at 576 and 8
#      positions), native progress thread and none
#   b: target 6: 1,024 prompts x 512 -> 32 at no delay, then at 10 ms with the automatic count
#      and with 2 and 4 micro-batches, traced
#   c: target 6 with the new automatic count (one more micro-batch per 5 ms of delay, after b):
#      the same job at 0, 10, 20, 5 and 2 ms
# Usage (repo root): OUT=dir bash bench/gpu_session14.sh a|b
. bench/steps.sh
TRACE_LINES="phase:|round trip|busy"
case ${1:-a} in
a)
  T=200 step native-ab $PY bench/ring_variants.py --new 64 "$W" "python;0;0;GHMPI_PROGRESS_NATIVE=0" \
    "native;0;0;" "python;0;0;GHMPI_PROGRESS_NATIVE=0" "native;0;0;"
  cut -c1-300 "$OUT/native-ab.txt" | grep -E "tokens/s|failed|progress"
  pipeline ring
  M="mpirun --allow-run-as-root --bind-to none -n 2 $PY bench/tier2_overhead.py --threads 2"
  T=60 step ovh-576 $M --context 576
  T=60 step ovh-8 $M --context 8 --messages 2000
  T=60 step ovh-576-none env GHMPI_PROGRESS_US=0 $M --context 576
  grep -h tier2_overhead "$OUT"/ovh-*.txt | cut -c1-250
  ;;
b)
  T=450 step latency $PY bench/ring_variants.py --prompts 1024 --new 32 "$W" "p1024-d0;0;0" \
    "p1024-d10;10;0;GHMPI_TRACE=/tmp/tr-d10" "p1024-d10-m2;10;2;GHMPI_TRACE=/tmp/tr-d10m2" \
    "p1024-d10-m4;10;4;GHMPI_TRACE=/tmp/tr-d10m4"
  cut -c1-300 "$OUT/latency.txt" | grep -E "tokens/s|failed"
  traces d10 d10m2 d10m4
  ;;
c)
  T=500 step delays $PY bench/ring_variants.py --prompts 1024 --new 32 "$W" "p1024-d0;0;0" \
    "p1024-d10;10;0" "p1024-d20;20;0" "p1024-d5;5;0" "p1024-d2;2;0"
  cut -c1-300 "$OUT/delays.txt" | grep -E "tokens/s|failed"
  ;;
esac
