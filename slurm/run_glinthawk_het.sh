#!/usr/bin/env bash
# ghmpi as a heterogeneous Slurm job: GPU nodes for tier 1, CPU nodes for tier 2, ONE MPI world.
#
#   sbatch slurm/run_glinthawk_het.sh [CONFIG.yaml] [--set KEY=VALUE ...]
#   sbatch --ntasks=2 --gpus-per-task=1 : --nodes=2 --ntasks=16 slurm/run_glinthawk_het.sh jobs/my.yaml
#
# Component 0 (before `#SBATCH hetjob`) = the GPU ranks: tier 1, one rank per pipeline slice.
# Component 1 (after it)                = the CPU ranks: tier 2 (attention + KV cache).
# `srun --het-group=0,1` starts both components as one MPI_COMM_WORLD, component 0's ranks first,
# and this script adds `--set topology.slices=<tasks of component 0>` (last, so it wins), so that
# world ranks 0..S-1 -- tier 1 -- are exactly the GPU ranks.
#
# Exit status = ghmpi's: 0 done, 2 bad input (or the output in use by another job), 74 storage
# error, 75 interrupted, 76 stalled (74/75/76: persisted; resubmit to resume), else failure.
# Environment knobs as in run_glinthawk.sh (GHMPI_VENV, GHMPI_PYTHON, GHMPI_LAUNCH_ARGS,
# GHMPI_SRUN_MPI); there is no mpirun fallback here: Open MPI's mpirun only sees component 0 of a
# heterogeneous allocation (measured: it refuses hosts of component 1, and without --host it puts
# every rank on component 0's nodes). Use run_glinthawk.sh with a plain allocation instead.
#
# PMIx temp dirs: Slurm's PMIx plugin creates TmpFS/spmix_appdir_<uid>_<job>.<step> on each node.
# On a real cluster every node has its own /tmp; only several slurmd on ONE host (a test set-up)
# collide there, which TmpFS=/somewhere/%n in slurm.conf fixes (see tests/slurm/slurm.conf.in).
#
# ---- component 0: GPU ranks (tier 1) -------------------------------------------------------------
#SBATCH --job-name=glinthawk-het
#SBATCH --output=%x-%j.out
#SBATCH --time=02:00:00
#SBATCH --signal=USR1@120
#SBATCH --nodes=1
#SBATCH --ntasks=1
##SBATCH --gpus-per-task=1
##SBATCH --partition=gpu
##SBATCH --requeue
#SBATCH hetjob
# ---- component 1: CPU ranks (tier 2) -------------------------------------------------------------
#SBATCH --nodes=1
#SBATCH --ntasks=8
##SBATCH --partition=cpu
##SBATCH --mem=0
# ---------------------------------------------------------------------------------------------------

set -u
me="run_glinthawk_het"

die() {
    echo "ghmpi: error: $*" >&2
    exit 2
}

[ -n "${SLURM_JOB_ID:-}" ] || die "$me.sh runs under Slurm: submit it with sbatch"
[ "${SLURM_HET_SIZE:-1}" = 2 ] || die "$me.sh needs a heterogeneous job of 2 components (GPU ranks, then CPU ranks; '#SBATCH hetjob' or 'sbatch ... : ...'), got ${SLURM_HET_SIZE:-1}"
slices="${SLURM_NTASKS_HET_GROUP_0:-}"
tier2="${SLURM_NTASKS_HET_GROUP_1:-}"
[ -n "$slices" ] && [ -n "$tier2" ] || die "Slurm did not report the task counts of the components (SLURM_NTASKS_HET_GROUP_0/1)"
cd "${SLURM_SUBMIT_DIR:-$PWD}" || die "cannot enter the submit directory ${SLURM_SUBMIT_DIR:-}"

# ---- Python environment (as in run_glinthawk.sh) ------------------------------------------------
if [ -n "${GHMPI_VENV:-}" ]; then
    [ -f "$GHMPI_VENV/bin/activate" ] || die "GHMPI_VENV=$GHMPI_VENV has no bin/activate"
    # shellcheck disable=SC1091
    . "$GHMPI_VENV/bin/activate"
elif [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
PY="${GHMPI_PYTHON:-}"
if [ -z "$PY" ]; then
    if command -v python >/dev/null 2>&1; then PY=python; else PY=python3; fi
fi
command -v "$PY" >/dev/null 2>&1 || die "no Python interpreter '$PY' on PATH on $(hostname) (set GHMPI_PYTHON or GHMPI_VENV)"
if ! err=$("$PY" -c "import ghmpi, mpi4py" 2>&1); then
    die "cannot import ghmpi/mpi4py with $(command -v "$PY") on $(hostname): $(printf '%s' "$err" | tail -n 1) (activate the environment before sbatch, or set GHMPI_VENV=/path/to/venv)"
fi

export OMPI_MCA_mpi_yield_when_idle="${OMPI_MCA_mpi_yield_when_idle:-1}"
export PMIX_MCA_psec="${PMIX_MCA_psec:-native}"

read -r -a extra <<< "${GHMPI_LAUNCH_ARGS:-}"
cmd=(srun --het-group=0,1 --mpi="${GHMPI_SRUN_MPI:-pmix}" --kill-on-bad-exit=1 "${extra[@]}"
     "$PY" -m ghmpi "$@" --set "topology.slices=$slices")

echo "$me: job ${SLURM_JOB_ID}: tier 1 = $slices ranks on ${SLURM_JOB_NODELIST_HET_GROUP_0:-?}, tier 2 = $tier2 ranks on ${SLURM_JOB_NODELIST_HET_GROUP_1:-?}: ${cmd[*]}" >&2

# Wait through signals (see run_glinthawk.sh): Slurm signals the ranks; this shell must outlive them.
"${cmd[@]}" &
pid=$!
trap 'kill -USR1 "$pid" 2>/dev/null' USR1
trap ':' TERM INT
# wait returns early when a trapped signal arrives: wait again while the launcher lives, then
# collect its exit status (bash keeps it even if the launcher was reaped during a trap).
while kill -0 "$pid" 2>/dev/null; do
    wait "$pid"
done
wait "$pid"
rc=$?
echo "$me: job ${SLURM_JOB_ID}: ghmpi exited with status $rc" >&2
exit "$rc"
