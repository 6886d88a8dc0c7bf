"""OpenAI batch files, and the per-prompt settings of JSONL lines.

Input (`prepare`): a batch-input line `{"custom_id", "method", "url", "body"}` is read as the
plain JSONL line its body makes: `body.messages` (chat, url /v1/chat/completions) or
`body.prompt` (url /v1/completions), `max_tokens` (or `max_completion_tokens`), `temperature`,
`top_p`, `seed`, `n`, `stop`, `logprobs` and `top_logprobs` (for /v1/completions `logprobs` is
the number of top log-probabilities), and `custom_id`; other body fields are ignored.

Output (`export --format openai`): one batch-output line per prompt, in prompt order:
`{"id", "custom_id", "response": {"status_code": 200, "request_id", "body"}, "error": null}`,
the body a `chat.completion` (chat requests) or `text_completion` object with one choice per
sample (`index`, the text as `message.content` or `text`, `finish_reason` "stop" or "length",
and `logprobs` when the request asked for them and the completions hold them) and `usage`
(`prompt_tokens`, `completion_tokens` over all samples, `total_tokens`).
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import numpy as np

from ghmpi.errors import InputError
from ghmpi.io.requests import MAX_N, MAX_TOP_LOGPROBS

__all__ = ["request_body", "settings_of", "response_line"]


def request_body(obj: dict, where: str) -> tuple[dict, bool]:
    """A batch-input line -> (the plain line its body makes, whether it is a chat request)."""
    cid, body, url = obj.get("custom_id"), obj.get("body"), obj.get("url", "")
    if not isinstance(cid, str):
        raise InputError(f"{where}: \"custom_id\" must be a string")
    if not isinstance(body, dict):
        raise InputError(f"{where}: \"body\" must be a JSON object")
    if not isinstance(url, str):
        raise InputError(f"{where}: \"url\" must be a string")
    chat = url.endswith("/chat/completions") or (not url and "messages" in body)
    if url and not (chat or url.endswith("/completions")):
        raise InputError(f"{where}: url {url!r} is not /v1/chat/completions or /v1/completions")
    out = {k: body[k] for k in ("prompt", "messages", "temperature", "top_p", "top_k", "seed",
                                "n", "stop") if k in body and body[k] is not None}
    out["custom_id"] = cid
    for key in ("max_tokens", "max_completion_tokens"):
        if body.get(key) is not None:
            out["max_tokens"] = body[key]
    if "messages" in out and isinstance(out["messages"], list):
        out["messages"] = [_flat_message(m) for m in out["messages"]]
    lp = body.get("logprobs")
    if chat:
        if lp:
            out["logprobs"] = True
            out["top_logprobs"] = body.get("top_logprobs") or 0
    elif lp is not None and lp is not False:  # legacy completions: an int, the top count
        out["logprobs"] = True
        out["top_logprobs"] = 0 if lp is True else lp
    return out, chat


def _flat_message(m: Any) -> Any:
    """Content given as a list of text parts -> one string (other parts are not supported)."""
    if isinstance(m, dict) and isinstance(m.get("content"), list):
        parts = m["content"]
        if all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
               for p in parts):
            return {**m, "content": "".join(p["text"] for p in parts)}
    return m


def _int(obj: dict, key: str, where: str, lo: int, hi: int | None = None) -> int | None:
    v = obj.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise InputError(f"{where}: \"{key}\" must be an integer {rng}, got {v!r}")
    return v


def _float(obj: dict, key: str, where: str, ok, rule: str) -> float | None:
    v = obj.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
        raise InputError(f"{where}: \"{key}\" must be {rule}, got {v!r}")
    return float(v)


def settings_of(obj: dict, where: str) -> dict[str, Any]:
    """The per-prompt settings of a JSONL line (dataset name -> value, None when not given),
    checked. `max_tokens` is an alias of `max_new_tokens`."""
    mnt = _int(obj, "max_new_tokens", where, 1)
    alias = _int(obj, "max_tokens", where, 1)
    if mnt is not None and alias is not None and mnt != alias:
        raise InputError(f"{where}: \"max_new_tokens\" ({mnt}) and its alias \"max_tokens\" "
                         f"({alias}) differ")
    stop = obj.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise InputError(f"{where}: \"stop\" must be a non-empty string or a list of them")
        stop = json.dumps(stop, ensure_ascii=False)
    lp, top = obj.get("logprobs"), _int(obj, "top_logprobs", where, 0, MAX_TOP_LOGPROBS)
    if lp is None or lp is False:
        logprobs = None
    elif lp is True:
        logprobs = top or 0
    else:
        logprobs = _int(obj, "logprobs", where, 0, MAX_TOP_LOGPROBS)
    cid = obj.get("custom_id")
    if cid is not None and not isinstance(cid, str):
        raise InputError(f"{where}: \"custom_id\" must be a string")
    top_k = obj.get("top_k")
    return {
        "max_new_tokens": mnt if mnt is not None else alias,
        "temperature": _float(obj, "temperature", where, lambda v: v >= 0, "a number >= 0"),
        "top_p": _float(obj, "top_p", where, lambda v: 0 < v <= 1, "a number in (0, 1]"),
        "top_k": 0 if top_k == -1 else _int(obj, "top_k", where, 0),  # vLLM's -1: off
        "seed": _int(obj, "seed", where, 0),
        "n": _int(obj, "n", where, 1, MAX_N),
        "stop": stop,
        "logprobs": logprobs,
        "custom_id": cid,
    }


# ---- output --------------------------------------------------------------------------------------

def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the character a byte-level BPE token uses for each
    byte -> the byte."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    k = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + k)
            k += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTES = _byte_decoder()


def _token_bytes(tok: Any, cache: dict, i: int) -> tuple[str, bytes]:
    """(text, bytes) of one token: its exact bytes for byte-level BPE (a token holding part of a
    UTF-8 character is named "bytes:\\xNN..." as the OpenAI API does), else its decoded text."""
    t = cache.get(i)
    if t is None:
        piece = tok.convert_ids_to_tokens(int(i))
        if isinstance(piece, str) and piece and all(c in _BYTES for c in piece):
            raw = bytes(_BYTES[c] for c in piece)
        else:
            raw = tok.decode([int(i)], skip_special_tokens=False).encode()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        t = cache[i] = (text, raw)
    return t


def _token_text(tok: Any, cache: dict, i: int) -> str:
    return _token_bytes(tok, cache, i)[0]


def _logprobs(tok: Any, cache: dict, chat: bool, ids: np.ndarray, extra: dict, k: int) -> dict:
    lps = extra["logprobs"]
    top_ids = extra.get("top_logprob_ids")
    top_lps = extra.get("top_logprobs")
    texts = [_token_text(tok, cache, i) for i in ids]
    tops = [[(_token_text(tok, cache, j), float(v)) for j, v in
             zip(top_ids[t][:k], top_lps[t][:k])] if top_ids is not None and k else []
            for t in range(len(ids))]
    if chat:
        def raw(i: int) -> list[int]:
            return list(_token_bytes(tok, cache, int(i))[1])

        return {"content": [{"token": s, "logprob": float(lp), "bytes": raw(i),
                             "top_logprobs": [{"token": _token_text(tok, cache, j), "logprob": float(v),
                                               "bytes": raw(j)}
                                              for j, v in zip(top_ids[t][:k], top_lps[t][:k])]
                             if top_ids is not None and k else []}
                            for t, (s, lp, i) in enumerate(zip(texts, lps, ids))]}
    offsets, at = [], 0
    for s in texts:
        offsets.append(at)
        at += len(s)
    return {"tokens": texts, "token_logprobs": [float(x) for x in lps],
            "top_logprobs": [dict(top) for top in tops] if k else None, "text_offset": offsets}


def response_line(i: int, custom_id: str, chat: bool, model: str, prompt_len: int,
                  samples: list[tuple[str, np.ndarray, str, dict]], tok: Any, logprobs_k: int | None,
                  created: int | None = None, cache: dict | None = None) -> dict:
    """One batch-output line for prompt i: samples are (text, ids, finish_reason name, per-token
    extras); logprobs_k: None = not asked, else the top count to report."""
    cache = {} if cache is None else cache
    created = int(time.time()) if created is None else created
    choices = []
    for s, (text, ids, reason, extra) in enumerate(samples):
        lp = (_logprobs(tok, cache, chat, ids, extra, logprobs_k)
              if logprobs_k is not None and "logprobs" in extra else None)
        if chat:
            choices.append({"index": s, "message": {"role": "assistant", "content": text},
                            "logprobs": lp, "finish_reason": reason})
        else:
            choices.append({"index": s, "text": text, "logprobs": lp, "finish_reason": reason})
    completion = int(sum(len(x[1]) for x in samples))
    body = {"id": f"{'chatcmpl' if chat else 'cmpl'}-ghmpi-{i}",
            "object": "chat.completion" if chat else "text_completion",
            "created": created, "model": model, "choices": choices,
            "usage": {"prompt_tokens": prompt_len, "completion_tokens": completion,
                      "total_tokens": prompt_len + completion}}
    return {"id": f"batch_req_ghmpi_{i}", "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": f"ghmpi-{i}", "body": body},
            "error": None}
