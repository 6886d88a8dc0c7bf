#!/usr/bin/env bash
# Session 8 on the GPU machine: the job (256 prompts x 512 -> 128, -n 9) again, with the
# raw traces brought back so the ring's timeline can be read event by event off the machine.
#   a: `bench pipeline` (the job against both capacities); the job traced as is and with idle ranks
#      spinning instead of sleeping (GHMPI_IDLE_SLEEP_US=0: a knob of that call, no gain, since
#      removed), raw traces tarred into $OUT; untraced:
#      a 16k-token prefill budget, CMA without the progress thread; the single tier (-n 1) with the
#      default and a 16k-token prefill budget
#   b: the job with tier 2 receiving its next message while it serves one (transport.Inbox) against
#      the code before (`a4b1935`, unpacked into the ignored folder .ab/old and carried), then
#      `bench pipeline` with CMA single copy at -n 2, 5 and 9: one fat tier-2 rank against several
#      thin ones, each against its own layout's capacities
#   c: a tier-2 rank's cost per message beyond its kernel (bench/tier2_overhead.py, 18 and 3 rows
#      of 576 positions, 2 threads): the code before this session (.ab/old, `a4b1935`), with the
#      k/v append in the kernel's call (.ab/head, `e5382e8`), and `5a7bc62` (tier 2's attention on
#      a kernel thread of its own: it halved the job, 385 tokens/s, and was reverted); then
#      `bench pipeline` at 0 and 10 ms (the 10 ms run cut by the time limit), float32 exactness
#      on CUDA, and the job traced (raw traces tarred into $OUT)
#   d: (not run: no device time was left) tier2_overhead in rounds, the code before this session
#      (.ab/old: `git archive a4b1935 ghmpi | tar x -C .ab/old`, carried) against now, 18 and 3
#      rows; then `bench pipeline` at 0 and 10 ms with each job's phases (decode_of_bound)
# Usage (repo root): OUT=dir bash bench/gpu_session8.sh a|b|c|d
TRACE_LINES="phase|ring|rank [178]:"
. bench/steps.sh
case ${1:-a} in
a)
  T=200 step pipeline $PY -m ghmpi bench pipeline --workdir "$W" --prompts 256 --new 128 --delays 0 \
    -o "$OUT/pipeline.json"
  grep -E "ghmpi bench: delay|capacity|bound_tps|tier2_kv" "$OUT/pipeline.txt" | cut -c1-250
  T=300 step variants $PY bench/ring_variants.py --new 128 "$W" "base;0;0;GHMPI_TRACE=/tmp/tr-b" \
    "spin;0;0;GHMPI_IDLE_SLEEP_US=0 GHMPI_TRACE=/tmp/tr-s" "pf16k;0;0;topology.prefill_tokens=16384" \
    "cma-noprog;0;0;OMPI_MCA_btl_vader_single_copy_mechanism=cma GHMPI_PROGRESS_US=0"
  T=100 step single $PY bench/ring_variants.py --ranks 1 --new 128 "$W" "single;0;0;" \
    "single-pf16k;0;0;topology.prefill_tokens=16384"
  cut -c1-300 "$OUT/variants.txt" "$OUT/single.txt" | grep -E "tokens/s|failed"
  traces b s
  tar czf "$OUT/traces.tgz" -C /tmp tr-b tr-s 2>/dev/null; ls -la "$OUT"
  ;;
b)
  $PY -m ghmpi bench pipeline --help >/dev/null  # fail fast
  T=170 step ab $PY bench/ring_variants.py --new 128 "$W" "new;0;0;" "old;0;0;PYTHONPATH=$PWD/.ab/old"
  cut -c1-300 "$OUT/ab.txt" | grep -E "tokens/s|failed"
  export OMPI_MCA_btl_vader_single_copy_mechanism=cma
  for n in 2 5 9; do
    T=150 step pipe-n$n $PY -m ghmpi bench pipeline --workdir "$W" --prompts 256 --new 128 --delays 0 \
      --np $n -o "$OUT/pipe-n$n.json"
    grep -E "ghmpi bench: delay|capacity|bound_tps|tier2_threads" "$OUT/pipe-n$n.txt" | cut -c1-250
  done
  ;;
c)
  s0=$(date +%s)
  for cfg in "18 400" "3 1500"; do set -- $cfg
    for rep in 1 2; do for v in old head new; do
      pp=$PWD; [ $v = new ] || pp=$PWD/.ab/$v
      echo -n "$v: "; PYTHONPATH=$pp timeout 60 mpirun --allow-run-as-root --bind-to none -x PYTHONPATH -n 2 \
        $PY bench/tier2_overhead.py --rows $1 --messages $2 --threads 2 2>&1 | grep -E "tier2_overhead|rror"
    done; done
  done > "$OUT/overhead.txt" 2>&1
  echo "== overhead $(( $(date +%s) - s0 ))s"; cat "$OUT/overhead.txt"
  T=240 step pipeline $PY -m ghmpi bench pipeline --workdir "$W" --prompts 256 --new 128 --delays 0,10 \
    -o "$OUT/pipeline.json"
  grep -E "ghmpi bench: delay|capacity|bound_tps" "$OUT/pipeline.txt" | cut -c1-250; grep -A4 "^jobs:" "$OUT/pipeline.txt"
  T_CHECK=170 bash bench/gpu_session6.sh check
  T=90 step traced $PY bench/ring_variants.py --new 128 "$W" "new;0;0;GHMPI_TRACE=/tmp/tr-n"
  grep tokens/s "$OUT/traced.txt" | cut -c1-200; traces n
  tar czf "$OUT/traces.tgz" -C /tmp tr-n 2>/dev/null
  ;;
d)
  for cfg in "18 400" "3 1500"; do set -- $cfg
    for v in old new; do
      pp=$PWD; [ $v = new ] || pp=$PWD/.ab/$v
      echo -n "$v: "; PYTHONPATH=$pp timeout 120 mpirun --allow-run-as-root --bind-to none -x PYTHONPATH -n 2 \
        $PY bench/tier2_overhead.py --rows $1 --messages $2 --threads 2 2>&1 | grep -E "tier2_overhead|rror"
    done
  done > "$OUT/overhead.txt" 2>&1; cat "$OUT/overhead.txt"
  T=330 step pipeline $PY -m ghmpi bench pipeline --workdir "$W" --prompts 256 --new 128 --delays 0,10 \
    -o "$OUT/pipeline.json"
  grep -E "ghmpi bench: delay|capacity|bound_tps" "$OUT/pipeline.txt" | cut -c1-250; grep -A4 "^jobs:" "$OUT/pipeline.txt"
  ;;
esac
