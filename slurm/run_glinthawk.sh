#!/usr/bin/env bash
# ghmpi as a Slurm batch job: ONE MPI world over the whole allocation.
#
#   sbatch slurm/run_glinthawk.sh [CONFIG.yaml] [--set KEY=VALUE ...]
#   sbatch --nodes=2 --ntasks-per-node=9 slurm/run_glinthawk.sh jobs/my.yaml --set topology.slices=2
#
# Everything after the script name goes to `python -m ghmpi` unchanged (no CONFIG: jobs/default.yaml).
# World ranks 0..S-1 (S = topology.slices) are tier 1 (one GPU each), all others tier 2 (CPU).
# srun and mpirun fill nodes in order, so with --ntasks-per-node=T the first ceil(S/T) nodes hold
# tier 1: put the GPU nodes first, or use run_glinthawk_het.sh to ask for GPU and CPU nodes apart.
#
# Exit status = ghmpi's: 0 done, 2 bad input (nothing ran) or the output in use by another job,
# 74 the output's filesystem failed (full, quota, read-only), 75 interrupted (time limit or
# scancel), 76 stalled (a hung rank; runtime.stall_timeout); after 74/75/76 finished prompts are
# persisted: `sbatch` the same command again and it resumes. Anything else: a failure.
# Do not delete <output>.parts/ between attempts: that is what the rerun resumes from.
#
# Environment knobs (all optional; sbatch exports the submitting shell's environment by default):
#   GHMPI_VENV=DIR        activate DIR/bin/activate first (else ./.venv of the submit dir if no venv
#                         is active). Modules: `module load ...` before sbatch, or in a copy of this.
#   GHMPI_PYTHON=EXE      interpreter (default: python, else python3, after the activation)
#   GHMPI_LAUNCHER=srun   srun (default; --mpi=$GHMPI_SRUN_MPI, default pmix) or mpirun (the MPI
#                         library's own launcher; see "PMIx" below)
#   GHMPI_LAUNCH_ARGS=".." extra arguments for srun/mpirun, e.g. "--cpu-bind=cores"
#
# ---- resources: edit, or override on the command line (sbatch --ntasks=17 ...) ----------------
#SBATCH --job-name=glinthawk
#SBATCH --output=%x-%j.out
#SBATCH --nodes=1
#        tasks = slices (GPU ranks) + tier-2 CPU ranks, e.g. 1 GPU rank + 8 CPU ranks:
#SBATCH --ntasks=9
#        one GPU per slice on each node (a line with two '#' is off; enable on GPU partitions):
##SBATCH --gpus-per-node=1
##SBATCH --partition=gpu
#SBATCH --time=02:00:00
#        SIGUSR1 to every rank ~120 s before the limit (Slurm's timing is coarse, give it slack):
#        ghmpi persists what is done and exits 75.
#SBATCH --signal=USR1@120
#        Let Slurm requeue the job after a node failure or preemption; ghmpi resumes on restart:
##SBATCH --requeue
##SBATCH --open-mode=append
# -----------------------------------------------------------------------------------------------

set -u
me="run_glinthawk"

die() {  # one line, the ghmpi way, and exit 2 (bad input / set-up: nothing has run)
    echo "ghmpi: error: $*" >&2
    exit 2
}

[ -n "${SLURM_JOB_ID:-}" ] || die "$me.sh runs under Slurm: submit it with sbatch (or run it inside salloc)"
cd "${SLURM_SUBMIT_DIR:-$PWD}" || die "cannot enter the submit directory ${SLURM_SUBMIT_DIR:-}"

# ---- Python environment ------------------------------------------------------------------------
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

# ---- MPI settings (only where the user has not chosen) ------------------------------------------
# More ranks than cores (tier-2 ranks mostly wait): sleep instead of busy-polling.
export OMPI_MCA_mpi_yield_when_idle="${OMPI_MCA_mpi_yield_when_idle:-1}"
# Open MPI's PMIx client under Slurm: no munge security plugin needed; silences PMIx noise.
export PMIX_MCA_psec="${PMIX_MCA_psec:-native}"

launcher="${GHMPI_LAUNCHER:-srun}"
read -r -a extra <<< "${GHMPI_LAUNCH_ARGS:-}"
case "$launcher" in
    srun)
        # --kill-on-bad-exit: one rank failing ends the step (ghmpi also aborts the world itself).
        cmd=(srun --mpi="${GHMPI_SRUN_MPI:-pmix}" --kill-on-bad-exit=1 "${extra[@]}" "$PY" -m ghmpi "$@")
        ;;
    mpirun)
        # Open MPI's mpirun reads the allocation (nodes, tasks per node) from Slurm and starts its
        # daemons with srun. --bind-to none: ranks share cores; the runtime sizes torch threads.
        if [ "$(id -u)" = 0 ]; then
            export OMPI_ALLOW_RUN_AS_ROOT="${OMPI_ALLOW_RUN_AS_ROOT:-1}"
            export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="${OMPI_ALLOW_RUN_AS_ROOT_CONFIRM:-1}"
        fi
        mpirun_exe="$(dirname "$(command -v "$PY")")/mpirun"
        [ -x "$mpirun_exe" ] || mpirun_exe=mpirun
        cmd=("$mpirun_exe" --bind-to none "${extra[@]}" "$PY" -m ghmpi "$@")
        ;;
    *) die "GHMPI_LAUNCHER must be srun or mpirun, got '$launcher'" ;;
esac

echo "$me: job ${SLURM_JOB_ID}: ${SLURM_NTASKS:-?} ranks on ${SLURM_JOB_NODELIST:-?}: ${cmd[*]}" >&2

# Run the launcher in the background so that this shell can wait through signals: on scancel or
# the time limit Slurm signals the ranks itself; this shell must not die first, or the job would
# end (and the ranks be killed) before ghmpi has persisted its work. A USR1 sent only to this
# shell (--signal=B:USR1@...) is passed on through the launcher to the ranks.
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
