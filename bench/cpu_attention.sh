#!/usr/bin/env bash
# Tier-2 attention on this node's CPU: `bench attention` at full sizes (native kernel vs torch vs
# the DRAM read bandwidth, ranks x threads splits), the kernel's build time and tests, and one
# thread's rate (compute or memory bound?). ~4 minutes on 16 cores.
# Usage (repo root, as root or not):  OUT=/some/dir bash bench/cpu_attention.sh
# (ATTN_ARGS replaces the main run's size options, e.g. ATTN_ARGS=--tiny for a dry run.)
set -u
OUT=${OUT:-$(mktemp -d)}
PY=${PY:-$(command -v python3)}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export GHMPI_KERNEL_CACHE=${GHMPI_KERNEL_CACHE:-$OUT/kernel-cache}
mkdir -p "$OUT"
{
  date -u; uname -m; nproc
  lscpu | grep -E 'Model name|Socket|Core|Thread|L3|NUMA node\(s\)' ; grep -o -m1 -w 'amx_bf16\|avx512_bf16\|avx512f' /proc/cpuinfo | sort -u | tr '\n' ' '; echo
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, torch.__config__.parallel_info().splitlines()[-1])"
  "$PY" -c "import ninja; print('ninja (pip)', ninja.__version__)" 2>&1 | tail -1; command -v ninja; ${CXX:-c++} --version | head -1
} 2>&1 | tee "$OUT/machine.txt"

# 1. build (timed, into a fresh cache) and check the kernel against the torch path
"$PY" -c "
import time; t = time.time()
from ghmpi import kernels
print(kernels.describe()); print(f'first use (build and load) took {time.time() - t:.1f} s')" 2>&1 | tee "$OUT/kernel.txt"
timeout 300 "$PY" -m pytest -q -p no:cacheprovider tests/unit/test_kernels.py -x 2>&1 | tail -3 | tee "$OUT/test_kernels.txt"

# 2. the suite at full sizes (KV buffers capped at 8 GB), native vs torch, splits 1x16 .. 16x1
timeout 420 "$PY" -m ghmpi bench attention --json -o "$OUT/attention.json" ${ATTN_ARGS:---max-gb 8} \
  2>"$OUT/attention.log" >/dev/null; echo "bench attention rc=$?"
"$PY" - "$OUT/attention.json" <<'PYEOF'
import json, sys
from ghmpi.bench import format_table
print(format_table(json.load(open(sys.argv[1]))))
PYEOF

echo "splits: $("$PY" -c "import json; r=json.load(open('$OUT/attention.json')); print([(s['ranks'], s['threads'], round(s.get('native_ratio', 0), 3), round(s['torch_ratio'], 3)) for s in r['splits']])" 2>&1)"

# 3. one core's worth: is the kernel compute- or memory-bound per core? (GQA and MHA, 1 thread)
timeout 120 "$PY" -m ghmpi bench attention --json -o "$OUT/attention_1thread.json" --threads 1 \
  --contexts 2048 --batches 16 --dtypes bfloat16 --splits none --no-torch --max-gb 2 2>/dev/null | \
  "$PY" -c "import json,sys; r=json.load(sys.stdin); print('1 thread: dram', round(r['dram_read_GBps'],1), [(x['heads'], round(x['native_kv_read_GBps'],1)) for x in r['rows']])"
# 4. prefetch A/B: kernel variants (each its own cache entry), all threads, GQA and MHA bf16
for v in "" "-DGHMPI_PREFETCH_UNITS=2" "-DGHMPI_PREFETCH_UNITS=6" "-DGHMPI_PREFETCH_LOCALITY=3" "-DGHMPI_NO_PREFETCH"; do
  GHMPI_KERNEL_CFLAGS="$v" timeout 90 "$PY" -m ghmpi bench attention --json --contexts 2048 \
    --batches 64 --dtypes bfloat16 --splits none --no-torch --max-gb 4 --seconds 0.2 2>/dev/null | \
    "$PY" -c "import json,sys; r=json.load(sys.stdin); print('variant [$v]: dram', round(r['dram_read_GBps'],1), [(x['heads'], round(x['native_kv_read_GBps'],1), round(x['native_ratio'],3)) for x in r['rows'] if x['context'] == '2048'])"
done
echo "results in $OUT"
