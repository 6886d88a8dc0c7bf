export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout 200 python3 bench/tools/prof.py 2>&1 | tee $OUT/prof.txt | grep -v "^-" | cut -c1-200
W=/tmp/ghmpi-bench
timeout 200 python3 -m ghmpi bench job --no-hf --workdir $W > $OUT/jobbuild.txt 2>&1; tail -3 $OUT/jobbuild.txt
timeout 200 python3 -m cProfile -o $OUT/job.prof -m ghmpi --set model.path=$W/llama3-8b --set io.prompts=$W/prompts-256x512.h5 --set io.output=/tmp/o/c.h5 --set generation.max_new_tokens=128 --set generation.ignore_eos=true --set io.overwrite=true --set runtime.progress_seconds=1000 2>&1 | grep "done:"
python3 -c "import pstats; pstats.Stats('$OUT/job.prof').sort_stats('tottime').print_stats(25)" | tail -40 | cut -c1-160
