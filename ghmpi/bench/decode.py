"""`bench decode`: one tier-1 decode step (every layer, all attention on the local cache, the LM
head and the greedy pick, as the single tier runs it) against the HBM roofline: the bytes a step
must read (weights + every row's cached K/V) over the copy bandwidth measured in the same run.
Also decode attention alone, the in-place kernel beside torch's SDPA on a gathered copy."""

from __future__ import annotations

import argparse

import numpy as np
import torch

from ghmpi.bench import log
from ghmpi.bench.common import copy_GBps, gemm_tflops, pick_device, random_model, timed
from ghmpi.model.attention import cached_decode_attention, decode_attention, gpu_decode_path
from ghmpi.model.kvcache import KVCache
from ghmpi.runtime.passplan import build_plan, run_local_pass
from ghmpi.runtime.scheduler import Row
from ghmpi.runtime.sizing import layer_matmul_params, weight_bytes

DT = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", default=None, help="llama3-8b (default on a GPU) | llama2-7b | tiny")
    p.add_argument("--layers", type=int, default=None, help="override the layer count")
    p.add_argument("--dtype", default="bfloat16", choices=list(DT))
    p.add_argument("--device", default="auto")
    p.add_argument("--context", type=int, default=None, help="context length per row (512)")
    p.add_argument("--batches", default=None,
                   help="comma-separated batch sizes; 'max' = the most that fit (default "
                        "1,16,64,256,max on a GPU)")
    p.add_argument("--repeat", type=int, default=10)


def _fit(model, dtype, context: int, device: torch.device) -> int:
    a = model.args
    per_slot = KVCache.nbytes_for(a.n_layers, 1, context + 1, a.n_kv_heads, a.head_dim, dtype)
    if device.type != "cuda":
        return 64
    free, _ = torch.cuda.mem_get_info(device)
    act = 2 * 2**30
    return max(1, int((free * 0.9 - act) // per_slot))


def run(args: argparse.Namespace) -> dict:
    device = pick_device(args.device)
    gpu = device.type == "cuda"
    shape = args.shape or ("llama3-8b" if gpu else "tiny")
    dtype = DT[args.dtype]
    context = args.context or (512 if gpu else 64)
    log(f"{shape} on {device} ({args.dtype}), context {context}")
    bw = copy_GBps(device, 2**31 if gpu else 2**26)
    peak = gemm_tflops(device, dtype, 8192 if gpu else 512)
    model = random_model(shape, device, dtype, args.layers)
    a = model.args
    itemsize = torch.empty((), dtype=dtype).element_size()
    wbytes = weight_bytes(a, a.n_layers, False, True, itemsize)  # the embedding reads B rows only
    most = _fit(model, dtype, context, device)
    spec = args.batches or ("1,16,64,256,max" if gpu else "1,4,16")
    batches = sorted({most if b == "max" else min(int(b), most) for b in spec.split(",")})
    cache = KVCache(model.layers, max(batches) + 1, context + 1, a.n_kv_heads, a.head_dim, dtype,
                    device)  # + a spare slot for the CUDA graphs' padding rows
    for layer in model.layers:  # random contexts, never zeros (zeros can run faster)
        cache.k[layer].normal_()
        cache.v[layer].normal_()
    owner = np.full(max(batches), -1, dtype=np.int64)
    local_index = np.arange(max(batches), dtype=np.int64)
    kv_token = 2 * a.n_layers * a.n_kv_heads * a.head_dim * itemsize
    graphs = None
    if gpu:
        from ghmpi.runtime.cudagraph import DecodeGraphs

        graphs = DecodeGraphs(model, cache, max(batches), max(batches))
    rows_out = []
    rng = np.random.default_rng(0)
    for B in batches:
        rows = [Row(b, b, context - 1, np.array([int(rng.integers(a.vocab_size))]), False)
                for b in range(B)]

        def step() -> np.ndarray:
            plan = build_plan(rows, owner, local_index, device)
            logits = run_local_pass(model, cache, plan)
            return logits.argmax(dim=-1).cpu().numpy()

        t_eager = timed(step, device, repeat=args.repeat)
        t = t_eager
        if graphs is not None:  # what the single tier runs: the pass replayed as a CUDA graph
            t = timed(lambda: graphs.run(rows, local_index).argmax(dim=-1).cpu().numpy(), device,
                      repeat=args.repeat)
        need = wbytes + B * context * kv_token
        roof = need / (bw * 1e9)
        # The bytes alone bound a step only while the weight products are memory bound; at large
        # batches they are compute bound (B tokens x 2 flops per weight), so the step's bound is
        # max(weight bytes, weight flops) + the KV bytes (attention stays memory bound).
        compute = 2 * B * (a.n_layers * layer_matmul_params(a) + a.vocab_size * a.dim) / (
            peak * 1e12)  # the layers' products and the LM head, per decode token
        bound = max(wbytes / (bw * 1e9), compute) + B * context * kv_token / (bw * 1e9)
        rows_out.append(dict(batch=B, context=context, step_ms=t * 1e3, eager_ms=t_eager * 1e3,
                             roofline_ms=roof * 1e3, of_roofline=roof / t, tokens_per_s=B / t,
                             bytes_GB=need / 1e9, achieved_GBps=need / t / 1e9,
                             gemm_ms=compute * 1e3, bound_ms=bound * 1e3, of_bound=bound / t))
        log(f"batch {B}: {t * 1e3:.2f} ms/step (eager {t_eager * 1e3:.2f}), {roof / t:.0%} of "
            f"the HBM roofline, {bound / t:.0%} of max(bytes, GEMM flops) + KV bytes")
    attn = _attention_side_by_side(device, dtype, a, args.repeat) if gpu else []
    fused = _fused_check(model, device) if gpu and model.fused is not None else {}
    return {"suite": "decode", "device": torch.cuda.get_device_name(device) if gpu else "cpu",
            "torch": torch.__version__, "shape": shape, "dtype": args.dtype,
            "layers": a.n_layers, "weights_GB": wbytes / 1e9, "copy_GBps": bw,
            "gemm_TFLOPs": peak,
            "decode_attention": gpu_decode_path() if gpu else "cpu", "steps": rows_out,
            "attention": attn, "fused_vs_torch_rel_err": fused}


def _attention_side_by_side(device, dtype, a, repeat: int) -> list[dict]:
    """One layer's decode attention: in place (Triton) vs SDPA on a gathered copy."""
    out = []
    H, KV, D = a.n_heads, a.n_kv_heads, a.head_dim
    for B, T in ((256, 512), (256, 2048), (64, 4096), (1, 8192)):
        kc = torch.randn(B, T, KV, D, device=device, dtype=dtype)
        vc = torch.randn_like(kc)
        q = torch.randn(B, H, D, device=device, dtype=dtype)
        slots = torch.randperm(B, device=device)
        lengths = torch.randint(T // 2, T + 1, (B,), device=device)
        lengths[0] = T
        nbytes = 2 * int(lengths.sum()) * KV * D * kc.element_size()
        t_in = timed(lambda: cached_decode_attention(q, kc, vc, slots, lengths, T), device, repeat)

        def gathered():
            k = kc.index_select(0, slots)
            v = vc.index_select(0, slots)
            return decode_attention(q, k, v, lengths)

        t_sdpa = timed(gathered, device, repeat)
        ref = gathered().float()
        got = cached_decode_attention(q, kc, vc, slots, lengths, T).float()
        err = float((got - ref).norm() / ref.norm())
        out.append(dict(batch=B, context=T, kv_GB=nbytes / 1e9, in_place_us=t_in * 1e6,
                        in_place_GBps=nbytes / t_in / 1e9, gathered_sdpa_us=t_sdpa * 1e6,
                        speedup=t_sdpa / t_in, rel_err=err))
        del kc, vc
    return out


def _fused_check(model, device) -> dict:
    """The fused elementwise kernels against the torch ops they replace (bf16 rounding apart)."""
    from ghmpi.model.llama import rms_norm
    from ghmpi.model.rope import apply_rope

    f, a, dt = model.fused, model.args, model.dtype
    x = torch.randn(256, a.dim, device=device, dtype=dt)
    y = torch.randn_like(x)
    w = torch.randn(a.dim, device=device, dtype=dt)

    def rel(got, ref):
        return float((got.float() - ref.float()).norm() / ref.float().norm())

    h, n = f.add_rms_norm(x, y, w, a.norm_eps)
    q = torch.randn(256, a.n_heads, a.head_dim, device=device, dtype=dt)
    cos, sin = model.rotary.cos_sin(torch.arange(256, device=device) * 7, dt)
    gu = torch.randn(256, 2 * a.hidden_dim, device=device, dtype=dt)
    g, u = gu.chunk(2, dim=-1)
    return {"add": rel(h, x + y), "rms_norm": rel(n, rms_norm(x + y, w, a.norm_eps)),
            "rope": rel(f.rope(q, cos, sin), apply_rope(q, cos, sin)),
            "silu_mul": rel(f.silu_mul(gu), torch.nn.functional.silu(g) * u)}
