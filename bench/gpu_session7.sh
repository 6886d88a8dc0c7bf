#!/usr/bin/env bash
# Session 7 on the GPU machine: where the ring of the job (256 prompts x 512 -> 128,
# -n 9) loses against its tiers' capacities.
#   r: the MPI image's shared-memory settings; `bench pipeline` (the job against both capacities);
#      then the job traced under variants: as is, with CMA single copy (tier 2 pulls the prompts'
#      K/V itself), with a 16k-token prefill budget, and both
#   v: the job traced, one after another: as is, with tier 2 pushing each reply out before its next
#      message (GHMPI_REPLY_PUSH_US=200: tried in part g, no gain, removed; now ignored), with the
#      progress thread at 1 ms, with 256 kB eager messages, with CMA, with 3 micro-batches, and as
#      is again (the spread between the two)
#   f: `bench pipeline` on the issue's job at 0 and 10 ms reply delay (targets 4 and 6), then
#      float32 exactness on CUDA (part check)
#   g: part f's `bench pipeline` (0 and 10 ms), then the job traced as is, with reply pushing,
#      with CMA and with 3 micro-batches (part v, shortened to fit one call with the pipeline;
#      parts v and f were never granted a machine, so g is what ran)
#   check: float32 exactness on CUDA (bench/gpu_check.sh)
# Usage (repo root): OUT=dir bash bench/gpu_session7.sh r|v|f|g|check
. bench/steps.sh
# traces PATTERN LETTER...: summarise /tmp/tr-LETTER into $OUT/trace-LETTER.txt, print the lines
traces() { pat=$1; shift; for d in "$@"; do
  [ -d /tmp/tr-$d ] || continue
  $PY bench/trace_summary.py /tmp/tr-$d > "$OUT/trace-$d.txt" 2>&1; echo "-- $d"
  grep -E "$pat" "$OUT/trace-$d.txt" | cut -c1-260
done; }
# pipeline DELAYS: `bench pipeline` on the issue's job at those reply delays (ms, comma list)
pipeline() {
  T=330 step pipeline $PY -m ghmpi bench pipeline --workdir "$W" --prompts 256 --new 128 --delays "$1" \
    -o "$OUT/pipeline.json"
  grep -E "ghmpi bench: delay" "$OUT/pipeline.txt" | cut -c1-250
  grep -E "capacity|bound_tps|tier2_kv" "$OUT/pipeline.txt"; grep -A4 "^jobs:" "$OUT/pipeline.txt"
}
case ${1:-r} in
r)
  { nproc; cat /proc/sys/kernel/yama/ptrace_scope 2>&1; grep -rh "single_copy\|vader\|btl" \
      /etc/openmpi/openmpi-mca-params.conf /usr/local/etc/openmpi-mca-params.conf \
      $(dirname "$(command -v mpirun)")/../etc/openmpi-mca-params.conf 2>/dev/null | grep -v "^#";
    env | grep OMPI_MCA; ompi_info --param btl vader --level 9 2>/dev/null | grep -E "single_copy|eager_limit|max_send" ; } \
    > "$OUT/machine.txt" 2>&1; cat "$OUT/machine.txt"
  pipeline 0
  cma=OMPI_MCA_btl_vader_single_copy_mechanism=cma
  T=330 step variants $PY bench/ring_variants.py --new 128 "$W" "base;0;0;GHMPI_TRACE=/tmp/tr-b" \
    "cma;0;0;$cma GHMPI_TRACE=/tmp/tr-c" "pf16k;0;0;topology.prefill_tokens=16384 GHMPI_TRACE=/tmp/tr-p" \
    "cma-pf16k;0;0;$cma topology.prefill_tokens=16384 GHMPI_TRACE=/tmp/tr-cp"
  cut -c1-300 "$OUT/variants.txt" | grep -E "tokens/s|failed"
  traces "phase|rank 1:|stage|round" b c p cp
  ;;
v)
  cma=OMPI_MCA_btl_vader_single_copy_mechanism=cma
  eager="OMPI_MCA_btl_vader_eager_limit=262144 OMPI_MCA_btl_vader_max_send_size=262144"
  T=590 step variants $PY bench/ring_variants.py --new 128 "$W" "base;0;0;GHMPI_TRACE=/tmp/tr-b" \
    "push;0;0;GHMPI_REPLY_PUSH_US=200 GHMPI_TRACE=/tmp/tr-u" "prog1ms;0;0;GHMPI_PROGRESS_US=1000 GHMPI_TRACE=/tmp/tr-g" \
    "eager;0;0;$eager GHMPI_TRACE=/tmp/tr-e" "cma;0;0;$cma GHMPI_TRACE=/tmp/tr-c" "mbs3;0;3;GHMPI_TRACE=/tmp/tr-m" \
    "base2;0;0;GHMPI_TRACE=/tmp/tr-b2"
  cut -c1-300 "$OUT/variants.txt" | grep -E "tokens/s|failed"
  traces "phase|ring|rank 1:|round" b u g e c m b2
  ;;
f)
  pipeline 0,10
  bash bench/gpu_session7.sh check
  ;;
g)
  pipeline 0,10
  T=330 step variants $PY bench/ring_variants.py --new 128 "$W" "base;0;0;GHMPI_TRACE=/tmp/tr-b" \
    "push;0;0;GHMPI_REPLY_PUSH_US=200 GHMPI_TRACE=/tmp/tr-u" \
    "cma;0;0;OMPI_MCA_btl_vader_single_copy_mechanism=cma GHMPI_TRACE=/tmp/tr-c" "mbs3;0;3;GHMPI_TRACE=/tmp/tr-m"
  cut -c1-300 "$OUT/variants.txt" | grep -E "tokens/s|failed"
  traces "phase|ring|rank [178]:" b u c m
  ;;
check)
  bash bench/gpu_session6.sh check
  ;;
esac
