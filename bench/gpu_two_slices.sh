#!/usr/bin/env bash
# Issue 9 item 7 on the two-GPU machine: a 2-slice ring on 2 GPUs.
#  1. float32 exactness: the shipped tiny model, 2 slices on 2 GPUs (alone and with 8 tier-2
#     ranks) against one slice on the CPU and against transformers;
#  2. throughput: Llama-2-70B-width layers (dim 8192, 64/8 heads), LAYERS of them, bf16:
#     2 slices alone (single tier) vs 2 slices + tier-2 ranks on the host's cores.
# Usage (repo root): OUT=dir bash bench/gpu_two_slices.sh   (ONLY_EXACT=1: part 1 only; on a one-GPU
# machine both slices share the GPU)
set -u
OUT=${OUT:-$(mktemp -d)}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 GHMPI_KERNEL_CACHE=/tmp/ghmpi-kernels
PY=${PY:-python3}
M="mpirun --allow-run-as-root --oversubscribe --bind-to none"
W=/tmp/ghmpi-bench; mkdir -p $W
nvidia-smi -L; nproc
for run in ${SKIP_EXACT:+}${SKIP_EXACT:-"cpu 1 1" "cuda 2 2" "cuda 10 2"}; do
  set -- $run
  timeout 200 $M -n $2 $PY -m ghmpi --set topology.device=$1 --set topology.slices=$3 \
    --set model.dtype=float32 --set io.output=$W/exact-$1-n$2.h5 >$OUT/exact-$1-n$2.log 2>&1
  echo "exact $1 -n $2 slices $3 rc=$? :: $(grep -h 'ghmpi: done' $OUT/exact-$1-n$2.log)"
done
$PY - $W <<'PYEOF'
import sys, h5py, numpy as np, torch
from transformers import AutoModelForCausalLM
from ghmpi.io.prompts import PromptFile
w = sys.argv[1]
def load(n):
    with h5py.File(f"{w}/{n}.h5") as f:
        t, o = f["tokens"][:], f["offsets"][:]
    return [t[a:b].tolist() for a, b in zip(o[:-1], o[1:])]
ref = load("exact-cpu-n1")
model = AutoModelForCausalLM.from_pretrained("data/tiny-llama", dtype=torch.float32).eval()
eos = model.generation_config.eos_token_id
hf = []
with PromptFile("data/prompts.h5") as pf, torch.no_grad():
    for _, p, _ in pf.iter_prompts():
        ids = torch.tensor(np.asarray(p, dtype=np.int64))[None]
        g = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=64,
                           pad_token_id=eos if isinstance(eos, int) else eos[0])
        hf.append(g[0, ids.shape[1]:].tolist())
for n in ["exact-cpu-n1", "exact-cuda-n2", "exact-cuda-n10"]:
    got = load(n)
    print(f"{n}: {sum(a == b for a, b in zip(got, ref))}/{len(ref)} equal to one CPU slice, "
          f"{sum(a == b for a, b in zip(got, hf))}/{len(hf)} equal to transformers")
PYEOF
[ -n "${ONLY_EXACT:-}" ] && exit 0
L=${LAYERS:-16}
for np_ in 2 ${T2RANKS:-18}; do
  timeout 300 $PY -m ghmpi bench job --no-hf --shape llama2-70b-width --layers $L --workdir $W \
    --prompts ${PROMPTS:-256} --new ${NEW:-64} --np $np_ --set topology.slices=2 \
    -o $OUT/two-slices-n$np_.json > $OUT/two-slices-n$np_.txt 2>&1
  echo "70b-width x $L layers, 2 slices, -n $np_ rc=$?"; grep -v "ghmpi bench:" $OUT/two-slices-n$np_.txt | grep -E "tokens_per_s|summary|done|busy|micro" | head -8
done
