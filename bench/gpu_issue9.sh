#!/usr/bin/env bash
# Issue 9 (and the fused decode of issue 8) on the GPU machine, in one command:
#   decode step with the fused kernels; tier-2 attention on this node's CPU vs its DRAM bandwidth;
#   the ring (-n 9) against its tiers' capacities at reply delays 0..20 ms; single tier; hybrid.
# Usage (repo root): OUT=dir bash bench/gpu_issue9.sh
. bench/steps.sh
step decode $PY -m ghmpi bench decode --batches 1,64,256,max -o "$OUT/decode.json"
T=200 step attention $PY -m ghmpi bench attention --contexts 512,8192 --batches 1,64,256 \
  --dtypes bfloat16 --heads gqa,mha --seconds 0.2 --max-gb 8 -o "$OUT/attention.json"
T=330 step pipeline $PY -m ghmpi bench pipeline --workdir "$W" --prompts ${PIPE_PROMPTS:-128} \
  --new ${PIPE_NEW:-64} --delays 0,2,5,10,20 --single --hybrid 1 --hybrid-share 0.75 -o "$OUT/pipeline.json"
for f in decode attention pipeline; do echo "---- $f"; grep -v "^ghmpi bench:\|Loading weights" "$OUT/$f.txt" | tail -${TAILN:-40}; done
