import sys, time, numpy as np, torch
from torch.profiler import profile, ProfilerActivity
from ghmpi.bench.common import random_model
from ghmpi.model.kvcache import KVCache
from ghmpi.runtime.passplan import build_plan, run_local_pass
from ghmpi.runtime.scheduler import Row
dev = torch.device("cuda")
model = random_model("llama3-8b", dev, torch.bfloat16)
a = model.args
cache = KVCache(model.layers, 256, 513, a.n_kv_heads, a.head_dim, torch.bfloat16, dev)
owner = np.full(256, -1); li = np.arange(256)
for B in (1, 256):
    rows = [Row(b, b, 511, np.array([5]), False) for b in range(B)]
    def step():
        plan = build_plan(rows, owner, li, dev)
        return run_local_pass(model, cache, plan).argmax(-1).cpu()
    for _ in range(3): step()
    torch.cuda.synchronize()
    t0 = time.perf_counter(); step(); t1 = time.perf_counter()
    # host time alone: how long until all launches are queued (no sync)
    plan = build_plan(rows, owner, li, dev); torch.cuda.synchronize()
    t2 = time.perf_counter(); lg = run_local_pass(model, cache, plan); t3 = time.perf_counter(); torch.cuda.synchronize(); t4 = time.perf_counter()
    print(f"B={B}: step {1e3*(t1-t0):.1f} ms; launch-only {1e3*(t3-t2):.1f} ms; +drain {1e3*(t4-t3):.1f} ms", flush=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=50))
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=50))
