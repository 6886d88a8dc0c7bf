#!/usr/bin/env bash
# Session 16 on the GPU machine.
#   a: (the code of f8f889d) tier-2 slots dealt by measured attention rates, then the default where
#      the ranks are pinned (each round of the measurement started together, after every rank warmed up; the
#      median of 3), against slots by threads (GHMPI_TIER2_SHARES=threads): the job at 64
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
  traced_jobs shares "threads:t:GHMPI_TIER2_SHARES=threads" "measured:m:" \
    "threads:tb:GHMPI_TIER2_SHARES=threads" "measured:mb:"
  pipeline ring
  grep -o "measured at [^|']*" "$OUT/pipeline.txt" | head -1
  ;;
b)
  T=150 step attention $PY -m ghmpi bench attention --contexts 512,8192 --batches 64,256 \
    --dtypes bfloat16 --heads gqa,mha --seconds 0.2 --max-gb 8 --no-torch -o "$OUT/attention.json"
  grep -E "native_kv_read_GBps=|dram_read" "$OUT/attention.txt" | sed 's/ghmpi bench: //' | cut -c1-160
  pipeline ring
  grep -o "measured at [^|']*" "$OUT/pipeline.txt" | head -1
  ;;
esac
