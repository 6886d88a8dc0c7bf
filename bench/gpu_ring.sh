#!/usr/bin/env bash
# The ring on the GPU machine (session 4): each part fits one device call.
#   a: `bench pipeline` (256 prompts x 512 -> 64, reply delays 0 and 10 ms; tier 2's capacity with
#      the job's own threads and slots per rank) and a cProfile of every rank at 10 ms
#   b: Open MPI's shared-memory settings; the job with larger eager messages, 3 micro-batches
#   c: the job at 0 and 10 ms, traced (GHMPI_TRACE), with bench/trace_summary.py
# Usage (repo root): OUT=dir bash bench/gpu_ring.sh a|b
. bench/steps.sh
. bench/profile.sh
sweep() {  # sweep NAME DELAY "MBS..." : the -n 9 job against the micro-batch count
  T=${T:-400} step $1 $PY - "$W" "$2" $3 <<'PYEOF'
import sys
from pathlib import Path
from ghmpi.bench.job import make_inputs, run_ghmpi
work, d, counts = Path(sys.argv[1]), sys.argv[2], [int(x) for x in sys.argv[3:]]
model_dir, prompts, _ = make_inputs(work, "llama3-8b", None, 256, 512)
for mbs in counts:
    sets = [f"runtime.reply_delay_ms={d}"] + ([f"topology.micro_batches={mbs}"] if mbs else [])
    job = run_ghmpi(model_dir, prompts, work / "sweep.h5", 9, 64, "bfloat16", sets)
    print(f"delay {d} mbs {mbs or 'auto'}: {job['generate_tokens_per_s']:.0f} tokens/s |",
          " | ".join(l for l in job["summary"] if "busy" in l or "micro-batches x" in l
                     or "tier 2:" in l), flush=True)
PYEOF
  grep -E "^delay" "$OUT/$1.txt" | cut -c1-400
}
case ${1:-a} in
a)
  T=330 step pipeline $PY -m ghmpi bench pipeline --workdir "$W" --prompts 256 --new 64 \
    --delays ${DELAYS:-0,10} -o "$OUT/pipeline.json"
  grep -E "ghmpi bench: delay" "$OUT/pipeline.txt" | cut -c1-400
  grep -E "capacity|bound|micro_batch|tier2_" "$OUT/pipeline.txt"; grep -A4 "^jobs:" "$OUT/pipeline.txt"
  profile prof10 256 10
  ;;
b)  # is the ring waiting on MPI progress? (messages of 30-50 KB go by rendezvous in Open MPI's
    # shared-memory transport, so each needs both sides inside MPI to move)
  (ompi_info --param btl vader --level 9; ompi_info --param btl sm --level 9) 2>/dev/null \
    | grep -E "single_copy|eager_limit|max_send_size" | grep -v "^ *[A-Z]" | head -20 > "$OUT/ompi.txt"
  grep -E "current value" "$OUT/ompi.txt" | cut -c1-160
  big="OMPI_MCA_btl_vader_eager_limit=262144 OMPI_MCA_btl_vader_max_send_size=262144"
  T=560 step variants $PY bench/ring_variants.py "$W" "default;0;0" "eager256k;0;0;$big" \
    "mbs3;0;3" "d10;10;0" "d10-eager256k;10;0;$big"
  cut -c1-300 "$OUT/variants.txt" | grep -E "tokens/s|failed"
  ;;
c)  # after a change to the ring: the job at 0 and 10 ms (and 10 ms with 14 micro-batches), each
    # traced (GHMPI_TRACE) and summarised by bench/trace_summary.py
  T=560 step ringc $PY bench/ring_variants.py "$W" "d0;0;0;GHMPI_TRACE=/tmp/tr-d0" \
    "d10;10;0;GHMPI_TRACE=/tmp/tr-d10" ${EXTRA:-"d10-mbs14;10;14"}
  cut -c1-300 "$OUT/ringc.txt" | grep -E "tokens/s|failed"
  for d in d0 d10; do
    $PY bench/trace_summary.py /tmp/tr-$d > "$OUT/trace-$d.txt" 2>&1; echo "-- $d"; cat "$OUT/trace-$d.txt"
  done
  ;;
d)  # the ring traced at 0 ms (256 prompts); then 0 and 10 ms with 1024 prompts x 512 -> 32, enough
    # sequences in flight for tier 2's work per layer to outlast a 10 ms hop
  T=150 step ringd $PY bench/ring_variants.py "$W" "d0;0;0;GHMPI_TRACE=/tmp/tr-d0b"
  cut -c1-300 "$OUT/ringd.txt" | grep -E "tokens/s|failed"
  $PY bench/trace_summary.py /tmp/tr-d0b > "$OUT/trace-d0.txt" 2>&1; cat "$OUT/trace-d0.txt"
  T=420 step ring1024 $PY bench/ring_variants.py --prompts 1024 --new 32 "$W" "p1024-d0;0;0" \
    "p1024-d10;10;0"
  cut -c1-300 "$OUT/ring1024.txt" | grep -E "tokens/s|failed"
  ;;
e)  # does a message move while its sender is busy outside MPI (Open MPI's defaults, larger eager
    # messages, CMA single copy)? Then the issue's job (256 x 512 -> 128) in bench pipeline, and
    # with 3 micro-batches
  mp() { timeout 60 mpirun --allow-run-as-root --oversubscribe -n 2 $PY bench/mpi_progress.py; }
  { mp; OMPI_MCA_btl_vader_eager_limit=4194304 OMPI_MCA_btl_vader_max_send_size=4194304 mp
    OMPI_MCA_btl_vader_single_copy_mechanism=cma mp; } > "$OUT/mpi_progress.txt" 2>&1
  grep -E "settings|received|rror" "$OUT/mpi_progress.txt" | cut -c1-200 | head -30
  T=300 step pipeline128 $PY -m ghmpi bench pipeline --workdir "$W" --prompts 256 --new 128 \
    --delays 0 -o "$OUT/pipeline128.json"
  grep -E "ghmpi bench: delay" "$OUT/pipeline128.txt" | cut -c1-300
  grep -E "capacity|bound|tier2_" "$OUT/pipeline128.txt"; grep -A3 "^jobs:" "$OUT/pipeline128.txt"
  T=200 step mbs3 $PY bench/ring_variants.py --new 128 "$W" "new128-mbs3;0;3"
  cut -c1-300 "$OUT/mbs3.txt" | grep -E "tokens/s|failed"
  ;;
f)  # the issue's job with single-copy transfers (CMA), traced: what waiting on the sender costs
  cma="OMPI_MCA_btl_vader_single_copy_mechanism=cma"
  T=300 step cma $PY bench/ring_variants.py --new 128 "$W" "new128-cma;0;0;$cma GHMPI_TRACE=/tmp/tr-cma" \
    ${EXTRA:-}
  cut -c1-300 "$OUT/cma.txt" | grep -E "tokens/s|failed"
  $PY bench/trace_summary.py /tmp/tr-cma > "$OUT/trace-cma.txt" 2>&1; cat "$OUT/trace-cma.txt"
  ;;
g)  # the reworked tier-2 kernel on this CPU: every path against torch, then KV read vs DRAM; float32
    # exactness on CUDA (incl. the hybrid's low-priority graph steps)
  T=120 step kcheck $PY bench/cpu_kernel_check.py; cat "$OUT/kcheck.txt"
  T=200 step attention $PY -m ghmpi bench attention --contexts 512,8192 --batches 1,64,256 \
    --dtypes bfloat16 --heads gqa,mha --seconds 0.2 --max-gb 8 --no-torch -o "$OUT/attention.json"
  grep -E "native_kv_read_GBps=|dram_read" "$OUT/attention.txt" | sed 's/ghmpi bench: //' | cut -c1-160
  s=$(date +%s); mkdir -p /tmp/ghmpi-check
  OUT=/tmp/ghmpi-check timeout 230 bash bench/gpu_check.sh > "$OUT/gpu_check.txt" 2>&1
  echo "== gpu_check rc=$? $(( $(date +%s) - s ))s"; grep -E "completions equal|rc=" "$OUT/gpu_check.txt"
  ;;
h)  # the issue's job (256 x 512 -> 128): -n 9 against both tiers' capacities, the single tier, and
    # the hybrid (one GPU micro-batch of 192 beside the tier-2-served ones)
  T=560 step pipeline $PY -m ghmpi bench pipeline --workdir "$W" --prompts 256 --new 128 --delays 0 \
    --single --hybrid 1 --hybrid-share 0.75 -o "$OUT/pipeline.json"
  grep -E "ghmpi bench: (delay|single|hybrid)" "$OUT/pipeline.txt" | cut -c1-400
  grep -E "capacity|bound|tier2_|target" "$OUT/pipeline.txt"; grep -A3 "^jobs:" "$OUT/pipeline.txt"
  [ -n "${SLICES:-}" ] && { mkdir -p $OUT/slices; OUT=$OUT/slices ONLY_EXACT=1 timeout 200 \
    bash bench/gpu_two_slices.sh > "$OUT/two_slices.txt" 2>&1; grep -E "exact|equal" "$OUT/two_slices.txt"; }
  ;;
k)  # tier-2 kernel A/B on this CPU: the kernel before session 4 (bench/old_kernel/, when present)
    # and prefetch variants of the current one; GQA and MHA, 64 and 256 rows of 512 tokens
  ab() { GHMPI_KERNEL_CFLAGS="$2" T=90 step "ab-$1" $PY -m ghmpi bench attention --contexts 512 \
      --batches 64,256 --dtypes bfloat16 --heads gqa,mha --splits none --seconds 0.2 --max-gb 4 \
      --no-torch -o "$OUT/ab-$1.json"
    echo "$1 [$2]: $(grep -E "native_kv_read_GBps=|^ghmpi bench: dram_read_GBps [0-9]" "$OUT/ab-$1.txt" \
      | sed 's/.*heads=\([0-9/]*\).*batch=\([0-9]*\).*native_kv_read_GBps=\([0-9.]*\).*/\1 b\2: \3/; s/ghmpi bench: //' | tr '\n' ' ')"; }
  if [ -f bench/old_kernel/decode_attention.cpp ]; then
    rm -rf /tmp/oldtree; mkdir -p /tmp/oldtree; cp -r ghmpi /tmp/oldtree/
    cp bench/old_kernel/decode_attention.cpp /tmp/oldtree/ghmpi/kernels/
    (cd /tmp/oldtree && PYTHONPATH=/tmp/oldtree ab old "")
  fi
  ab new ""
  ab l1 "-DGHMPI_PREFETCH_LOCALITY=3"
  ab units8 "-DGHMPI_PREFETCH_UNITS=8"
  ab units1 "-DGHMPI_PREFETCH_UNITS=1"
  ab nopf "-DGHMPI_NO_PREFETCH"
  ;;
i)  # latency tolerance with enough sequences in flight: 1024 prompts x 512 -> 32 at 0 and 10 ms
  T=500 step ring1024 $PY bench/ring_variants.py --prompts 1024 --new 32 "$W" "p1024-d0;0;0" \
    "p1024-d10;10;0" ${EXTRA:-}
  cut -c1-300 "$OUT/ring1024.txt" | grep -E "tokens/s|failed"
  ;;
l)  # the hybrid with the tail guard (session 5): the issue's job (256 x 512 -> 128), single tier
    # vs one GPU micro-batch of 192 beside tier-2-served ones; then a job larger than the GPU's
    # KV budget (kv_memory_gb=2: 128 sequences of 128 tokens; 8192 prompts x 64 -> 64)
  T=280 step hyb-issue $PY -m ghmpi bench pipeline --workdir "$W" --prompts 256 --new 128 \
    --delays none --single --hybrid 1 --hybrid-share 0.75 -o "$OUT/hyb-issue.json"
  T=300 step hyb-starved $PY -m ghmpi bench pipeline --workdir "$W" --prompts ${P:-8192} \
    --prompt-len 64 --new 64 --delays none --single --hybrid 1 --set topology.kv_memory_gb=2 \
    -o "$OUT/hyb-starved.json"
  for f in hyb-issue hyb-starved; do echo "-- $f"; grep -E "ghmpi bench: (single|hybrid)" "$OUT/$f.txt" | cut -c1-700
    grep -E "capacity|target|over_single|_tokens:|tier2_slots" "$OUT/$f.txt"; done
  ;;
m)  # the hybrid in a job larger than the GPU's share (the GPU holds 128 sequences, tier 2 two
    # micro-batches of 512; 8192 prompts x 64 -> 64): single tier, the hybrid traced; PROF=1: the
    # single tier traced and the hybrid under cProfile instead
  args="--workdir $W --prompts ${P:-8192} --prompt-len 64 --new 64 --delays none --hybrid 1
    --hybrid-share $(python3 -c "print(128/${P:-8192})") --set topology.micro_batch_size=128
    --hybrid-set topology.micro_batch_size=512 --hybrid-set topology.micro_batches=2"
  [ -z "${PROF:-}" ] && GHMPI_TRACE=/tmp/tr-hyb T=${T:-300} step hyb $PY -m ghmpi bench pipeline $args --single -o "$OUT/hyb.json"
  if [ -n "${PROF:-}" ]; then  # the single tier traced (its GPU steps' host gap) and
    GHMPI_TRACE=/tmp/tr-hyb T=150 step single $PY -m ghmpi bench job --np 1 --no-hf --workdir $W \
      --prompts ${P:-8192} --prompt-len 64 --new 64 --set topology.micro_batch_size=128  # the hybrid alone under cProfile (rank 0: where tier 1's host time goes)
    GHMPI_PROFILE=/tmp/prof-hyb T=200 step hyb-prof $PY -m ghmpi bench pipeline $args -o "$OUT/hyb-prof.json"
    $PY -c "import pstats; p=pstats.Stats('/tmp/prof-hyb/rank0.prof'); p.sort_stats('tottime').print_stats(35); p.sort_stats('cumulative').print_stats(45)" > "$OUT/hyb-prof-rank0.txt" 2>&1
  fi
  $PY bench/trace_summary.py /tmp/tr-hyb > "$OUT/trace-hyb.txt" 2>&1; cat "$OUT/trace-hyb.txt" | cut -c1-250
  for f in hyb hyb-prof; do echo "-- $f"; grep -E "ghmpi bench: (single|hybrid)" "$OUT/$f.txt" | cut -c1-900
    grep -E "capacity|target|over_single|_tokens:|tier2_slots" "$OUT/$f.txt"; done
  ;;
n)  # session 5's final call: float32 exactness on CUDA (the hybrid's eager sampling included), the
    # issue's job with the hybrid sized automatically (the GPU holds what it can), then part m
  s=$(date +%s); mkdir -p /tmp/ghmpi-check
  OUT=/tmp/ghmpi-check timeout 230 bash bench/gpu_check.sh > "$OUT/gpu_check.txt" 2>&1
  echo "== gpu_check rc=$? $(( $(date +%s) - s ))s"; grep -E "completions equal|rc=|hybrid" "$OUT/gpu_check.txt" | cut -c1-200
  T=150 step hyb-auto $PY -m ghmpi bench pipeline --workdir "$W" --prompts 256 --new 128 \
    --delays none --single --hybrid 1 -o "$OUT/hyb-auto.json"
  grep -E "ghmpi bench: (single|hybrid)" "$OUT/hyb-auto.txt" | cut -c1-300
  grep -E "over_single|_tokens:" "$OUT/hyb-auto.txt"
  T=210 P=${P:-6144} bash bench/gpu_ring.sh m
  ;;
o)  # (session 5; the change it measured was not kept) graph decode steps planned on the host only: float32 exactness on CUDA, then the single tier
    # with bench/ab/tier1_before.py (when present) and with this tree, and the hybrid, in one call
  s=$(date +%s); mkdir -p /tmp/ghmpi-check
  OUT=/tmp/ghmpi-check timeout 170 bash bench/gpu_check.sh > "$OUT/gpu_check.txt" 2>&1
  echo "== gpu_check rc=$? $(( $(date +%s) - s ))s"; grep -E "completions equal|rc=|hybrid" "$OUT/gpu_check.txt" | cut -c1-160
  P=${P:-4096}
  one="--workdir $W --prompts $P --prompt-len 64 --new 64 --set topology.micro_batch_size=128"
  if [ -f bench/ab/tier1_before.py ]; then
    rm -rf /tmp/oldtree; mkdir -p /tmp/oldtree; cp -r ghmpi jobs data /tmp/oldtree/
    cp bench/ab/tier1_before.py /tmp/oldtree/ghmpi/runtime/tier1.py
    (cd /tmp/oldtree && PYTHONPATH=/tmp/oldtree GHMPI_TRACE=/tmp/tr-old T=100 step single-before $PY -m ghmpi \
      bench job --np 1 --no-hf $one -o "$OUT/single-before.json")
    $PY bench/trace_summary.py /tmp/tr-old > "$OUT/trace-single-before.txt" 2>&1
  fi
  GHMPI_TRACE=/tmp/tr-new T=180 step hyb-new $PY -m ghmpi bench pipeline $one --delays none --single \
    --hybrid 1 --hybrid-share $(python3 -c "print(128/$P)") --hybrid-set topology.micro_batch_size=512 \
    --hybrid-set topology.micro_batches=2 -o "$OUT/hyb-new.json"
  $PY bench/trace_summary.py /tmp/tr-new > "$OUT/trace-hyb-new.txt" 2>&1
  grep -h "micro-batch 0" "$OUT"/trace-*.txt | cut -c1-220
  grep -hE "generate_tokens_per_s|single_tier_tps|hybrid_tps|over_single|_tokens:" "$OUT/single-before.txt" "$OUT/hyb-new.txt"
  ;;
esac
