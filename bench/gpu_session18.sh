#!/usr/bin/env bash
# Session 18 on the GPU machine: target 4 as the issue words it, with Open MPI's CMA single copy
# (the image sets btl_vader_single_copy_mechanism=none in its environment): `bench pipeline`
# measures both tiers' capacities and the `-n 9` job in one command, interleaved with the defaults.
#   a: CMA, then the defaults
#   b: the defaults, then CMA
# Usage (repo root): mkdir -p dir; OUT=dir bash bench/gpu_session18.sh a|b
. bench/steps.sh
TRACE_LINES="phase:|round trip|busy"
cma() { ( export OMPI_MCA_btl_vader_single_copy_mechanism=cma; PIPE=pipeline-$1 T=280 pipeline $1 ); }
default() { PIPE=pipeline-$1 T=280 pipeline $1; }
case ${1:-a} in
a) cma cma; default default ;;
b) default default-b; cma cma-b ;;
esac
ls -la "$OUT"
