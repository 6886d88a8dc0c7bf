#!/usr/bin/env bash
# The whole test suite: the pytest-mpi protocol tests under mpirun at several world sizes (each
# bounded by `timeout`), then the unit, end-to-end and Slurm tests in one pytest run.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MPIRUN=${MPIRUN:-$(dirname "$PY")/mpirun}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_mpi_yield_when_idle=1 PMIX_MCA_psec=native
status=0
log=$(mktemp)
# mpirun's session files in a folder of this run (as tests/e2e/e2e_jobs.py does): a killed
# mpirun's leftovers in /tmp make a later one given the same pid fail to start
mpitmp=$(mktemp -d /tmp/ghmpi-mpi-XXXXXX)
trap 'rm -rf "$mpitmp"' EXIT
for n in 1 2 3 5; do
  if TMPDIR=$mpitmp timeout 300 "$MPIRUN" --oversubscribe -n "$n" "$PY" -m pytest -q -p no:cacheprovider --color=no \
       --with-mpi tests/mpi >"$log" 2>&1; then
    echo "tests/mpi at $n rank(s): $(grep -a -m1 -E '[0-9]+ passed' "$log")"
  else
    cat "$log"; echo "tests/mpi at $n rank(s): FAILED"; status=1
  fi
done
rm -f "$log"
"$PY" -m pytest -q -p no:cacheprovider tests/unit tests/e2e tests/slurm "$@"
rc=$?
case $rc in
  0) ;;
  5) echo "tests/run.sh: pytest collected no tests (exit 5): the suite is broken"; status=1 ;;
  *) status=1 ;;
esac
exit $status
