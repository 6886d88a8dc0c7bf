#!/usr/bin/env bash
# Session 17 on the GPU machine.
#   a: target 1 on this host (`bench attention`: the kernel's KV read against the DRAM read the same
#      command measures, GQA and MHA), then target 4 (`bench pipeline`, traced) with the defaults
#   b: the job at 128 new tokens, interleaved: 2 micro-batches (the automatic count
#      here), 3, and 2 with Open MPI's CMA single copy for the large messages (the image sets
#      btl_vader_single_copy_mechanism=none: the prompts' K/V then crosses in 32 KiB fragments)
#   c: CMA again, without, and CMA traced
# Usage (repo root): mkdir -p dir; OUT=dir bash bench/gpu_session17.sh a|b|c
. bench/steps.sh
TRACE_LINES="phase:|round trip|busy"
case ${1:-a} in
a)
  T=150 step attention $PY -m ghmpi bench attention --contexts 512,8192 --batches 64,256 \
    --dtypes bfloat16 --heads gqa,mha --seconds 0.2 --max-gb 8 --no-torch -o "$OUT/attention.json"
  grep -E "native_kv_read_GBps=|dram_read" "$OUT/attention.txt" | sed 's/ghmpi bench: //' | cut -c1-160
  pipeline ring
  grep -o "measured at [^|']*" "$OUT/pipeline.txt" | head -1
  ;;
b)
  CMA="OMPI_MCA_btl_vader_single_copy_mechanism=cma"
  T=400 variants mb "two;0;2" "three;0;3" "cma;0;2;$CMA" "three-b;0;3" "two-b;0;2"
  ;;
c)
  CMA="OMPI_MCA_btl_vader_single_copy_mechanism=cma"
  T=200 variants mb2 "cma-b;0;2;$CMA" "two-c;0;2" "cma-c;0;2;$CMA GHMPI_TRACE=/tmp/tr-cma"
  ;;
esac
