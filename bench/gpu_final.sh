#!/usr/bin/env bash
# After the merges: float32 exactness on CUDA, the issue-8 job vs transformers, and the ring at
# reply delays 0 and 10 ms (issue 9). Usage (repo root): OUT=dir bash bench/gpu_final.sh
set -u
OUT=${OUT:-$(mktemp -d)}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 GHMPI_KERNEL_CACHE=/tmp/ghmpi-kernels
PY=${PY:-python3}
W=/tmp/ghmpi-bench
mkdir -p $OUT/check
OUT=$OUT/check timeout 200 bash bench/gpu_check.sh > $OUT/gpu_check.txt 2>&1; echo "gpu_check rc=$?"
rm -rf $OUT/check
grep -E "completions equal" $OUT/gpu_check.txt
timeout 200 $PY -m ghmpi bench job --workdir $W -o $OUT/job128.json > $OUT/job128.txt 2>&1; echo "job rc=$?"
grep -E "transformers:|ghmpi_over|'generate_tokens_per_s'" $OUT/job128.txt | cut -c1-400
timeout 260 $PY -m ghmpi bench pipeline --workdir $W --prompts 128 --new 64 --delays 0,10 -o $OUT/pipeline.json > $OUT/pipeline.txt 2>&1; echo "pipeline rc=$?"
grep "ghmpi bench: delay" $OUT/pipeline.txt; grep -A6 "^jobs:" $OUT/pipeline.txt; grep -E "capacity|bound" $OUT/pipeline.txt
