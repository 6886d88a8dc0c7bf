# Shared set-up of the GPU-machine scripts (sourced, from the repo root): the output folder, the
# environment, and `step NAME CMD...`, which runs CMD under `timeout ${T:-300}` into $OUT/NAME.txt
# and prints its exit status and seconds.
set -u
OUT=${OUT:-$(mktemp -d)}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export GHMPI_KERNEL_CACHE=${GHMPI_KERNEL_CACHE:-/tmp/ghmpi-kernels}
PY=${PY:-python3}
W=${GHMPI_BENCH_DIR:-/tmp/ghmpi-bench}
step() { name=$1; shift; s=$(date +%s); timeout ${T:-300} "$@" >"$OUT/$name.txt" 2>&1; echo "== $name rc=$? $(( $(date +%s) - s ))s"; }
