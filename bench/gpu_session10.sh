#!/usr/bin/env bash
# Session 10 on the GPU machine: the ring's prefill phase. In the job (256 x 512 -> 128,
# -n 9) a pass admits prompts up to topology.prefill_tokens (4096: 8 prompts) beside its decode
# rows; the GPU's prefill of them (~4 ms a layer) then lies on the micro-batch's path to tier 2
# every layer, and the prefill phase runs at ~310 tokens/s against ~900 in the decode phase.
#   a: `bench pipeline` at -n 9 (both capacities; the job at the default 4096, traced), then the
#      job at prefill budgets 2048, 1024 and 512, traced: the phases' lengths and rates
#   b: tier-2 sets (topology.tier2_sets): each micro-batch served by one set of the tier-2 ranks,
#      so its layers wait on those ranks only, not on the slowest of all 8 (the decode phase's
#      convoy). `bench pipeline` with 7 sets (14 micro-batches of ~19; its capacities: tier 1's
#      for micro-batches of that size), then the job traced with 1 (today's), 2 and 4 sets, and
#      with 7 sets and a prefill budget of 2048
#   c: the prefill lane (topology.prefill_lane): prompts prefilled in passes of their own, run
#      when no micro-batch's layer is ready, so decoding starts after the first such pass and
#      the GPU's prefill overlaps tier 2's decoding. `bench pipeline` as is (capacities; the job
#      traced), then the job traced with the lane at prefill budgets 4096, 2048 and 8192, and
#      with the lane and 2 tier-2 sets
#   d: the prefill lane as the default (topology.prefill_lane_tokens 8192): `bench pipeline` (the
#      job against both capacities, traced), then the job without the lane (0)
# Usage (repo root): OUT=dir bash bench/gpu_session10.sh a|b|c|d
. bench/steps.sh
NL=topology.prefill_lane_tokens=0  # a and b ran before the prefill lane existed
case ${1:-a} in
a)
  pipeline 4096 --set topology.prefill_lane_tokens=0
  T=280 variants budgets \
    "p2048;0;0;$NL topology.prefill_tokens=2048 GHMPI_TRACE=/tmp/tr-2048" \
    "p1024;0;0;$NL topology.prefill_tokens=1024 GHMPI_TRACE=/tmp/tr-1024" \
    "p512;0;0;$NL topology.prefill_tokens=512 GHMPI_TRACE=/tmp/tr-512"
  ;;
b)
  pipeline s7 --set topology.tier2_sets=7 --set topology.prefill_lane_tokens=0
  T=330 variants sets \
    "s1;0;0;$NL GHMPI_TRACE=/tmp/tr-s1" \
    "s2;0;0;$NL topology.tier2_sets=2 GHMPI_TRACE=/tmp/tr-s2" \
    "s4;0;0;$NL topology.tier2_sets=4 GHMPI_TRACE=/tmp/tr-s4" \
    "s7-p2048;0;0;$NL topology.tier2_sets=7 topology.prefill_tokens=2048 GHMPI_TRACE=/tmp/tr-s7p"
  ;;
c)
  pipeline s1 --set topology.prefill_lane_tokens=0  # as run: no lane existed
  # as run, the lane was `topology.prefill_lane=true` with the budget of topology.prefill_tokens;
  # the same settings now read:
  L=topology.prefill_lane_tokens
  T=330 variants variants \
    "lane;0;0;$L=4096 GHMPI_TRACE=/tmp/tr-l" \
    "lane-p2048;0;0;$L=2048 GHMPI_TRACE=/tmp/tr-l2" \
    "lane-p8192;0;0;$L=8192 GHMPI_TRACE=/tmp/tr-l8" \
    "lane-s2;0;0;$L=4096 topology.tier2_sets=2 GHMPI_TRACE=/tmp/tr-ls2"
  ;;
d)
  pipeline lane
  T=200 variants variants \
    "nolane;0;0;topology.prefill_lane_tokens=0 GHMPI_TRACE=/tmp/tr-n"
  ;;
esac
