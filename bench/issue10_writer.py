"""Issue 10, item 5: how long the job's loop spends persisting completions.

    PYTHONPATH=. python bench/issue10_writer.py FLUSH_EVERY WORK_SECONDS

Stands in for the tier-1 loop: WORK_SECONDS of sleep (the GPU and MPI waits, which release the
GIL) between finished completions, then `CompletionStore.add`; reports the loop's time and the
part of it spent inside `add` (before issue 10: writing + fsyncing each shard; after: handing it
to the writer thread, or waiting only when 4 shards already wait for the disk).
"""
import os, sys, tempfile, time
import numpy as np
from ghmpi.io.completions import CompletionStore
n, every, work = 800, int(sys.argv[1]), float(sys.argv[2])
d = tempfile.mkdtemp(dir="/tmp")
store = CompletionStore(os.path.join(d, "c.h5"), n, "j", flush_every=every, flush_seconds=1e9)
tok = np.arange(64, dtype=np.int32)
in_add, worst = 0.0, 0.0
t0 = time.perf_counter()
for i in range(n):
    time.sleep(work)  # the GPU / MPI waits between finished sequences (releases the GIL)
    a = time.perf_counter()
    store.add(i, tok, 2)
    dt = time.perf_counter() - a
    in_add += dt
    worst = max(worst, dt)
loop = time.perf_counter() - t0
store.flush()
print(f"flush_every={every}, {1e3*work:.0f} ms of work per completion: loop {loop:.2f} s, of which in store.add "
      f"{in_add:.3f} s (worst single add {1e3*worst:.1f} ms)")
