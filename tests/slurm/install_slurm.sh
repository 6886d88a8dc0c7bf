#!/usr/bin/env bash
# Best-effort install of a real Slurm for tests/slurm (Debian/Ubuntu, as root, needs the network).
# libpmix-dev provides the unversioned libpmix.so that Slurm's mpi/pmix plugin dlopens; without it
# `srun --mpi=pmix` fails with "can not load PMIx library".
set -euo pipefail
if [ "$(id -u)" != 0 ]; then echo "install_slurm.sh: must run as root" >&2; exit 1; fi
command -v apt-get >/dev/null || { echo "install_slurm.sh: no apt-get here" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq slurmd slurmctld slurm-client munge libpmix2 libpmix-dev
