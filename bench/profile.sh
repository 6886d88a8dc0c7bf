# `profile NAME PROMPTS DELAY_MS` (sourced after bench/steps.sh): cProfile of every rank of the
# -n 9 job (8B shape, 512 -> 64) into $OUT/NAME-rank{0,1}.txt, the top functions by own and
# cumulative time.
profile() {  # profile NAME PROMPTS DELAY_MS: cProfile of every rank of the -n 9 job (8B, 512 -> 64)
  name=$1; prompts=$2; d=$3
  GHMPI_PROFILE=$OUT/$name T=240 step $name $PY - "$W" "$prompts" "$d" <<'PYEOF'
import sys
from pathlib import Path
from ghmpi.bench.job import make_inputs, run_ghmpi
work, n, d = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
model_dir, prompts, _ = make_inputs(work, "llama3-8b", None, n, 512)
job = run_ghmpi(model_dir, prompts, work / f"prof-d{d}.h5", 9, 64, "bfloat16",
                [f"runtime.reply_delay_ms={d}"])
print(job["generate_tokens_per_s"], job["summary"])
PYEOF
  tail -3 "$OUT/$name.txt" | cut -c1-600
  for r in 0 1; do
    $PY -c "import pstats; p=pstats.Stats('$OUT/$name/rank$r.prof'); p.sort_stats('tottime').print_stats(30); p.sort_stats('cumulative').print_stats(30)" > "$OUT/$name-rank$r.txt" 2>&1
  done
  rm -rf "$OUT/$name"; sed -n 1,40p "$OUT/$name-rank0.txt"
}
