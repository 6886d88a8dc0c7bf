#!/usr/bin/env bash
# Session 9 on the GPU machine: why a prompt's K/V reach tier 2 at ~1 GB/s without CMA, and
# whether Open MPI's pipeline settings fix it.
#   a: Open MPI's ob1/vader parameters as this image has them (ompi_info); bench/mpi_progress.py
#      (a 2.5 MB message behind a sender in a GIL-free call with ghmpi's progress thread on) under
#      the image's settings, a deeper send pipeline (pml_ob1_send_pipeline_depth), larger
#      fragments (btl_vader_max_send_size), both, and CMA; then the job (256 x 512 -> 128,
#      -n 9) traced under the image's settings and the two pipeline variants, and untraced with CMA
#   b: tier-2 ranks of many threads serving on a worker thread (GHMPI_TIER2_WORKER): the job at
#      -n 2 (one tier-2 rank of 14 threads), -n 3 (two of 7) and -n 5 (four of 3-4) with the
#      worker and without it, against -n 9 (2-thread ranks, no worker), traced where it runs
#      (as run, -n 9 and -n 2 without the worker were cut by their steps' time limits)
#   c: the same with CMA single copy (big messages cost the sending rank nothing, as over a
#      network with RDMA): -n 9, then -n 2 and -n 3 without and with the worker, a step each
#   d: `bench pipeline` at -n 3 with CMA (two tier-2 ranks of 7 threads, serving on workers):
#      the job against both capacities
#   e: (not run: no device time was left) `bench pipeline` at -n 9 and -n 3 in one call, each
#      against its own capacities, with CMA and (-n 9) without: which layout's ring comes nearer
#      its bound on one host; then a fat tier-2 rank's cost per message beyond its kernel
#      (tier2_overhead, 128 rows x 576, 14 threads) inline and on the worker
# Usage (repo root): OUT=dir bash bench/gpu_session9.sh a|b|c|d|e
. bench/steps.sh
traces() { for d in "$@"; do
  [ -d /tmp/tr-$d ] || continue
  $PY bench/trace_summary.py /tmp/tr-$d > "$OUT/trace-$d.txt" 2>&1
  echo "-- $d"; grep -E "phase|receive|ring:" "$OUT/trace-$d.txt" | grep -E "phase|rank [18]:|shipped" | cut -c1-200
done; }
DEPTH="OMPI_MCA_pml_ob1_send_pipeline_depth=256"
FRAG="OMPI_MCA_btl_vader_max_send_size=262144"
case ${1:-a} in
a)
  { ompi_info --param btl vader --level 9; ompi_info --param pml ob1 --level 9; } 2>&1 \
    | grep -E "MCA (btl|pml).*(max_send|eager|segment|free_list|fifo|single_copy|pipeline|frag|rndv)" \
    > "$OUT/ompi_params.txt"; cut -c1-160 "$OUT/ompi_params.txt"
  for s in "" "$DEPTH" "$FRAG" "$DEPTH $FRAG" "OMPI_MCA_btl_vader_single_copy_mechanism=cma"; do
    env $s timeout 60 mpirun --allow-run-as-root --bind-to none -n 2 $PY bench/mpi_progress.py 2>&1
  done > "$OUT/progress.txt"; grep -E "settings|2560" "$OUT/progress.txt"
  T=330 step variants $PY bench/ring_variants.py --new 128 "$W" "base;0;0;GHMPI_TRACE=/tmp/tr-b" \
    "depth;0;0;$DEPTH GHMPI_TRACE=/tmp/tr-d" "depth-frag;0;0;$DEPTH $FRAG GHMPI_TRACE=/tmp/tr-f" \
    "cma;0;0;OMPI_MCA_btl_vader_single_copy_mechanism=cma"
  cut -c1-300 "$OUT/variants.txt" | grep -E "tokens/s|failed"
  traces b d f
  tar czf "$OUT/traces.tgz" -C /tmp tr-b tr-d tr-f 2>/dev/null; ls -la "$OUT"
  ;;
b)
  T=90 step n9 $PY bench/ring_variants.py --ranks 9 --new 128 "$W" "n9;0;0;"
  for n in 2 3 5; do
    T=170 step n$n $PY bench/ring_variants.py --ranks $n --new 128 "$W" \
      "n$n-worker;0;0;GHMPI_TIER2_WORKER=1 GHMPI_TRACE=/tmp/tr-$n" "n$n-inline;0;0;GHMPI_TIER2_WORKER=0"
  done
  cat "$OUT"/n?.txt | cut -c1-400 | grep -E "tokens/s|failed" > "$OUT/jobs.txt"; cat "$OUT/jobs.txt"
  traces 2 3 5
  tar czf "$OUT/traces.tgz" -C /tmp tr-2 tr-3 tr-5 2>/dev/null; ls -la "$OUT"
  ;;
c)
  export OMPI_MCA_btl_vader_single_copy_mechanism=cma
  T=150 step n9 $PY bench/ring_variants.py --ranks 9 --new 128 "$W" "n9-cma;0;0;"
  for v in n2-inline n2-worker n3-inline n3-worker; do
    n=${v:1:1}; w=0; [ ${v#*-} = worker ] && w=1
    T=150 step $v $PY bench/ring_variants.py --ranks $n --new 128 "$W" "$v-cma;0;0;GHMPI_TIER2_WORKER=$w"
  done
  cat "$OUT"/n*.txt | cut -c1-400 | grep -E "tokens/s|failed" > "$OUT/jobs.txt"; cat "$OUT/jobs.txt"
  ;;
d)
  export OMPI_MCA_btl_vader_single_copy_mechanism=cma
  T=175 step pipeline $PY -m ghmpi bench pipeline --workdir "$W" --prompts 256 --new 128 --delays 0 \
    --np 3 -o "$OUT/pipeline.json"
  grep -E "ghmpi bench: delay|capacity|bound_tps|decode_of|worker" "$OUT/pipeline.txt" | cut -c1-250
  ;;
e)
  for v in n9-nocma n9-cma n3-cma; do
    n=${v:1:1}; mca=none; [ ${v#*-} = cma ] && mca=cma
    OMPI_MCA_btl_vader_single_copy_mechanism=$mca T=190 step $v $PY -m ghmpi bench pipeline \
      --workdir "$W" --prompts 256 --new 128 --delays 0 --np $n -o "$OUT/$v.json"
    grep -E "ghmpi bench: delay|capacity_tps|bound_tps" "$OUT/$v.txt" | cut -c1-200
    grep -A2 "^| delay_ms" "$OUT/$v.txt"
  done
  for w in 0 1 0 1; do
    echo -n "worker=$w: "; GHMPI_TIER2_WORKER=$w timeout 120 mpirun --allow-run-as-root --bind-to none \
      -x PYTHONPATH -x GHMPI_TIER2_WORKER -n 2 $PY bench/tier2_overhead.py --rows 128 --messages 200 \
      --threads 14 2>&1 | grep -E "tier2_overhead|rror"
  done > "$OUT/overhead.txt" 2>&1; cat "$OUT/overhead.txt"
  ;;
esac
