#!/usr/bin/env bash
# Session 15 on the GPU machine.
#   a: target 4 on this host with the code as session 14 left it (`bench pipeline` of the issue's
#      job, traced), then target 6 with 256 prompts (256 x 512 -> 32): no delay, 10 ms with the
#      automatic count (4 a slice since session 14), with session 13's 10 and with 2
#   b: the lean decode message on tier 2 against the code before it (build/old: `git archive
#      110866b ghmpi jobs`, carried, run outside the checkout so that PYTHONPATH decides),
#      interleaved; then bench/tier2_overhead.py with each; then target 4 with the new code
# Usage (repo root): OUT=dir bash bench/gpu_session15.sh a|b
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
  T=420 step lean-ab $PY bench/ring_variants.py --new 64 "$W" \
    "old;0;0;PYTHONPATH=$R/build/old" "new;0;0;PYTHONPATH=$R" \
    "old;0;0;PYTHONPATH=$R/build/old" "new;0;0;PYTHONPATH=$R"
  cut -c1-300 "$OUT/lean-ab.txt" | grep -E "tokens/s|failed"
  M="mpirun --allow-run-as-root --bind-to none -n 2 $PY $R/bench/tier2_overhead.py --threads 2"
  for v in old new; do pp=$R; [ $v = old ] && pp=$R/build/old
    (cd /tmp && PYTHONPATH=$pp T=60 OUT=$OUT step ovh-576-$v $M --context 576)
    (cd /tmp && PYTHONPATH=$pp T=60 OUT=$OUT step ovh-8-$v $M --context 8 --messages 2000)
  done
  grep -h tier2_overhead "$OUT"/ovh-*.txt | cut -c1-250
  ;;
esac
