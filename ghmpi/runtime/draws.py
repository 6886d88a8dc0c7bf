"""The last slice's step after the head: logits -> tokens (+ log-probabilities), and their trip home.

A pass's rows each sample one token per *draw*: a decode row draws once, a prompt admitted for
several samples draws once per sample from the same logits (its prefill is shared, each sample's
draw has its own random stream, ghmpi/model/sampling.py). Each draw depends only on the row's
settings, seed, prompt index, sample index and position, so the result is the same whatever the
batch, slice count or world size.

Log-probabilities are those of the raw distribution (log-softmax of the logits before temperature
and filtering, as vLLM returns by default). A prompt's own log-probabilities (`prompt_logprobs`)
are computed from the pass's last hidden states a chunk of positions at a time, so a long prompt
never holds its (L, vocab) logits at once.

The result travels to slice 0 as one TAG_TOKENS message: header [mb, m, flags, k, n_plp,
m tokens, n_plp prompt lengths], payload float32 [logprobs (m), top ids as float-free int32
(m, k), top logprobs (m, k), prompt log-probabilities].
"""

from __future__ import annotations

import numpy as np
import torch

from ghmpi.comm import transport as tp
from ghmpi.model.sampling import sample_rows
from ghmpi.runtime.scheduler import Draws, Row

__all__ = ["choose", "prompt_logprobs", "encode_draws", "decode_draws", "PROMPT_CHUNK"]

PROMPT_CHUNK = 256  # positions whose logits are held at once for prompt log-probabilities


def choose(logits: torch.Tensor, rows: list[Row], logprobs_k: int | None) -> Draws:
    """logits (rows, vocab) float32 -> one token per draw; with logprobs_k not None also the
    chosen tokens' log-probabilities and the top logprobs_k (k may be 0)."""
    rep = [i for i, r in enumerate(rows) for _ in range(1 + len(r.copies))]
    same = len(rep) == len(rows)
    if all(r.params.greedy for r in rows):
        chosen = logits.argmax(dim=-1)
        if not same:
            chosen = chosen[torch.tensor(rep, device=logits.device)]
    else:
        draws = [(r, sl, sa) for r in rows for sl, sa in r.draws]
        lg = logits if same else logits[torch.tensor(rep, device=logits.device)]
        chosen = sample_rows(
            lg, torch.tensor([r.index for r, _, _ in draws]),
            torch.tensor([r.next_position for r, _, _ in draws]),
            torch.tensor([sa for _, _, sa in draws]),
            [r.params.temperature for r, _, _ in draws], [r.params.top_k for r, _, _ in draws],
            [r.params.top_p for r, _, _ in draws],
            torch.tensor([r.params.seed for r, _, _ in draws], dtype=torch.long))
    if logprobs_k is None:
        return Draws(chosen.cpu().numpy().astype(np.int64))
    lsm = torch.log_softmax(logits.float(), dim=-1)  # (rows, vocab)
    if not same:
        lsm = lsm[torch.tensor(rep, device=logits.device)]
    lp = lsm.gather(-1, chosen[:, None]).squeeze(-1)
    out = Draws(chosen.cpu().numpy().astype(np.int64), lp.cpu().numpy().astype(np.float32))
    if logprobs_k > 0:
        vals, ids = lsm.topk(logprobs_k, dim=-1)
        out.top_ids = ids.to(torch.int32).cpu().numpy()
        out.top_logprobs = vals.cpu().numpy().astype(np.float32)
    return out


def prompt_logprobs(classify, x: torch.Tensor, rows: list[Row]) -> list[np.ndarray]:
    """For each prefill row that asks (`Row.prompt_logprobs`), in row order: its prompt tokens'
    log-probabilities (L,) float32, NaN at position 0. x (n, dim): the pass's hidden states after
    the last layer; `classify` maps (c, dim) -> (c, vocab) float32 logits."""
    out = []
    at = 0
    for r in rows:
        a, at = at, at + r.ntok
        if not r.prompt_logprobs:
            continue
        L = r.ntok
        tokens = torch.as_tensor(np.asarray(r.tokens, dtype=np.int64), device=x.device)
        res = torch.full((L,), float("nan"), dtype=torch.float32, device=x.device)
        for c in range(0, L - 1, PROMPT_CHUNK):
            e = min(c + PROMPT_CHUNK, L - 1)
            lsm = torch.log_softmax(classify(x[a + c:a + e]).float(), dim=-1)  # (e-c, vocab)
            res[c + 1:e + 1] = lsm.gather(-1, tokens[c + 1:e + 1, None]).squeeze(-1)
        out.append(res.cpu().numpy())
    return out


def encode_draws(mb: int, d: Draws) -> np.ndarray:
    m = len(d.tokens)
    flags = (d.logprobs is not None) | (d.top_ids is not None) << 1
    k = d.top_ids.shape[1] if d.top_ids is not None else 0
    plens = [len(p) for p in d.prompt_logprobs]
    header = [mb, m, int(flags), k, len(plens), *np.asarray(d.tokens).tolist(), *plens]
    payload = []
    if d.logprobs is not None:
        payload.append(np.asarray(d.logprobs, dtype=np.float32))
    if d.top_ids is not None:
        payload += [np.ascontiguousarray(d.top_ids, dtype=np.int32),
                    np.ascontiguousarray(d.top_logprobs, dtype=np.float32)]
    payload += [np.asarray(p, dtype=np.float32) for p in d.prompt_logprobs]
    return tp.pack(header, payload)


def decode_draws(header: np.ndarray, payload: np.ndarray) -> tuple[int, Draws]:
    mb, m, flags, k, n_plp = (int(w) for w in header[:5])
    tokens = np.asarray(header[5:5 + m])
    plens = [int(w) for w in header[5 + m:5 + m + n_plp]]
    buf = np.frombuffer(payload.tobytes(), dtype=np.uint8)
    at = 0

    def take(dtype, count: int) -> np.ndarray:
        nonlocal at
        n = count * np.dtype(dtype).itemsize
        out = buf[at:at + n].view(dtype)
        at += n
        return out

    d = Draws(tokens)
    if flags & 1:
        d.logprobs = take(np.float32, m)
    if flags & 2:
        d.top_ids = take(np.int32, m * k).reshape(m, k)
        d.top_logprobs = take(np.float32, m * k).reshape(m, k)
    d.prompt_logprobs = [take(np.float32, n) for n in plens]
    return mb, d
