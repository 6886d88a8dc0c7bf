#!/usr/bin/env bash
# Session 16 on the GPU machine.
#   a: (the code of f8f889d) tier-2 slots dealt by measured attention rates, then the default where
#      the ranks are pinned (each round of the measurement started together, after every rank warmed up; the
#      median of 3), against slots by threads (GHMPI_TIER2_SHARES=threads): the issue's job at 64
#      new tokens, interleaved twice, each traced; then target 4 with the defaults
#      (`bench pipeline`, traced)
#   b: target 1 on this host (`bench attention`: the kernel's KV read against the DRAM read the same
#      command measures), then target 4 again (`bench pipeline`, traced) with the default shares
#      (by threads again after call a)
# Usage (repo root): OUT=dir bash bench/gpu_session16.sh a|b
. bench/steps.sh
TRACE_LINES="phase:|round trip|busy"
case ${1:-a} in
a)
  # one job a step, each traced and summarised at once, so that a call cut short keeps its jobs
  for v in "threads:t:GHMPI_TIER2_SHARES=threads" "measured:m:" "threads:tb:GHMPI_TIER2_SHARES=threads" \
           "measured:mb:"; do
    IFS=: read -r name tr env <<<"$v"
    T=150 step "shares-$tr" $PY bench/ring_variants.py --new 64 "$W" \
      "$name;0;0;$env GHMPI_TRACE=/tmp/tr-$tr"
    grep -E "tokens/s|failed" "$OUT/shares-$tr.txt" | cut -c1-200
    grep -o "measured at [^|]*" "$OUT/shares-$tr.txt"
    TRACE_LINES="^(prefill|decode) phase" traces $tr
  done
  pipeline ring
  grep -o "measured at [^|']*" "$OUT/pipeline.txt" | head -1
  ;;
b)
  T=200 step attention $PY -m ghmpi bench attention --contexts 512,8192 --batches 1,64,256 \
    --dtypes bfloat16 --heads gqa,mha --seconds 0.2 --max-gb 8 --no-torch -o "$OUT/attention.json"
  grep -E "native_kv_read_GBps=|dram_read" "$OUT/attention.txt" | sed 's/ghmpi bench: //' | cut -c1-160
  pipeline ring
  grep -o "measured at [^|']*" "$OUT/pipeline.txt" | head -1
  ;;
esac
