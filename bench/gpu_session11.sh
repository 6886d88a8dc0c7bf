#!/usr/bin/env bash
# Session 11 on the GPU machine: the prefill lane off tier 1's host path. Until now tier 1's host
# waited on each lane layer's GPU work (8,192 prompt tokens, ~9 ms) before it shipped that
# layer's K/V, and the decode micro-batches' layers queued behind (round trip 14.3 ms in the ramp
# against 8 ms after, session 10 `d/`). Now the lane's layers run on a low-priority stream of
# their own, its messages go out when their copies' event has passed, and the micro-batches run
# on a high-priority stream meanwhile.
#   a: float32 exactness on CUDA (bench/gpu_check.sh: -n 9 with the lane as the default, with
#      16-token lane passes whose chunks tier 2 answers, two slices on the GPU, hybrid), then
#      `bench pipeline` of the issue's job (both capacities; the job traced), then the same job
#      with the code before this change (build/old: `git archive 0bd35ae ghmpi`, carried) and
#      without the lane, traced: before/after on one host
#   b: a repeat on another host, before and after interleaved: `bench pipeline` (capacities; the
#      job traced), then the code before, the code after again, and 16,384-token lane passes
#   c: deeper rings with the lane off the host path, on one host: `bench pipeline` (capacities;
#      the job traced), then 3 and 4 micro-batches (of 86 and 64 slots) and 2 tier-2 sets (4
#      micro-batches, each served by half the ranks)
#   d: the lane's ramp, where tier 2 takes the prompts' K/V at ~1 GB/s a rank (2.8 MB messages
#      in 2.9 ms, `c/`): the job as is, with MPI's progress thread probing every 25 us instead of
#      100, with CMA single copy, and with 256 KiB shared-memory fragments instead of 32 KiB
#   e: a repeat of d's best, on another host, interleaved: the progress thread at 25 us, the
#      default 100 us, 25 us again
# Usage (repo root): OUT=dir bash bench/gpu_session11.sh a|b|c|d|e
. bench/steps.sh
case ${1:-a} in
a)
  T=200 step check env OUT=/tmp/check RUNS="cpu-n1-float32 cuda-n9-float32 cuda-n9-float32-l16
    cuda-n10-float32-s2 cuda-n9-float32-g8" bash bench/gpu_check.sh
  grep -E "rc=|equal" "$OUT/check.txt" | cut -c1-160
  pipeline lane
  T=200 variants variants \
    "before;0;0;PYTHONPATH=$PWD/build/old GHMPI_TRACE=/tmp/tr-old" \
    "nolane;0;0;topology.prefill_lane_tokens=0 GHMPI_TRACE=/tmp/tr-n"
  ;;
b)
  pipeline lane
  T=270 variants variants \
    "before;0;0;PYTHONPATH=$PWD/build/old GHMPI_TRACE=/tmp/tr-old" \
    "after;0;0;GHMPI_TRACE=/tmp/tr-new" \
    "lane16384;0;0;topology.prefill_lane_tokens=16384 GHMPI_TRACE=/tmp/tr-l16"
  ;;
c)
  pipeline lane
  T=270 variants variants \
    "mbs3;0;3;GHMPI_TRACE=/tmp/tr-m3" \
    "mbs4;0;4;GHMPI_TRACE=/tmp/tr-m4" \
    "sets2;0;0;topology.tier2_sets=2 GHMPI_TRACE=/tmp/tr-s2"
  ;;
d)
  V=OMPI_MCA_btl_vader
  T=330 variants variants \
    "default;0;0;GHMPI_TRACE=/tmp/tr-d" \
    "progress25;0;0;GHMPI_PROGRESS_US=25 GHMPI_TRACE=/tmp/tr-p25" \
    "cma;0;0;${V}_single_copy_mechanism=cma GHMPI_TRACE=/tmp/tr-cma" \
    "frag256k;0;0;${V}_fragment_size=262144 ${V}_max_send_size=262144 GHMPI_TRACE=/tmp/tr-f"
  ;;
e)
  T=300 variants variants \
    "progress25;0;0;GHMPI_PROGRESS_US=25 GHMPI_TRACE=/tmp/tr-p25a" \
    "progress100;0;0;GHMPI_PROGRESS_US=100 GHMPI_TRACE=/tmp/tr-p100" \
    "progress25;0;0;GHMPI_PROGRESS_US=25 GHMPI_TRACE=/tmp/tr-p25b"
  ;;
esac
