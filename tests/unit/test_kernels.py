"""The native CPU decode-attention kernel against the torch path; its build cache and fallback.

The kernel is built once into the user's cache (the first test pays a few seconds); the build
tests use private cache directories and subprocesses, since a process loads the kernel once.
"""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ghmpi import kernels
from ghmpi.kernels import _decode_attention_torch, build, decode_attention_cpu
from ghmpi.model.kvcache import KVCache, head_major

ROOT = Path(__file__).resolve().parents[2]
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}

native = pytest.mark.skipif(not kernels.native_available(),
                            reason=f"native kernel not built here: {kernels.describe()}")


def _problem(dtype, n_heads, n_kv, D, lengths, n_slots=None, max_len=None, seed=0, layout="head"):
    """Caches in tier 2's head-major layout (KVCache's: the kernel walks each kv head's context
    in turn) or position-major (contiguous: the kernel walks a block's kv heads in turn)."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    n_slots = n_slots or B + 2
    max_len = max_len or max(lengths) + 5
    k = torch.randn(n_slots, max_len, n_kv, D, generator=g).to(dtype)
    v = torch.randn(n_slots, max_len, n_kv, D, generator=g).to(dtype)
    if layout == "head":
        k, v = (head_major(torch.empty(x.numel(), dtype=dtype), *x.shape).copy_(x) for x in (k, v))
        assert k.stride(2) > k.stride(1)
    slots = torch.randperm(n_slots, generator=g)[:B]
    lengths = torch.tensor(lengths, dtype=torch.int64)
    for b in range(B):  # past each row's length: poison the kernel must never read
        k[slots[b], lengths[b]:] = float("nan")
        v[slots[b], lengths[b]:] = float("nan")
    q = torch.randn(B, n_heads, D, generator=g).to(dtype)
    return q, k, v, slots, lengths


def _reference(q, k, v, slots, lengths):
    """Float64 math, one row at a time: independent of both implementations."""
    B, H, D = q.shape
    n_rep = H // k.shape[2]
    out = torch.empty(B, H * D, dtype=torch.float64)
    for b in range(B):
        L = int(lengths[b])
        kk = k[slots[b], :L].double().repeat_interleave(n_rep, dim=1)  # (L, H, D)
        vv = v[slots[b], :L].double().repeat_interleave(n_rep, dim=1)
        s = torch.einsum("hd,lhd->hl", q[b].double(), kk) / D ** 0.5
        out[b] = torch.einsum("hl,lhd->hd", s.softmax(-1), vv).reshape(-1)
    return out


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_heads,n_kv", [(8, 8), (8, 4), (16, 4), (16, 2), (8, 1)])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("layout", ["head", "position"])
def test_native_matches_reference_and_torch_path(dtype, n_heads, n_kv, D, layout):
    lengths = [1, 7, 16, 17, 300, 129, 64, 33]
    q, k, v, slots, lengths = _problem(dtype, n_heads, n_kv, D, lengths, seed=D + n_kv, layout=layout)
    ref = _reference(q, k, v, slots, lengths)
    o = decode_attention_cpu(q, k, v, slots, lengths)
    assert o.dtype == dtype and o.shape == (len(lengths), n_heads * D)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(o.double(), ref, rtol=rtol, atol=atol)
    # the torch path (tier 2's fallback) needs finite tails: zero the poison first
    kz, vz = k.nan_to_num(0.0), v.nan_to_num(0.0)
    tol = (1e-5, 1e-5) if dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(o.float(), _decode_attention_torch(q, kz, vz, slots, lengths).float(),
                               rtol=tol[0], atol=tol[1])


@native
@pytest.mark.parametrize("threads", [1, 2, 5])
@pytest.mark.parametrize("lengths", [[3000], [100], [1, 2000, 5], [40] * 33])
@pytest.mark.parametrize("layout", ["head", "position"])
def test_context_and_head_splits_combine_exactly(threads, lengths, layout):
    """Few rows with long contexts are split along the context (and over kv heads); the combined
    result equals the unsplit math, and every output element is written."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q, k, v, slots, lengths = _problem(torch.float32, 16, 4, 64, lengths, seed=threads,
                                           layout=layout)
        out = torch.full((len(lengths), 16 * 64), float("nan"))
        o = decode_attention_cpu(q, k, v, slots, lengths, out=out)
    finally:
        torch.set_num_threads(before)
    assert o.data_ptr() == out.data_ptr() and torch.isfinite(o).all()
    torch.testing.assert_close(o.double(), _reference(q, k, v, slots, lengths), rtol=1e-5, atol=1e-5)


@native
@pytest.mark.parametrize("seed", range(4))
def test_random_lengths_and_slots(seed):
    g = torch.Generator().manual_seed(seed)
    B = int(torch.randint(1, 40, (1,), generator=g))
    lengths = torch.randint(1, 700, (B,), generator=g).tolist()
    dtype = (torch.float32, torch.bfloat16)[seed % 2]
    q, k, v, slots, L = _problem(dtype, 32, 8, 128, lengths, seed=seed)
    torch.testing.assert_close(decode_attention_cpu(q, k, v, slots, L).double(),
                               _reference(q, k, v, slots, L), rtol=TOL[dtype][0], atol=TOL[dtype][1])


@pytest.mark.parametrize("path", ["native", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["head", "position"])
def test_new_tokens_are_appended_before_attending(path, dtype, layout):
    """k_new/v_new: each row's own token lands at position lengths-1 of its slot (the rest of the
    cache untouched), and the row attends over it: the same as storing it first."""
    if path == "native" and not kernels.native_available():
        pytest.skip(f"native kernel not built here: {kernels.describe()}")
    q, k, v, slots, lengths = _problem(dtype, 16, 4, 64, [1, 9, 33, 130], layout=layout)
    k, v = k.nan_to_num(0.0), v.nan_to_num(0.0)  # the torch path reads whole rows
    g = torch.Generator().manual_seed(3)
    kn, vn = (torch.randn(len(lengths), 4, 64, generator=g).to(dtype) for _ in range(2))
    k_ref, v_ref = k.clone(), v.clone()
    k_ref[slots, lengths - 1], v_ref[slots, lengths - 1] = kn, vn
    kernels.force(path)
    try:
        o = decode_attention_cpu(q, k, v, slots, lengths, k_new=kn, v_new=vn)
    finally:
        kernels.force(None)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    torch.testing.assert_close(o.double(), _reference(q, k_ref, v_ref, slots, lengths),
                               rtol=TOL[dtype][0], atol=TOL[dtype][1])


@native
def test_odd_head_dims_and_rejects_bad_rows():
    for D in (48, 20):  # not a multiple of 64 / of 16: other vector and scalar paths
        q, k, v, slots, lengths = _problem(torch.bfloat16, 6, 3, D, [5, 90, 31])
        torch.testing.assert_close(decode_attention_cpu(q, k, v, slots, lengths).double(),
                                   _reference(q, k, v, slots, lengths), rtol=2e-2, atol=2e-2)
    q, k, v, slots, lengths = _problem(torch.float32, 4, 2, 64, [5, 9])
    with pytest.raises(IndexError, match="row 1"):
        decode_attention_cpu(q, k, v, slots, torch.tensor([5, k.shape[1] + 1]))
    with pytest.raises(ValueError):
        decode_attention_cpu(q, k[..., :32], v, slots, lengths)


@pytest.mark.parametrize("commit", [False, True])
def test_cpu_cache_is_head_major_aligned_and_committed_when_asked(commit):
    """Tier 2's cache: stored head-major (each kv head's context one run of memory), indexed
    (slot, position, kv head, dim), starting on a 2 MiB boundary; committed caches start zeroed."""
    cache = KVCache([0, 3], 3, 4096, 2, 128, torch.bfloat16, commit=commit)  # 6 MiB a tensor
    for t in (cache.k[3], cache.v[0]):
        assert t.shape == (3, 4096, 2, 128)
        assert t.stride() == (2 * 4096 * 128, 128, 4096 * 128, 1)
        assert t.data_ptr() % (2 << 20) == 0
        if commit:
            assert not t.any()
    k = torch.randn(5, 2, 128).bfloat16()
    cache.write(3, 1, 7, k, -k)
    assert torch.equal(cache.k[3][1, 7:12], k) and torch.equal(cache.v[3][1, 7:12], -k)
    flat = cache.k[3].permute(0, 2, 1, 3).contiguous()  # (slot, head, position, dim) as stored
    assert torch.equal(flat[1, 1, 7:12], k[:, 1])


def _decode_steps(dtype, commit=False):
    """A few decode steps through KVCache on non-consecutive slots -> list of outputs."""
    g = torch.Generator().manual_seed(1)
    cache = KVCache([0, 1], 6, 64, 2, 32, dtype, commit=commit)
    outs = []
    for slot, n in ((4, 9), (1, 3), (2, 20)):
        for layer in (0, 1):
            cache.write(layer, slot, 0, torch.randn(n, 2, 32, generator=g).to(dtype),
                        torch.randn(n, 2, 32, generator=g).to(dtype))
    slots, pos = torch.tensor([4, 1, 2]), torch.tensor([9, 3, 20])
    for _ in range(3):
        for layer in (0, 1):
            q = torch.randn(3, 8, 32, generator=g)
            kv = torch.randn(3, 2, 32, generator=g), torch.randn(3, 2, 32, generator=g)
            outs.append(cache.decode(layer, slots, pos, q, *kv))
        pos = pos + 1
    return cache, outs


@native
@pytest.mark.parametrize("commit", [False, True])
def test_kvcache_decode_native_equals_torch_fallback(commit):
    cache, native_outs = _decode_steps(torch.float32, commit)
    assert cache._native
    kernels.force("torch")
    try:
        cache, torch_outs = _decode_steps(torch.float32, commit)
        assert not cache._native
    finally:
        kernels.force(None)
    for a, b in zip(native_outs, torch_outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _python(code: str, **env) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=e, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


CHECK = """
    import torch
    from ghmpi import kernels
    print(kernels.describe())
    q = torch.randn(3, 8, 64); k = torch.randn(4, 50, 2, 64); v = torch.randn(4, 50, 2, 64)
    s, l = torch.tensor([2, 0, 3]), torch.tensor([50, 1, 17])
    ref = kernels._decode_attention_torch(q, k, v, s, l)
    torch.testing.assert_close(kernels.decode_attention_cpu(q, k, v, s, l), ref, rtol=1e-5, atol=1e-5)
    print("ok")
"""


def test_env_forces_the_torch_path(tmp_path):
    r = _python(CHECK, GHMPI_CPU_KERNEL="torch", GHMPI_KERNEL_CACHE=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "torch fallback (GHMPI_CPU_KERNEL=torch)" in r.stdout and "ok" in r.stdout
    assert not any(tmp_path.iterdir())  # nothing built


def test_build_failure_falls_back_with_a_reason(tmp_path):
    r = _python(CHECK, CXX=str(tmp_path / "no-such-compiler"), GHMPI_KERNEL_CACHE=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "torch fallback (native kernel unavailable:" in r.stdout and "ok" in r.stdout


@native
def test_portable_build_and_concurrent_builds_share_one_cache(tmp_path):
    """Three processes build the portable (non-AVX) variant into an empty cache at once: all
    load it, and the cache holds one library."""
    env = {"GHMPI_CPU_KERNEL": "portable", "GHMPI_KERNEL_CACHE": str(tmp_path)}
    e = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(CHECK)], env=e, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        assert "native kernel (portable" in out and "ok" in out
    assert len(list(tmp_path.glob("*/*.so"))) == 1
    assert not list(tmp_path.glob("*/build-*"))  # private build directories are removed


@native
def test_builds_without_ninja(tmp_path):
    """Offline nodes may lack the ninja package: the build then runs the compiler directly."""
    code = "from torch.utils import cpp_extension\ncpp_extension.is_ninja_available = lambda: False\n"
    r = _python(code + textwrap.dedent(CHECK), GHMPI_KERNEL_CACHE=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "native kernel (avx512" in r.stdout or "native kernel (portable" in r.stdout
    assert "ok" in r.stdout


@native
def test_an_installed_copy_builds_the_kernel(tmp_path):
    """`pip install .` (not editable, as a cluster's shared environment may be) ships the kernels'
    sources, so an installed ghmpi builds its native kernel at first use as a checkout does."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(ROOT / "setup.py", src)
    shutil.copytree(ROOT / "ghmpi", src / "ghmpi", ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                        "--no-build-isolation", "--target", str(site), str(src)],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    code = "from ghmpi import kernels; print(kernels.__file__)\n" + textwrap.dedent(CHECK)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site),
                                          "GHMPI_KERNEL_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(str(site)), r.stdout  # the installed copy, not this checkout
    assert "native kernel (" in r.stdout and "ok" in r.stdout, r.stdout


def test_the_build_key_covers_the_headers(tmp_path, monkeypatch):
    """The kernels' headers (exp512.h) are part of the cache key: a changed header is a new
    library, not a stale one loaded from the cache."""
    for f in [*build.SOURCE_DIR.glob("*.cpp"), *build.SOURCE_DIR.glob("*.h")]:
        shutil.copy(f, tmp_path)
    monkeypatch.setattr(build, "SOURCE_DIR", tmp_path)
    before = build.build_spec("ghmpi_attention", ["decode_attention.cpp"])["key"]
    with open(tmp_path / "exp512.h", "a") as f:
        f.write("\n// changed\n")
    assert build.build_spec("ghmpi_attention", ["decode_attention.cpp"])["key"] != before
