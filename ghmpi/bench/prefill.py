"""`bench prefill`: a tier-1 prefill pass (prompts packed, every layer, the LM head on each
prompt's last token) as tokens/s and as a share of the bf16 GEMM peak measured in the same run.
Also the packed attention call beside a loop of one SDPA call per prompt."""

from __future__ import annotations

import argparse

import numpy as np
import torch

from ghmpi.bench import log
from ghmpi.bench.common import gemm_tflops, pick_device, random_model, timed
from ghmpi.bench.decode import DT
from ghmpi.model.attention import packed_prefill_attention, prefill_attention
from ghmpi.model.kvcache import KVCache
from ghmpi.runtime.passplan import build_plan, run_local_pass
from ghmpi.runtime.scheduler import Row
from ghmpi.runtime.sizing import layer_matmul_params


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", default=None, help="llama3-8b (default on a GPU) | llama2-7b | tiny")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16", choices=list(DT))
    p.add_argument("--device", default="auto")
    p.add_argument("--prompt-len", type=int, default=None, help="tokens per prompt (512)")
    p.add_argument("--pass-tokens", default=None,
                   help="comma-separated tokens per pass (default 2048,4096,8192 on a GPU)")
    p.add_argument("--repeat", type=int, default=5)


def pass_flops(a, lengths: list[int], rows: int) -> float:
    """Multiply-adds x 2 of a prefill pass: projections and MLP per token, causal attention per
    prompt, the LM head per sampled row."""
    T = sum(lengths)
    per_token = 2 * a.n_layers * layer_matmul_params(a)
    attn = 2 * a.n_layers * a.n_heads * a.head_dim * sum(L * L for L in lengths)  # QK^T + PV, causal
    return T * per_token + attn + 2 * rows * a.dim * a.vocab_size


def run(args: argparse.Namespace) -> dict:
    device = pick_device(args.device)
    gpu = device.type == "cuda"
    shape = args.shape or ("llama3-8b" if gpu else "tiny")
    dtype = DT[args.dtype]
    L = args.prompt_len or (512 if gpu else 32)
    peak = gemm_tflops(device, dtype, 8192 if gpu else 512)
    log(f"{shape} on {device}: GEMM peak {peak:.0f} TFLOP/s")
    model = random_model(shape, device, dtype, args.layers)
    a = model.args
    spec = args.pass_tokens or ("2048,4096,8192" if gpu else "64,128")
    sizes = [int(x) for x in spec.split(",")]
    n_prompts = max(max(sizes) // L, 1)
    cache = KVCache(model.layers, n_prompts, L + 1, a.n_kv_heads, a.head_dim, dtype, device)
    owner = np.full(n_prompts, -1, dtype=np.int64)
    local_index = np.arange(n_prompts, dtype=np.int64)
    rng = np.random.default_rng(0)
    out = []
    for T in sizes:
        n = max(T // L, 1)
        rows = [Row(s, s, 0, rng.integers(0, a.vocab_size, L), True) for s in range(n)]

        def step():
            plan = build_plan(rows, owner, local_index, device)
            return run_local_pass(model, cache, plan).argmax(dim=-1).cpu()

        t = timed(step, device, repeat=args.repeat)
        flops = pass_flops(a, [L] * n, n)
        out.append(dict(pass_tokens=n * L, prompts=n, prompt_len=L, pass_ms=t * 1e3,
                        tokens_per_s=n * L / t, tflops=flops / t / 1e12,
                        of_gemm_peak=flops / t / 1e12 / peak))
        log(f"{n} x {L} tokens: {t * 1e3:.1f} ms, {flops / t / 1e12 / peak:.0%} of GEMM peak")
    attn = []
    if gpu:
        for n, Lp in ((8, 512), (2, 2048), (32, 128)):
            q = torch.randn(n * Lp, a.n_heads, a.head_dim, device=device, dtype=dtype)
            k = torch.randn(n * Lp, a.n_kv_heads, a.head_dim, device=device, dtype=dtype)
            v = torch.randn_like(k)
            cu = torch.arange(0, n * Lp + 1, Lp, device=device, dtype=torch.int32)
            lens = [Lp] * n
            t_packed = timed(lambda: packed_prefill_attention(q, k, v, cu, lens), device)
            t_loop = timed(lambda: [prefill_attention(q[i * Lp:(i + 1) * Lp], k[i * Lp:(i + 1) * Lp],
                                                      v[i * Lp:(i + 1) * Lp]) for i in range(n)],
                           device)
            ref = torch.cat([prefill_attention(q[i * Lp:(i + 1) * Lp], k[i * Lp:(i + 1) * Lp],
                                               v[i * Lp:(i + 1) * Lp]) for i in range(n)]).float()
            got = packed_prefill_attention(q, k, v, cu, lens).float()
            attn.append(dict(prompts=n, prompt_len=Lp, packed_us=t_packed * 1e6,
                             per_prompt_loop_us=t_loop * 1e6, speedup=t_loop / t_packed,
                             rel_err=float((got - ref).norm() / ref.norm())))
    return {"suite": "prefill", "device": torch.cuda.get_device_name(device) if gpu else "cpu",
            "torch": torch.__version__, "shape": shape, "dtype": args.dtype,
            "gemm_peak_tflops": peak, "passes": out, "attention": attn}
