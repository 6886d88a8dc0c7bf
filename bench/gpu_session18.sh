#!/usr/bin/env bash
# Session 18 on the GPU machine: target 4 as the issue words it, with Open MPI's CMA single copy
# (the image sets btl_vader_single_copy_mechanism=none in its environment): `bench pipeline`
# measures both tiers' capacities and the `-n 9` job in one command, interleaved with the defaults.
#   a: CMA, then the defaults
#   b: the defaults, then CMA
#   c: tier-2 sets again (session 10 measured them before CMA and the kernel of session 16), all
#      with CMA: 1 set (the default), 4 and 8 sets (2 micro-batches a set)
# Usage (repo root): mkdir -p dir; OUT=dir bash bench/gpu_session18.sh a|b
. bench/steps.sh
TRACE_LINES="phase:|round trip|busy"
cma() { ( export OMPI_MCA_btl_vader_single_copy_mechanism=cma; PIPE=pipeline-$1 T=280 pipeline $1 ); }
default() { PIPE=pipeline-$1 T=280 pipeline $1; }
case ${1:-a} in
a) cma cma; default default ;;
b) default default-b; cma cma-b ;;
c)
  C="OMPI_MCA_btl_vader_single_copy_mechanism=cma"
  T=330 variants sets "sets1;0;0;$C" "sets4;0;0;$C topology.tier2_sets=4 GHMPI_TRACE=/tmp/tr-sets4" \
    "sets8;0;0;$C topology.tier2_sets=8"
  ;;
esac
ls -la "$OUT"
