#!/usr/bin/env bash
# Session 12 on the GPU machine.
#   a: float32 exactness on CUDA after session 11's last refactor (bench/gpu_check.sh: -n 9 with
#      the lane, 16-token lane passes, hybrid), then `bench pipeline` of the issue's job with the
#      progress thread at its new default of 25 us (both capacities; the job traced: target 4's
#      ratio), then target 6: 1,024 prompts x 512 -> 32 at no reply delay and at 10 ms
#   b: the kernel's softmax rewrite on the Xeon: bench/cpu_kernel_check.py (every code path the
#      build has against torch), then `bench attention` before (build/old: `git archive adc9cce
#      ghmpi`, carried; run outside the checkout so that PYTHONPATH decides) and after,
#      interleaved twice, then `bench pipeline` of the issue's job with the new kernel (target 4),
#      then session 11's prefill lane off the host path measured before/after for real (session
#      11's "before" ran the code after: `python -m` in the checkout's root imported the
#      checkout's ghmpi whatever PYTHONPATH said): build/lane = `git archive 0bd35ae ghmpi jobs`,
#      build/old = `adc9cce`, both carried (in call b the A/B failed: the archives lacked jobs/,
#      and a job's ranks no longer start in the checkout, so they found no jobs/default.yaml)
#   c: that A/B again, interleaved twice: before, after, before, after
#   d: target 6's micro-batch count: 1,024 prompts x 512 -> 32 at no delay (2 automatic), then
#      at a 10 ms reply delay with 3, automatic (10), 2 and 4 micro-batches. With 1,024 rows a
#      layer holds ~30 ms of tier-2 work a rank, so 2-3 micro-batches in flight should hide 10 ms;
#      each extra one adds a message's fixed cost per rank per layer
# Usage (repo root): OUT=dir bash bench/gpu_session12.sh a|b|c|d
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
b)
  T=120 step kcheck $PY bench/cpu_kernel_check.py
  grep -vc " ok$" "$OUT/kcheck.txt"; head -1 "$OUT/kcheck.txt" | cut -c1-120
  R=$PWD
  for i in 1 2; do for v in old new; do pp=$R; [ $v = old ] && pp=$R/build/old
    (cd /tmp && PYTHONPATH=$pp OUT=/tmp T=70 step "att-$v-$i" $PY -m ghmpi bench attention --layouts head \
      --contexts 512,4096 --batches 64,256 --dtypes bfloat16 --heads gqa,mha --splits none \
      --seconds 0.3 --max-gb 4 --no-torch)
    echo "$v $i: $(grep -E "native_kv_read_GBps=|^ghmpi bench: dram_read_GBps [0-9]|kernel \(" \
      "/tmp/att-$v-$i.txt" | sed -E 's/.*(heads=[^ ]+).*(batch=[^ ]+ context=[^k]+).*(native_kv_read_GBps=[^ ]+).*/\1 \2 \3/; s/ghmpi bench: //' | cut -c1-110 | tr '\n' ';')"
    { echo "=== $v $i"; cat "/tmp/att-$v-$i.txt"; } >> "$OUT/attention.txt"
  done; done
  pipeline lane
  # the lane off the host path, before (0bd35ae) and after (adc9cce), both with the kernel before
  # this session's and the progress thread at 25 us
  T=200 variants lane-ab "after;0;0;PYTHONPATH=$R/build/old GHMPI_PROGRESS_US=25" \
    "before;0;0;PYTHONPATH=$R/build/lane GHMPI_PROGRESS_US=25"
  ;;
c)
  R=$PWD
  T=450 variants lane-ab "before;0;0;PYTHONPATH=$R/build/lane GHMPI_PROGRESS_US=25" \
    "after;0;0;PYTHONPATH=$R/build/old GHMPI_PROGRESS_US=25" \
    "before;0;0;PYTHONPATH=$R/build/lane GHMPI_PROGRESS_US=25" \
    "after;0;0;PYTHONPATH=$R/build/old GHMPI_PROGRESS_US=25"
  ;;
d)
  T=470 step latency $PY bench/ring_variants.py --prompts 1024 --new 32 "$W" "p1024-d0;0;0" \
    "p1024-d10-m3;10;3" "p1024-d10-auto;10;0" "p1024-d10-m2;10;2" "p1024-d10-m4;10;4"
  cut -c1-300 "$OUT/latency.txt" | grep -E "tokens/s|failed"
  ;;
esac
