"""Fast attention kernels with a pure-torch path beside each: Triton on CUDA GPUs
(`triton_decode`, picked by `ghmpi.model.attention`), native C++ on CPUs, compiled at first use
(see `build`), with the torch path as fallback.

`decode_attention_cpu` is tier 2's attention. The native kernel is used when it builds and loads;
otherwise, or with `GHMPI_CPU_KERNEL=torch` in the environment, the same call runs on torch ops.
`describe()` says which path runs, for the job's one log line.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

from ghmpi.kernels import build

_KV_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_ENV = "GHMPI_CPU_KERNEL"  # "torch": never build or use the native kernel


class _State:
    lib: ctypes.CDLL | None = None
    path: Path | None = None
    isa = ""
    reason = ""  # why the torch path runs
    tried = False
    forced: str | None = None  # set by force(): "native" | "torch" | None (environment decides)


_state = _State()


def _load() -> ctypes.CDLL | None:
    s = _state
    if s.tried:
        return s.lib
    s.tried = True
    if os.environ.get(_ENV, "").strip().lower() == "torch":
        s.reason = f"{_ENV}=torch"
        return None
    extra = ["-DGHMPI_PORTABLE"] if os.environ.get(_ENV, "").strip().lower() == "portable" else []
    extra += os.environ.get("GHMPI_KERNEL_CFLAGS", "").split()  # experiments: a variant, own cache key
    try:
        lib, s.path, _ = build.build_or_load("ghmpi_attention", ["decode_attention.cpp"], extra)
        f = lib.ghmpi_decode_attention
        f.restype = ctypes.c_int64
        f.argtypes = ([ctypes.c_void_p] * 3 + [ctypes.c_int64] + [ctypes.c_void_p] * 2
                      + [ctypes.c_int64] * 9 + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
                      + [ctypes.c_void_p] * 2)
        lib.ghmpi_read_sum.restype = ctypes.c_double
        lib.ghmpi_read_sum.argtypes = [ctypes.c_void_p, ctypes.c_int64]
        lib.ghmpi_kernel_isa.restype = ctypes.c_char_p
        s.isa = lib.ghmpi_kernel_isa().decode()
        s.lib = lib
    except Exception as e:  # no compiler, no ninja, a compile error: the torch path still works
        msg = " ".join(str(e).split())
        s.reason = f"native kernel unavailable: {type(e).__name__}: {msg[:300]}"
    return s.lib


def force(mode: str | None) -> None:
    """For benchmarks and tests: "native" (raises if it cannot load), "torch", or None (the
    environment decides). Affects caches built afterwards."""
    if mode not in ("native", "torch", None):
        raise ValueError(f"kernel mode must be native, torch or None, got {mode!r}")
    if mode == "native" and _load() is None:
        raise RuntimeError(f"native CPU attention kernel: {_state.reason}")
    _state.forced = mode


def native_available() -> bool:
    """True when decode_attention_cpu runs the native kernel (builds it on first call)."""
    if _state.forced == "torch":
        return False
    return _load() is not None


def describe() -> str:
    """One line: which CPU attention path runs, and why."""
    if native_available():
        n = torch.get_num_threads()
        return (f"CPU attention: native kernel ({_state.isa}, {n} thread{'s' if n > 1 else ''}) "
                f"from {_state.path}")
    reason = "forced" if _state.forced == "torch" else _state.reason
    return f"CPU attention: torch fallback ({reason})"


def read_sum(x: torch.Tensor) -> float:
    """Sum of a contiguous float32 tensor, streamed by all threads with the native kernel's loads
    (a DRAM read bandwidth probe for benchmarks). Raises if the native kernel is unavailable."""
    lib = _load()
    if lib is None or x.dtype != torch.float32 or not x.is_contiguous():
        raise RuntimeError("read_sum needs the native kernel and a contiguous float32 tensor")
    return lib.ghmpi_read_sum(x.data_ptr(), x.numel())


def decode_attention_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         slots: torch.Tensor, lengths: torch.Tensor,
                         out: torch.Tensor | None = None, k_new: torch.Tensor | None = None,
                         v_new: torch.Tensor | None = None) -> torch.Tensor:
    """One new query token per row over its slot's cached context, on the CPU.

    q (B, n_heads, D) float32/bf16/fp16; k_cache, v_cache (n_slots, max_len, n_kv_heads, D) in
    float32/bf16/fp16, with the same strides and D contiguous (tier 2's KVCache is a head-major
    view, `kvcache.head_major`; a contiguous cache works too); slots, lengths (B,) int64: row b
    attends over positions [0, lengths[b]) of slot slots[b]. Scale 1/sqrt(D); query head h uses
    kv head h // n_rep. -> (B, n_heads * D) in q.dtype. Accumulates in float32. `out`: optional
    float32 (B, n_heads * D) contiguous buffer the native kernel writes (returned when q is
    float32). `k_new`, `v_new` (B, n_kv_heads, D): each row's own token, stored at position
    lengths[b] - 1 of its slot first (a decode step's append; the native kernel copies them in
    the same call).
    """
    B, H, D = q.shape
    n_slots, max_len, n_kv, Dk = k_cache.shape
    if (Dk != D or v_cache.shape != k_cache.shape or H % n_kv or slots.shape != (B,)
            or lengths.shape != (B,)):
        raise ValueError(f"decode_attention_cpu: q {tuple(q.shape)}, k {tuple(k_cache.shape)}, "
                         f"v {tuple(v_cache.shape)}, slots {tuple(slots.shape)}, "
                         f"lengths {tuple(lengths.shape)} do not fit")
    lib = _load() if _state.forced != "torch" else None
    if (lib is None or k_cache.dtype not in _KV_TYPES or v_cache.dtype != k_cache.dtype
            or k_cache.stride() != v_cache.stride() or k_cache.stride(3) != 1):
        if k_new is not None:
            k_cache[slots, lengths - 1] = k_new.to(k_cache.dtype)
            v_cache[slots, lengths - 1] = v_new.to(v_cache.dtype)
        return _decode_attention_torch(q, k_cache, v_cache, slots, lengths)
    q32 = _as(q, torch.float32)  # (B, H, D)
    slots, lengths = _as(slots, torch.int64), _as(lengths, torch.int64)
    if k_new is not None:  # (B, n_kv, D) in the cache's dtype, as the kernel copies them
        k_new, v_new = _as(k_new, k_cache.dtype), _as(v_new, k_cache.dtype)
        if k_new.shape != (B, n_kv, D) or v_new.shape != (B, n_kv, D):
            raise ValueError(f"decode_attention_cpu: k_new {tuple(k_new.shape)}, v_new "
                             f"{tuple(v_new.shape)}: need ({B}, {n_kv}, {D})")
    if out is None or out.dtype != torch.float32 or out.shape != (B, H * D) or not out.is_contiguous():
        out = torch.empty(B, H * D, dtype=torch.float32)
    rc = lib.ghmpi_decode_attention(
        q32.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), _KV_TYPES[k_cache.dtype],
        slots.data_ptr(), lengths.data_ptr(), B, H, n_kv, D, n_slots, max_len,
        *k_cache.stride()[:3], out.data_ptr(), 0, int(q.dtype == torch.bfloat16),
        None if k_new is None else k_new.data_ptr(), None if v_new is None else v_new.data_ptr())
    if rc != 0:
        b = -rc - 1
        raise IndexError(f"decode_attention_cpu: row {b}: slot {int(slots[b])}, length "
                         f"{int(lengths[b])} out of range ({n_slots} slots x {max_len} positions)")
    return out if q.dtype == torch.float32 else out.to(q.dtype)


class _Progress:
    lib: ctypes.CDLL | None = None
    reason = ""  # why there is none
    tried = False


_progress = _Progress()


def progress_library() -> ctypes.CDLL | None:
    """The native MPI progress thread (`progress.cpp`), built at first use like the attention
    kernel, or None (`progress_reason()` says why; `GHMPI_PROGRESS_NATIVE=0`: never)."""
    p = _progress
    if p.tried:
        return p.lib
    p.tried = True
    if os.environ.get("GHMPI_PROGRESS_NATIVE", "").strip() == "0":
        p.reason = "GHMPI_PROGRESS_NATIVE=0"
        return None
    try:
        lib, _, _ = build.build_or_load("ghmpi_progress", ["progress.cpp"])
        lib.ghmpi_progress_start.restype = ctypes.c_int
        lib.ghmpi_progress_start.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int,
                                             ctypes.c_int, ctypes.c_int64]
        lib.ghmpi_progress_stop.restype = None
        lib.ghmpi_progress_stop.argtypes = []
        vp, i64, ip, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_ssize_t, ctypes.c_int
        for name, res, args in (  # receiving ahead (transport.NativeInbox)
                ("ghmpi_inbox_open", c_int, [vp] * 4 + [ip] * 2 + [c_int] * 5),
                ("ghmpi_inbox_close", i64, []),
                ("ghmpi_inbox_lend", i64, [vp, i64]),
                ("ghmpi_inbox_retire_below", i64, [i64, vp, i64]),
                ("ghmpi_inbox_take", c_int, [vp]),
                ("ghmpi_inbox_release", None, [i64])):
            f = getattr(lib, name)
            f.restype, f.argtypes = res, args
        p.lib = lib
    except Exception as e:  # no compiler: the Python thread does the same, holding the GIL
        p.reason = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    return p.lib


def progress_reason() -> str:
    return _progress.reason


def mpi_function(name: str) -> int | None:
    """The address of an MPI function in the MPI library this process loaded (for mpi4py), for
    native code that calls MPI without linking it: from the global namespace, else from the
    library itself (`build.loaded_libraries`); None where it is not found."""
    try:
        return ctypes.cast(getattr(ctypes.CDLL(None), name), ctypes.c_void_p).value
    except (AttributeError, OSError):
        pass
    for path in build.loaded_libraries(r"/libmpi[^/]*\.so"):
        try:
            return ctypes.cast(getattr(ctypes.CDLL(path), name), ctypes.c_void_p).value
        except (AttributeError, OSError):
            continue
    return None


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype, contiguous (itself when it is already: the call costs a message's worth of
    microseconds on tier 2 otherwise)."""
    if t.dtype != dtype:
        t = t.to(dtype)
    return t if t.is_contiguous() else t.contiguous()


def _decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            slots: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The same on torch ops: gather each row's context, zero past its length (a masked position
    still enters p @ V, and the cache past a row's length may hold anything), SDPA."""
    from ghmpi.model.attention import decode_attention

    T = max(int(lengths.max()), 1) if len(lengths) else 1
    k = k_cache[:, :T].index_select(0, slots)  # (B, T, n_kv, D): slice first, then gather
    v = v_cache[:, :T].index_select(0, slots)
    keep = torch.arange(T)[None, :] < lengths[:, None]  # (B, T)
    k.masked_fill_(~keep[:, :, None, None], 0)
    v.masked_fill_(~keep[:, :, None, None], 0)
    return decode_attention(q, k, v, lengths)
