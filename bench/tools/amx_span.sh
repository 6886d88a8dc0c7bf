#!/usr/bin/env bash
# Target 1 on a small CPU: is the attention kernel bound by its arithmetic or by what one core can
# read? Builds bench/tools/amx_span.cpp (an AMX tile prototype) and stream_probe.cpp, and runs:
# the prototype's variants from memory (Llama-3-8B's 32/8 heads, 16 rows x 8192 positions, 0.54 GB)
# on 1 and 2 threads and in L2 (1 row x 256 positions), then one core's read rates, alone and two
# at once, then the shipped kernel and the DRAM read by `bench attention` on the same machine.
# Usage (repo root): OUT=dir bash bench/tools/amx_span.sh
set -u
OUT=${OUT:-$(mktemp -d)}; mkdir -p "$OUT"; B=$(mktemp -d)
T=bench/tools
{
date -u; lscpu | grep -E 'Model name|^CPU\(s\)|L2|L3'
for v in "" "-DHUGE" "-DHUGE -DPF" "-DHUGE -DSEQ -DDIST=16384" "-DHUGE -DNODP -DNO_SM" "-DHUGE -DNO_QK -DNO_SM" "-DHUGE -DNO_SM -DNO_PV"; do
  g++ -O3 -march=native -fopenmp $v $T/amx_span.cpp -o $B/a || exit 1
  echo "amx_span [$v]: memory 1 thread $($B/a 32 8 8192 16 1 | grep -o '[0-9.]* GB/s'), 2 threads $($B/a 32 8 8192 16 2 | grep -o '[0-9.]* GB/s'); L2 1 thread $($B/a 32 8 256 1 1 | grep -o '[0-9.]* GB/s.*')"
done
g++ -O3 -march=native $T/stream_probe.cpp -o $B/s || exit 1
for m in 0 1 2 3 4 5 6 7; do echo "stream_probe one core: $(HUGE=1 $B/s $m | tail -1)"; done
echo "stream_probe mode 0, two cores at once: $( (HUGE=1 $B/s 0 | tail -1 & HUGE=1 $B/s 0 | tail -1; wait) | tr '\n' ' ')"
echo "stream_probe mode 5, two cores at once: $( (HUGE=1 $B/s 5 | tail -1 & HUGE=1 $B/s 5 | tail -1; wait) | tr '\n' ' ')"
python3 -m ghmpi bench attention --contexts 576,8192 --batches 16,256 --dtypes bfloat16 --heads gqa,mha \
  --no-torch --seconds 0.5 --max-gb 1 2>&1 | grep -E "native_kv_read|dram_read_GBps " | sed 's/ghmpi bench: //' | cut -c1-170
} 2>&1 | tee "$OUT/amx_span.txt"
rm -rf "$B"
