#!/usr/bin/env bash
# Issue 8 on the GPU machine: decode and prefill suites, the whole job vs transformers, and the
# float32 exactness check. Usage (repo root): OUT=dir bash bench/gpu_issue8.sh
. bench/steps.sh
step decode $PY -m ghmpi bench decode -o "$OUT/decode.json"
step prefill $PY -m ghmpi bench prefill -o "$OUT/prefill.json"
step job128 $PY -m ghmpi bench job --workdir "$W" -o "$OUT/job128.json" ${JOB_ARGS:-}
[ -n "${JOB512:-}" ] && step job512 $PY -m ghmpi bench job --workdir "$W" --new 512 -o "$OUT/job512.json"
[ -n "${CHECK:-1}" ] && { mkdir -p $OUT/check; GC=$OUT/check; OUT=$GC T=200 step gpu_check bash bench/gpu_check.sh; mv $GC/gpu_check.txt $OUT/ 2>/dev/null; }
for f in decode prefill job128 job512 gpu_check; do [ -f "$OUT/$f.txt" ] && { echo "---- $f"; grep -v "^ghmpi bench:\|Loading weights" "$OUT/$f.txt" | tail -${TAILN:-25}; }; done
rm -rf "$OUT/check"
