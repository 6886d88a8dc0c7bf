#!/usr/bin/env bash
# The default job on a GPU node: tier 1 on CUDA vs on the CPU, at -n 1 and -n 9, float32 and
# bfloat16. Checks that float32 CUDA tokens equal the CPU's and transformers', prints wall time
# and tokens/s of each run. Usage (repo root, site MPI + a CUDA torch):  bash bench/gpu_check.sh
set -u
OUT=${OUT:-$(mktemp -d)}; mkdir -p "$OUT"
PY=${PY:-$(command -v python3)}
MPIRUN=${MPIRUN:-mpirun}
MPIFLAGS=${MPIFLAGS:---oversubscribe --bind-to none}
[ "$(id -u)" = 0 ] && MPIFLAGS="$MPIFLAGS --allow-run-as-root"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMPI_MCA_mpi_yield_when_idle=1
nvidia-smi -L 2>/dev/null | head -2
"$PY" -c "import torch, mpi4py; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'mpi4py', mpi4py.__version__)"
"$MPIRUN" --version | head -1
# a trailing -cN: topology.prefill_tokens=N (prompts longer than N are prefilled in chunks);
# -gN: hybrid, one GPU micro-batch of N slots (graph steps on a low-priority stream) beside the
# tier-2-served ones; -lN: topology.prefill_lane_tokens=N (the prefill lane, on a stream of its
# own, in passes of N tokens: longer prompts go in chunks that tier 2 answers); -sN: N slices
# (RUNS="name ...": those only; cpu-n1-float32, the reference, among them)
runs=(${RUNS:-cpu-n1-float32 cpu-n9-float32 cuda-n1-float32 cuda-n9-float32 cuda-n1-bfloat16
      cuda-n9-bfloat16 cuda-n1-float32-c16 cuda-n3-float32-c16 cuda-n9-float32-g8
      cuda-n9-float32-l16 cuda-n10-float32-s2})
for name in "${runs[@]}"; do
  IFS=- read -r dev n dtype chunk <<<"$name"
  n=${n#n}
  extra=()
  case $chunk in
    c*) extra=(--set topology.prefill_tokens="${chunk#c}") ;;
    g*) extra=(--set topology.gpu_micro_batches=1 --set topology.gpu_micro_batch_size="${chunk#g}") ;;
    l*) extra=(--set topology.prefill_lane_tokens="${chunk#l}") ;;
    s*) extra=(--set topology.slices="${chunk#s}") ;;
  esac
  start=$(date +%s.%N)
  "$MPIRUN" $MPIFLAGS -n "$n" "$PY" -m ghmpi --set topology.device="$dev" --set model.dtype="$dtype" "${extra[@]}" \
    --set io.output="$OUT/$name.h5" >"$OUT/$name.log" 2>&1
  rc=$?
  end=$(date +%s.%N)
  echo "$name rc=$rc launch-to-exit=$(python3 -c "print(round($end - $start, 1))")s :: $(grep -h 'ghmpi: done' "$OUT/$name.log" | sed 's/ghmpi: done: //')"
  grep -h 'ghmpi: hybrid' "$OUT/$name.log"
  [ $rc = 0 ] || tail -5 "$OUT/$name.log"
done
"$PY" - "$OUT" <<'PYEOF'
import os, sys, h5py, numpy as np, torch
from transformers import AutoModelForCausalLM
from ghmpi.io.prompts import PromptFile
out = sys.argv[1]
def load(name):
    with h5py.File(f"{out}/{name}.h5") as f:
        t, o, r = f["tokens"][:], f["offsets"][:], f["finish_reason"][:]
    return [t[a:b].tolist() for a, b in zip(o[:-1], o[1:])], r.tolist()
ref = load("cpu-n1-float32")
for name in ["cpu-n9-float32", "cuda-n1-float32", "cuda-n9-float32", "cuda-n1-bfloat16", "cuda-n9-bfloat16",
             "cuda-n1-float32-c16", "cuda-n3-float32-c16", "cuda-n9-float32-g8",
             "cuda-n9-float32-l16", "cuda-n10-float32-s2"]:
    if not os.path.exists(f"{out}/{name}.h5"):
        continue
    got = load(name)
    same = sum(a == b for a, b in zip(got[0], ref[0]))
    print(f"{name}: {same}/{len(ref[0])} completions equal to cpu-n1-float32")
model = AutoModelForCausalLM.from_pretrained("data/tiny-llama", dtype=torch.float32).eval()
eos = model.generation_config.eos_token_id
with PromptFile("data/prompts.h5") as pf, torch.no_grad():
    hf = []
    for _, p, _ in pf.iter_prompts():
        ids = torch.tensor(np.asarray(p, dtype=np.int64))[None]
        g = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=64,
                           pad_token_id=eos if isinstance(eos, int) else eos[0])
        hf.append(g[0, ids.shape[1]:].tolist())
for name in ["cpu-n1-float32", "cuda-n1-float32", "cuda-n9-float32", "cuda-n1-float32-c16",
             "cuda-n3-float32-c16", "cuda-n9-float32-g8", "cuda-n9-float32-l16",
             "cuda-n10-float32-s2"]:
    if not os.path.exists(f"{out}/{name}.h5"):
        continue
    got = load(name)[0]
    print(f"{name}: {sum(a == b for a, b in zip(got, hf))}/{len(hf)} completions equal to transformers generate")
PYEOF
