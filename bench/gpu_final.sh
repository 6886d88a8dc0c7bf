#!/usr/bin/env bash
# The figures of the README's Performance section, on the GPU machine, in two parts (each fits one
# device call). Usage (repo root): OUT=dir bash bench/gpu_final.sh a|b
#   a: decode step vs the HBM roofline and the compute-aware bound (bench decode); the issue-8
#      job, 256 prompts x 512 -> 128, default settings, vs transformers generate (bench job)
#   b: the ring (-n 9) at reply delays 0..20 ms against its tiers' capacities, the single tier
#      and a hybrid (bench pipeline), 256 prompts x 512 -> 64
. bench/steps.sh
case ${1:-a} in
a)
  T=120 step decode $PY -m ghmpi bench decode --batches 1,64,256,max -o "$OUT/decode.json"
  grep "ghmpi bench: batch" "$OUT/decode.txt"
  T=420 step job $PY -m ghmpi bench job --workdir "$W" -o "$OUT/job.json"
  grep -E "transformers:|ghmpi:|ghmpi_over" "$OUT/job.txt" | cut -c1-300 | tail -8
  ;;
b)
  T=580 step pipeline $PY -m ghmpi bench pipeline --workdir "$W" --prompts 256 --new 64 \
    --delays 0,2,5,10,20 --single --hybrid 1 --hybrid-share 0.75 -o "$OUT/pipeline.json"
  grep -E "ghmpi bench: (delay|single|hybrid)" "$OUT/pipeline.txt" | cut -c1-300
  grep -E "capacity|bound_tps|target" "$OUT/pipeline.txt"; grep -A8 "^jobs:" "$OUT/pipeline.txt"
  ;;
esac
