#!/usr/bin/env bash
# Session 6 on the GPU machine: tier 2's head-major KV layout and its committed cache.
#   a: the kernel on this CPU: every path against torch in both layouts (cpu_kernel_check), KV
#      read vs DRAM read for the head-major (tier 2's) and position-major layouts in one run, the
#      head-major kernel without software prefetch; then `bench pipeline` on the issue's job
#      (256 prompts x 512 -> 128, 0 ms): -n 9 against both tiers' capacities
#   b: kernel variants (AMX or vector q.k and p@V, prefetch distance) from DRAM and from L3; the
#      committed cache A/B on the same job (GHMPI_KV_COMMIT=0: pages committed as written),
#      traced; the job with 3 micro-batches
#   ab: the vector kernel and the AMX tiles, interleaved, two runs each
#   c: `bench pipeline` on the issue's job and with 64 new tokens (the vector kernel, the default)
#   check: float32 exactness on CUDA (bench/gpu_check.sh)
# Usage (repo root): OUT=dir bash bench/gpu_session6.sh a|b|ab|c|check
. bench/steps.sh
case ${1:-a} in
a)
  { cat /sys/kernel/mm/transparent_hugepage/enabled; nproc; lscpu | grep -E "Model name|NUMA|L3"; } \
    > "$OUT/machine.txt" 2>&1; cat "$OUT/machine.txt"
  T=150 step kcheck $PY bench/cpu_kernel_check.py; grep -cE " ok$" "$OUT/kcheck.txt"; grep -E "OFF|Error|rc=" "$OUT/kcheck.txt" | head
  T=200 step attention $PY -m ghmpi bench attention --layouts head,position --contexts 512,8192 \
    --batches 64,256 --dtypes bfloat16 --heads gqa,mha --splits none --seconds 0.2 --max-gb 8 \
    --no-torch -o "$OUT/attention.json"
  grep -E "native_kv_read_GBps=|dram_read_GBps [0-9]" "$OUT/attention.txt" | sed 's/ghmpi bench: //' | cut -c1-150
  GHMPI_KERNEL_CFLAGS=-DGHMPI_NO_PREFETCH T=90 step attention-nopf $PY -m ghmpi bench attention \
    --layouts head --contexts 512 --batches 64,256 --dtypes bfloat16 --heads gqa,mha --splits none \
    --seconds 0.2 --max-gb 4 --no-torch -o "$OUT/attention-nopf.json"
  grep -E "native_kv_read_GBps=|dram_read_GBps [0-9]" "$OUT/attention-nopf.txt" | sed 's/ghmpi bench: //' | cut -c1-150
  T=330 step pipeline $PY -m ghmpi bench pipeline --workdir "$W" --prompts 256 --new 128 --delays 0 \
    -o "$OUT/pipeline.json"
  grep -E "ghmpi bench: delay" "$OUT/pipeline.txt" | cut -c1-300
  grep -E "capacity|bound|tier2_|tier 2: CPU" "$OUT/pipeline.txt" | cut -c1-300; grep -A3 "^jobs:" "$OUT/pipeline.txt"
  ;;
b)
  # the kernel's tile (AMX) and vector q.k/p@V on this CPU, from DRAM and from the 300 MB L3 (a
  # 0.2 GB buffer): how far the GQA kernel is from its compute ceiling
  # (run before the tiles became opt-in: then "" built them and -DGHMPI_NO_AMX left them out;
  # now the same variants are -DGHMPI_USE_AMX and "")
  for v in all-4:"" vec-4:-DGHMPI_NO_AMX pf6-4:-DGHMPI_PREFETCH_UNITS=6 qk-4:-DGHMPI_NO_AMX_PV amx-0.2:""; do
    n=${v%%-*}; gb=${v%%:*}; gb=${gb#*-}; f=${v#*:}; f=${f//\"/}
    LAYOUTS=head; [ $n = all ] && LAYOUTS=head,position
    {
      GHMPI_KERNEL_CFLAGS="$f" T=60 step "att-$n-$gb" $PY -m ghmpi bench attention --layouts ${LAYOUTS:-head} \
        --contexts 512 --batches 16,64,256 --dtypes bfloat16 --heads gqa,mha --splits none --seconds 0.2 \
        --max-gb $gb --no-torch -o "$OUT/att-$n-$gb.json"
      echo "$n ${gb}GB: $(grep -E "native_kv_read_GBps=|^ghmpi bench: dram_read_GBps [0-9]" "$OUT/att-$n-$gb.txt" \
        | sed 's/.*layout=\([a-z]\)[a-z]* heads=\([0-9/]*\).*batch=\([0-9]*\).*native_kv_read_GBps=\([0-9.]*\).*/\1 \2 b\3: \4/; s/ghmpi bench: //' | tr '\n' ' ')"
    }
  done
  T=420 step commit $PY bench/ring_variants.py --new 128 "$W" "commit;0;0;GHMPI_TRACE=/tmp/tr-c" \
    "nocommit;0;0;GHMPI_KV_COMMIT=0 GHMPI_TRACE=/tmp/tr-n" "mbs3;0;3"
  cut -c1-300 "$OUT/commit.txt" | grep -E "tokens/s|failed"
  for d in c n; do
    $PY bench/trace_summary.py /tmp/tr-$d > "$OUT/trace-$d.txt" 2>&1; echo "-- $d"; grep -E "phase|rank 1:" "$OUT/trace-$d.txt"
  done
  [ -n "${CHECK:-}" ] && bash bench/gpu_session6.sh check
  ;;
ab)
  for i in 1 2; do for v in amx:-DGHMPI_USE_AMX vec:; do n=${v%%:*}; f=${v#*:}
    GHMPI_KERNEL_CFLAGS="$f" T=50 step "ab-$n-$i" $PY -m ghmpi bench attention --layouts head \
      --contexts 512,4096 --batches 64,256 --dtypes bfloat16 --heads gqa,mha --splits none \
      --seconds 0.2 --max-gb 4 --no-torch
    echo "$n $i: $(grep -E "native_kv_read_GBps=|^ghmpi bench: dram_read_GBps [0-9]" "$OUT/ab-$n-$i.txt" | cut -c1-150 | tr '\n' ' ')"
  done; done
  ;;
c)
  for new in 64 128; do
    T=230 step pipeline$new $PY -m ghmpi bench pipeline --workdir "$W" --prompts 256 --new $new \
      --delays 0 -o "$OUT/pipeline$new.json"
    grep -E "ghmpi bench: delay" "$OUT/pipeline$new.txt" | cut -c1-250
    grep -E "capacity|bound_tps|tier2_kv" "$OUT/pipeline$new.txt"; grep -A3 "^jobs:" "$OUT/pipeline$new.txt"
  done
  ;;
check)
  s=$(date +%s); mkdir -p /tmp/ghmpi-check
  OUT=/tmp/ghmpi-check timeout ${T_CHECK:-200} bash bench/gpu_check.sh > "$OUT/gpu_check.txt" 2>&1
  echo "== gpu_check rc=$? $(( $(date +%s) - s ))s"; grep -E "completions equal|rc=" "$OUT/gpu_check.txt" | cut -c1-200
  ;;
esac
