#!/usr/bin/env bash
# Session 12 on the GPU machine.
#   a: float32 exactness on CUDA after session 11's last refactor (bench/gpu_check.sh: -n 9 with
#      the lane, 16-token lane passes, hybrid), then `bench pipeline` of the issue's job with the
#      progress thread at its new default of 25 us (both capacities; the job traced: target 4's
#      ratio), then target 6: 1,024 prompts x 512 -> 32 at no reply delay and at 10 ms
# Usage (repo root): OUT=dir bash bench/gpu_session12.sh a
. bench/steps.sh
case ${1:-a} in
a)
  T=200 step check env OUT=/tmp/check RUNS="cpu-n1-float32 cuda-n9-float32 cuda-n9-float32-l16
    cuda-n9-float32-g8" bash bench/gpu_check.sh
  grep -E "rc=|equal" "$OUT/check.txt" | cut -c1-160
  pipeline lane
  T=330 step latency $PY bench/ring_variants.py --prompts 1024 --new 32 "$W" "p1024-d0;0;0" \
    "p1024-d10;10;0"
  cut -c1-300 "$OUT/latency.txt" | grep -E "tokens/s|failed"
  ;;
esac
