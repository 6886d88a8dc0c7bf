#!/usr/bin/env bash
# Tuning and profiling on the GPU machine, in two parts (each fits one device call):
#   part a: the host CPU; the Triton decode kernel's launch sweep; `bench decode` (HBM and
#           compute-aware bounds); float32 exactness on CUDA incl. chunked prefill (gpu_check.sh)
#   part b: `bench pipeline` (-n 9 at reply delays 0 and 10 ms) and a cProfile of every rank of
#           the -n 9 job at 0 and 10 ms (GHMPI_PROFILE), printed as the top functions
# Usage (repo root): OUT=dir bash bench/gpu_tune.sh a|b
. bench/steps.sh
. bench/profile.sh
check() {  # float32 exactness on CUDA (gpu_check.sh writes its files into a scratch folder)
  s=$(date +%s)
  mkdir -p /tmp/ghmpi-check; OUT=/tmp/ghmpi-check timeout 200 bash bench/gpu_check.sh > "$OUT/gpu_check.txt" 2>&1
  echo "== gpu_check rc=$? $(( $(date +%s) - s ))s"
  grep -E "completions equal|rc=" "$OUT/gpu_check.txt"
}
case ${1:-a} in
a)
  lscpu | grep -E "Model name|^CPU\(s\)|Thread|Core|Socket|MHz|L3|NUMA node" > "$OUT/lscpu.txt"; cat "$OUT/lscpu.txt"
  T=280 step sweep $PY bench/triton_decode_sweep.py -o "$OUT/sweep.json"
  grep -E "^B=|^copy|^   " "$OUT/sweep.txt"
  T=150 step decode $PY -m ghmpi bench decode --batches 256,max -o "$OUT/decode.json"
  grep "ghmpi bench: batch" "$OUT/decode.txt"
  check
  ;;
b)
  T=60 step decode $PY -m ghmpi bench decode --batches 256,max -o "$OUT/decode.json"
  grep "ghmpi bench: batch" "$OUT/decode.txt"
  profile prof0 128 0
  profile prof10 128 10
  T=300 step pipeline $PY -m ghmpi bench pipeline --workdir "$W" --prompts 128 --new 64 --delays 0,10 \
    -o "$OUT/pipeline.json"
  grep -E "ghmpi bench: delay" "$OUT/pipeline.txt"; grep -E "capacity|bound|micro_batch" "$OUT/pipeline.txt"
  check
  ;;
c)  # after a change to the ring: exactness on CUDA, the ring at 0 and 10 ms, a profile at 10 ms
  check
  T=330 step pipeline $PY -m ghmpi bench pipeline --workdir "$W" --prompts ${PIPE_PROMPTS:-256} \
    --new ${PIPE_NEW:-64} --delays ${DELAYS:-0,10} --single -o "$OUT/pipeline.json"
  grep -E "ghmpi bench: (delay|single)|layer graphs" "$OUT/pipeline.txt"
  grep -E "capacity|bound|micro_batch" "$OUT/pipeline.txt"; grep -A5 "^jobs:" "$OUT/pipeline.txt"
  [ -n "${PROFILE:-}" ] && profile prof 256 10
  ;;
e)  # tier-2 attention on this node's CPU: the kernel's paths against torch, then AMX vs vector q.k
  T=120 step kcheck $PY bench/cpu_kernel_check.py; cat "$OUT/kcheck.txt"
  GHMPI_KERNEL_CFLAGS=-DGHMPI_USE_AMX T=120 step kcheck_amx $PY bench/cpu_kernel_check.py
  head -1 "$OUT/kcheck_amx.txt"; grep -c " ok" "$OUT/kcheck_amx.txt"
  for v in amx noamx; do
    flags=""; [ $v = amx ] && flags=-DGHMPI_USE_AMX  # the tiles are opt-in since session 6
    GHMPI_KERNEL_CFLAGS=$flags T=200 step attention_$v $PY -m ghmpi bench attention --contexts 512,8192 \
      --batches 1,64,256 --dtypes bfloat16 --heads gqa,mha --seconds 0.2 --max-gb 8 --no-torch \
      -o "$OUT/attention_$v.json"
    grep -E "native_kv_read_GBps=|dram_read" "$OUT/attention_$v.txt" | sed 's/ghmpi bench: //' | cut -c1-160
  done
  if [ -n "${PIPE:-}" ]; then
    T=250 step pipeline $PY -m ghmpi bench pipeline --workdir "$W" --prompts 256 --new 64 \
      --delays ${DELAYS:-0} -o "$OUT/pipeline.json"
    grep -E "ghmpi bench: delay" "$OUT/pipeline.txt" | cut -c1-300; grep -A4 "^jobs:" "$OUT/pipeline.txt"
    grep -E "capacity|bound_tps" "$OUT/pipeline.txt"
  fi
  ;;
f)  # the -n 9 job with the tier-2 kernel's tile path on, off, on (256 prompts x 512 -> 64, 0 ms)
  for v in amx noamx amx; do
    flags=""; [ $v = amx ] && flags=-DGHMPI_USE_AMX  # the tiles are opt-in since session 6
    GHMPI_KERNEL_CFLAGS=$flags T=200 step ring_$v $PY - "$W" <<'PYEOF'
import sys
from pathlib import Path
from ghmpi.bench.job import make_inputs, run_ghmpi
work = Path(sys.argv[1])
model_dir, prompts, _ = make_inputs(work, "llama3-8b", None, 256, 512)
job = run_ghmpi(model_dir, prompts, work / "ring.h5", 9, 64, "bfloat16", [])
print(f"{job['generate_tokens_per_s']:.0f} tokens/s |",
      " | ".join(l for l in job["summary"] if "busy" in l or "tier 2:" in l))
PYEOF
    echo "$v: $(tail -1 "$OUT/ring_$v.txt" | cut -c1-400)"
  done
  ;;
d)  # the ring at a 10 ms reply delay against the micro-batch count
  T=400 step mbsweep $PY - "$W" "${NEW:-32}" <<'PYEOF'
import sys
from pathlib import Path
from ghmpi.bench.job import make_inputs, run_ghmpi
work, new = Path(sys.argv[1]), int(sys.argv[2])
model_dir, prompts, _ = make_inputs(work, "llama3-8b", None, 256, 512)
for d, mbs in ((0, 0), (10, 0), (10, 4), (10, 10), (10, 14)):
    sets = [f"runtime.reply_delay_ms={d}"] + ([f"topology.micro_batches={mbs}"] if mbs else [])
    job = run_ghmpi(model_dir, prompts, work / f"sweep.h5", 9, new, "bfloat16", sets)
    print(f"delay {d} mbs {mbs or 'auto'}: {job['generate_tokens_per_s']:.0f} tokens/s |",
          " | ".join(l for l in job["summary"] if "busy" in l or "micro-batches x" in l
                     or "graphs" in l), flush=True)
PYEOF
  grep -E "^delay" "$OUT/mbsweep.txt" | cut -c1-400
  ;;
esac
