"""Batch features through the CLI on real files (issue 11): per-prompt settings, several samples
per prompt, log-probabilities, prompt log-probabilities, stop strings, OpenAI batch files.
Greedy float32 results are checked against transformers, sampled ones across layouts."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
import torch

from e2e_jobs import MODEL, REPO, ghmpi, write_job
from ghmpi.io.prompts import PromptFile, write_prompts

JOB_MAX_NEW = 16
MAX_NEW = [0, 5, 0, 12, 0, 9]  # 0: the job's value
STOPS = ["", '[" AN"]', "", "", '["ens", "the"]', '[]']  # "": the job's, []: none
JOB_STOP = ["ic"]


def shipped(k: int) -> list[np.ndarray]:
    with PromptFile(REPO / "data" / "prompts.h5") as pf:
        return [t for _, t, _ in pf.iter_prompts()][:k]


@pytest.fixture(scope="module")
def greedy_prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("batch") / "greedy.h5"
    write_prompts(path, shipped(6), max_new_tokens=MAX_NEW, stop=STOPS)
    return path


def read(path) -> dict:
    with h5py.File(path, "r") as f:
        out = {k: f[k][:] for k in f.keys()}
        out["attrs"] = dict(f.attrs)
    o = out["offsets"]
    out["rows"] = [out["tokens"][a:b].tolist() for a, b in zip(o[:-1], o[1:])]
    return out


@pytest.fixture(scope="module")
def hf_greedy():
    """transformers' generate per prompt with its own max_new_tokens and stop strings, cut as
    documented (the ids before the first token overlapping the stop string), with the logits
    of every step and a forward over each prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    ref = []
    with torch.no_grad():
        for p, mnt, stop in zip(shipped(6), MAX_NEW, STOPS):
            stops = JOB_STOP if stop == "" else json.loads(stop)
            ids = torch.tensor(np.asarray(p, dtype=np.int64))[None]
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=mnt or JOB_MAX_NEW, pad_token_id=1,
                                 stop_strings=stops or None, tokenizer=tok,
                                 output_logits=True, return_dict_in_generate=True)
            new = out.sequences[0, ids.shape[1]:].tolist()
            lsm = torch.log_softmax(torch.cat(out.logits).float(), dim=-1)  # (steps, vocab)
            text = tok.decode(new, skip_special_tokens=True)
            found = [text.find(s) for s in stops if s in text]
            keep, reason = len(new), (1 if new[-1] == 1 else 2)
            if found:
                keep = 0
                while keep < len(new) and len(tok.decode(new[:keep + 1],
                                                         skip_special_tokens=True)) <= min(found):
                    keep += 1
                reason = 3
            full = torch.log_softmax(model(ids).logits[0].float(), dim=-1)  # (L, vocab)
            plp = [math.nan] + full[:-1].gather(-1, ids[0, 1:, None]).squeeze(-1).tolist()
            ref.append({"tokens": new[:keep], "reason": reason, "lsm": lsm, "plp": plp,
                        "full": new})
    assert {r["reason"] for r in ref} >= {2, 3}, "the reference should cover stop strings"
    return ref


@pytest.mark.parametrize("world,slices,keep", [(1, 1, False), (3, 2, True)],
                         ids=["n1-strip", "n3-s2-keep"])
def test_greedy_settings_logprobs_stops_equal_transformers(tmp_path, greedy_prompts, hf_greedy,
                                                           world, slices, keep):
    out = tmp_path / "c.h5"
    job = write_job(tmp_path / "job.yaml", greedy_prompts, out,
                    generation={"max_new_tokens": JOB_MAX_NEW, "logprobs": 3,
                                "prompt_logprobs": True, "stop": JOB_STOP,
                                "include_stop_str": keep},
                    topology={"slices": slices})
    r = ghmpi(world, "-c", str(job))
    assert r.returncode == 0, r.stderr
    got = read(out)
    want_rows = [h["full"] if keep else h["tokens"] for h in hf_greedy]
    assert got["rows"] == want_rows
    assert got["finish_reason"].tolist() == [h["reason"] for h in hf_greedy]
    o = got["offsets"]
    for i, h in enumerate(hf_greedy):
        lp = got["logprobs"][o[i]:o[i + 1]]
        lsm = h["lsm"][:len(want_rows[i])]
        want = lsm.gather(-1, torch.tensor(want_rows[i], dtype=torch.long)[:, None])
        np.testing.assert_allclose(lp, want.squeeze(-1).numpy(), atol=1e-4)
        top_vals, top_ids = lsm.topk(3, dim=-1)
        np.testing.assert_allclose(got["top_logprobs"][o[i]:o[i + 1]], top_vals.numpy(), atol=1e-4)
        assert got["top_logprob_ids"][o[i]:o[i + 1]].tolist() == top_ids.tolist()
    plp = np.concatenate([h["plp"] for h in hf_greedy]).astype(np.float32)
    np.testing.assert_allclose(got["prompt_logprobs"], plp, atol=1e-4)  # NaN where NaN
    assert "n" not in got and got["attrs"]["n"] == 1


SAMPLED = dict(n=[2, 0, 3, 1], temperature=[math.nan, 0.7, math.nan, 1.2],
               seed=[-1, 11, -1, -1], top_k=[-1, -1, 20, -1])


def test_samples_identical_across_layouts(tmp_path):
    prompts = tmp_path / "p.h5"
    write_prompts(prompts, shipped(4), **SAMPLED)
    results = []
    layouts = [(1, 1, 1, 8, 0, 7), (3, 2, 2, 3, 0, 7), (4, 1, 3, 2, 0, 7), (3, 1, 2, 4, 2, 7),
               (1, 1, 1, 8, 0, 8)]
    for world, slices, mbs, size, hybrid, seed in layouts:
        out = tmp_path / f"{world}-{slices}-{mbs}-{seed}.h5"
        job = write_job(tmp_path / "job.yaml", prompts, out,
                        generation={"max_new_tokens": 10, "n": 2, "temperature": 0.9,
                                    "top_p": 0.95, "seed": seed, "logprobs": 1},
                        topology={"slices": slices, "micro_batches": mbs,
                                  "micro_batch_size": size, "hybrid_slots": hybrid})
        r = ghmpi(world, "-c", str(job))
        assert r.returncode == 0, r.stderr
        results.append(read(out))
    first = results[0]
    assert first["n"].tolist() == [2, 2, 3, 1] and len(first["rows"]) == 8
    for other in results[1:4]:
        assert other["rows"] == first["rows"]
        assert other["finish_reason"].tolist() == first["finish_reason"].tolist()
        np.testing.assert_allclose(other["logprobs"], first["logprobs"], atol=1e-4)
    rows = first["rows"]
    assert rows[0] != rows[1] and rows[2] != rows[3] and len({str(r) for r in rows[4:7]}) == 3
    reseeded = results[4]["rows"]  # job seed 8: prompt 1 keeps its own seed 11
    assert reseeded[2:4] == rows[2:4]
    assert reseeded[0:2] != rows[0:2] and reseeded[4:] != rows[4:]


BATCH = [
    {"custom_id": "chat-1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "tiny", "messages": [{"role": "user", "content": "Hello there"}],
              "max_tokens": 8, "n": 2, "temperature": 0.8, "seed": 3, "logprobs": True,
              "top_logprobs": 2}},
    {"custom_id": "cmpl-2", "method": "POST", "url": "/v1/completions",
     "body": {"model": "tiny", "prompt": "The license", "max_tokens": 20, "stop": [" AN"]}},
    {"custom_id": "cmpl-3", "method": "POST", "url": "/v1/completions",
     "body": {"model": "tiny", "prompt": "Once upon a time", "logprobs": 1}},
]


def test_openai_batch_round_trip(tmp_path):
    from tokenizers import Tokenizer

    src = tmp_path / "batch.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in BATCH))
    prompts = tmp_path / "p.h5"
    r = ghmpi(0, "prepare", str(src), "-m", str(MODEL), "-o", str(prompts))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "c.h5"
    job = write_job(tmp_path / "job.yaml", prompts, out, generation={"max_new_tokens": 12})
    r = ghmpi(2, "-c", str(job))
    assert r.returncode == 0, r.stderr
    got = read(out)
    assert got["n"].tolist() == [2, 1, 1]
    assert got["finish_reason"][2] == 3  # " AN" stops prompt 1 (see the greedy test)
    res = tmp_path / "results.jsonl"
    r = ghmpi(0, "export", str(out), "-p", str(prompts), "-m", str(MODEL), "-o", str(res),
              "--format", "openai")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(l) for l in res.read_text().splitlines()]
    tok = Tokenizer.from_file(str(MODEL / "tokenizer.json"))
    assert [l["custom_id"] for l in lines] == ["chat-1", "cmpl-2", "cmpl-3"]
    row = 0
    for line, req in zip(lines, BATCH):
        assert line["response"]["status_code"] == 200 and line["error"] is None
        body = line["response"]["body"]
        chat = req["url"].endswith("chat/completions")
        assert body["object"] == ("chat.completion" if chat else "text_completion")
        assert len(body["choices"]) == req["body"].get("n", 1)
        total = 0
        for c in body["choices"]:
            ids = got["rows"][row]
            text = c["message"]["content"] if chat else c["text"]
            assert text == tok.decode(ids, skip_special_tokens=True)
            assert c["finish_reason"] == ("length" if got["finish_reason"][row] == 2 else "stop")
            if "logprobs" in req["body"]:
                lps = [x["logprob"] for x in c["logprobs"]["content"]] if chat else \
                    c["logprobs"]["token_logprobs"]
                np.testing.assert_allclose(lps, got["logprobs"][got["offsets"][row]:
                                                                 got["offsets"][row + 1]])
                if chat:
                    assert all(len(x["top_logprobs"]) == 2 for x in c["logprobs"]["content"])
            else:
                assert c["logprobs"] is None
            total += len(ids)
            row += 1
        assert body["usage"]["completion_tokens"] == total
        assert body["usage"]["total_tokens"] == total + body["usage"]["prompt_tokens"]
    # the ghmpi format: one line per prompt, a list of completions
    res2 = tmp_path / "results2.jsonl"
    r = ghmpi(0, "export", str(out), "-p", str(prompts), "-m", str(MODEL), "-o", str(res2))
    assert r.returncode == 0, r.stderr
    lines = [json.loads(l) for l in res2.read_text().splitlines()]
    assert [len(l["completions"]) for l in lines] == [2, 1, 1]
    assert [l["custom_id"] for l in lines] == ["chat-1", "cmpl-2", "cmpl-3"]
