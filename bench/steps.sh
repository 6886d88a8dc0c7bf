# Shared set-up of the GPU-machine scripts (sourced, from the repo root): the output folder, the
# environment, and `step NAME CMD...`, which runs CMD under `timeout ${T:-300}` into $OUT/NAME.txt
# and prints its exit status and seconds; `traces NAME...` summarises the traces /tmp/tr-NAME into
# $OUT/trace-NAME.txt (TRACE_LINES: the lines printed of each); `pipeline NAME [--set ...]` runs
# `bench pipeline` of the issue's job (256 x 512 -> 128, no delay) into
# $OUT/${PIPE:-pipeline}.txt and .json, and its trace into $OUT/trace-NAME.txt; `variants NAME
# SPEC...` runs bench/ring_variants.py on that job into $OUT/NAME.txt, prints each variant's line
# and summarises the traces the specs name (GHMPI_TRACE=/tmp/tr-X); `traced_jobs PREFIX 'NAME:TRACE:ENV'...` runs the issue's job at 64 new
# tokens once a step under each ENV, traced to /tmp/tr-TRACE and summarised at once into
# $OUT/PREFIX-TRACE.txt and $OUT/trace-TRACE.txt, so that a call cut short keeps its jobs.
set -u
OUT=${OUT:-$(mktemp -d)}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export GHMPI_KERNEL_CACHE=${GHMPI_KERNEL_CACHE:-/tmp/ghmpi-kernels}
PY=${PY:-python3}
W=${GHMPI_BENCH_DIR:-/tmp/ghmpi-bench}
step() { name=$1; shift; s=$(date +%s); timeout ${T:-300} "$@" >"$OUT/$name.txt" 2>&1; echo "== $name rc=$? $(( $(date +%s) - s ))s"; }
TRACE_LINES=${TRACE_LINES:-"phase:|round trip"}
traces() { for d in "$@"; do
  [ -d /tmp/tr-$d ] || continue
  $PY bench/trace_summary.py /tmp/tr-$d > "$OUT/trace-$d.txt" 2>&1
  echo "-- $d"; grep -E "$TRACE_LINES" "$OUT/trace-$d.txt" | cut -c1-220
done; }
pipeline() { local trace=$1 p=${PIPE:-pipeline}; shift
  T=${T:-200} step $p $PY -m ghmpi bench pipeline --workdir "$W" --prompts 256 --new 128 --delays 0 \
    "$@" -o "$OUT/$p.json"
  grep -E "ghmpi bench: delay|capacity_tps|bound_tps|single_copy:" "$OUT/$p.txt" | cut -c1-250
  grep -A2 "^| delay_ms" "$OUT/$p.txt"
  $PY bench/trace_summary.py $W/trace-*-n9-d0 > "$OUT/trace-$trace.txt" 2>&1
  grep -E "$TRACE_LINES" "$OUT/trace-$trace.txt"
}
variants() { local name=$1; shift
  step "$name" $PY bench/ring_variants.py --new ${NEW:-128} "$W" "$@"
  cut -c1-300 "$OUT/$name.txt" | grep -E "tokens/s|failed"
  traces $(printf '%s\n' "$@" | grep -o 'GHMPI_TRACE=/tmp/tr-[^ ;]*' | sed 's|.*/tr-||')
  ls -la "$OUT"
}
traced_jobs() { local prefix=$1 v name tr env; shift
  for v in "$@"; do
    IFS=: read -r name tr env <<<"$v"
    T=150 step "$prefix-$tr" $PY bench/ring_variants.py --new 64 "$W" \
      "$name;0;0;$env GHMPI_TRACE=/tmp/tr-$tr"
    grep -E "tokens/s|failed" "$OUT/$prefix-$tr.txt" | cut -c1-200
    grep -o "measured at [^|]*" "$OUT/$prefix-$tr.txt"
    TRACE_LINES="^(prefill|decode) phase" traces $tr
  done; }
