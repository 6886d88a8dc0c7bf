"""Batch features on plain data (no MPI): admission of several samples per prompt, the wire
formats that carry them, log-probabilities in the store, stop strings, per-prompt settings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from ghmpi.io.completions import (FINISH_LENGTH, FINISH_STOP, FINISH_STOP_STRING,
                                  CompletionFile, CompletionStore)
from ghmpi.io.prompts import PromptFile, write_prompts
from ghmpi.model.sampling import sample, sample_rows
from ghmpi.runtime import admission
from ghmpi.runtime.draws import choose, decode_draws, encode_draws, prompt_logprobs
from ghmpi.runtime.passplan import build_plan
from ghmpi.runtime.scheduler import Draws, Params, Request, Row, Scheduler
from ghmpi.runtime.stopstrings import StopStrings, cut_at_stop
from ghmpi.runtime.wire import (Copies, Shipment, WireFormat, Work, coalesce, packed_qkv,
                                rows_from_header, rows_header, split_qkv)
from ghmpi.comm import transport as tp

REPO = Path(__file__).resolve().parents[2]


def scheduler(requests, slots=(range(0, 4),), **kw) -> Scheduler:
    return Scheduler(requests, list(slots), 3, [1], [], False, 100, 1000, **kw)


def test_samples_share_one_prefill_and_wait_for_free_slots() -> None:
    p = np.arange(2, 7, dtype=np.int32)
    s = scheduler([Request(0, p, None, None, (0, 1, 2), 0), Request(1, p[:2], 2, None, (0, 1), 3)],
                  prompt_logprobs=True)
    rows = s.plan(0)
    assert [(r.slot, r.sample, r.copies, r.prompt_logprobs) for r in rows] == [
        (0, 0, ((1, 1), (2, 2)), True), (3, 0, (), True)]  # prompt 1's sample 1 has no slot yet
    d = Draws(np.array([5, 6, 7, 8]), np.full(4, -1.0, np.float32),
              prompt_logprobs=[np.zeros(5, np.float32), np.zeros(2, np.float32)])
    assert s.commit(rows, d) == []
    assert [s.active[k].generated for k in range(4)] == [[5], [6], [7], [8]]
    assert s.active[0].prompt_logprobs is not None and s.active[1].prompt_logprobs is None
    assert [s.active[k].row for k in range(4)] == [0, 1, 2, 3]
    rows = s.plan(0)
    assert all(not r.prefill for r in rows) and len(rows) == 4
    fin = s.commit(rows, Draws(np.array([9, 9, 9, 9]), np.zeros(4, np.float32)))
    assert [(f.row, f.tokens, f.reason) for f in fin] == [(3, [8, 9], FINISH_LENGTH)]
    rows = s.plan(0)  # prompt 1's sample 1 takes the freed slot, prefilled again
    assert rows[-1].prefill and rows[-1].slot == 3 and rows[-1].sample == 1
    assert not rows[-1].prompt_logprobs  # only sample 0 computes them
    assert s.queue_empty


def test_requests_resume_only_missing_samples(tmp_path: Path) -> None:
    path = tmp_path / "p.h5"
    write_prompts(path, [[1, 2], [3], [4, 5, 6]], n=[2, 0, 3], temperature=[0.5, math.nan, math.nan],
                  seed=[-1, 4, -1], stop=["", '["x"]', ""])

    class G:
        n, temperature, top_k, top_p, seed, stop = 2, 0.0, 0, 1.0, 9, ("y",)

    with PromptFile(path) as pf:
        n = admission.samples_per_prompt(pf, G.n)
        assert n.tolist() == [2, 2, 3] and admission.row_starts(n).tolist() == [0, 2, 4]
        done = np.array([1, 1, 0, 1, 0, 1, 0], bool)
        reqs = list(admission.requests(pf, done, G, n))
    assert [(r.index, r.samples, r.row0, r.stop) for r in reqs] == [
        (1, (0,), 2, ("x",)), (2, (0, 2), 4, ("y",))]
    assert reqs[0].params == Params(0.0, 0, 1.0, 4) and reqs[1].params is None


def test_rows_header_and_work_copies_round_trip() -> None:
    rows = [Row(3, 7, 0, np.array([5, 6, 7]), True, 0, Params(0.7, 5, 0.9, 123), ((4, 1), (9, 2)),
                True),
            Row(1, 2, 10, np.array([4]), False, 1, Params())]
    mb, back = rows_from_header(np.asarray(rows_header(2, rows), dtype=np.int64))
    assert mb == 2
    for a, b in zip(rows, back):
        assert (a.slot, a.index, a.start, a.ntok, a.prefill, a.sample, a.params, a.copies,
                a.prompt_logprobs) == (b.slot, b.index, b.start, b.ntok, b.prefill, b.sample,
                                       b.params, b.copies, b.prompt_logprobs)
    assert back[0].tokens.tolist() == [5, 6, 7]
    # a prompt's K/V cross the wire once; tier 2 gets them for each slot listed
    wire = WireFormat(torch.float32)
    kf = torch.arange(12.0).reshape(3, 2, 2)
    msg = Work(0, 1, [], [], [3, 8], [3, 1], torch.empty(0, 2, 2), torch.empty(0, 2, 2),
               torch.empty(0, 2, 2), [kf, kf[:1]], [kf, kf[:1]], [[4, 9], []]).encode(wire)
    w = Work.decode(wire, msg, 2, 2, 2)
    assert w.fill_slots.tolist() == [3, 4, 9, 8] and w.fill_len.tolist() == [3, 3, 3, 1]
    assert torch.equal(w.kf, torch.cat([kf, kf, kf, kf[:1]]))
    # the pass plan sends it once per owner and stores it locally for each local slot
    owner = np.array([-1, -1, 5, 5, 6, 6])
    local_index = np.array([0, 1, -1, -1, -1, -1])
    row = Row(0, 0, 0, np.array([1, 2]), True, 0, Params(), ((1, 1), (2, 2), (3, 3), (4, 4)))
    plan = build_plan([row], owner, local_index, torch.device("cpu"))
    assert plan.local_prefill == [(0, 0, 2), (1, 0, 2)]  # (cache row, start token, length)
    assert [(sh.owner, sh.fill_slots, sh.fill_copies) for sh in plan.remote] == [
        (5, [2], [[3]]), (6, [4], [[]])]


def test_work_with_prompt_chunks_round_trips() -> None:
    """Decode rows, a fill with a copy and two prompt chunks in one record: every field comes
    back, and the reply asks for the decode rows then the chunks' rows."""
    wire = WireFormat(torch.float32)
    g = torch.Generator().manual_seed(0)
    H, KV, D = 4, 2, 3
    q, k, v = (torch.randn(2, h, D, generator=g) for h in (H, KV, KV))
    kf, vf = torch.randn(3, KV, D, generator=g), torch.randn(3, KV, D, generator=g)
    qc = [torch.randn(n, H, D, generator=g) for n in (4, 2)]
    kc = [torch.randn(n, KV, D, generator=g) for n in (4, 2)]
    vc = [torch.randn(n, KV, D, generator=g) for n in (4, 2)]
    out = Work(3, 5, [1, 2], [9, 12], [6], [3], q, k, v, [kf], [vf], [[7]],
               chunk_slots=[4, 0], chunk_pos=[8, 20], chunk_len=[4, 2], qc=qc, kc=kc, vc=vc)
    assert out.n_reply == 2 + 6
    w = Work.decode(wire, out.encode(wire), H, KV, D)
    assert (w.mb, w.layer, w.n_reply) == (3, 5, 8)
    assert w.dec_slots.tolist() == [1, 2] and w.dec_pos.tolist() == [9, 12]
    assert w.fill_slots.tolist() == [6, 7] and w.fill_len.tolist() == [3, 3]
    assert torch.equal(w.kf, torch.cat([kf, kf])) and torch.equal(w.vf, torch.cat([vf, vf]))
    assert (w.chunk_slots.tolist(), w.chunk_pos.tolist(), w.chunk_len.tolist()) == (
        [4, 0], [8, 20], [4, 2])
    for got, want in [(w.q, q), (w.k, k), (w.v, v), (w.qc, torch.cat(qc)), (w.kc, torch.cat(kc)),
                      (w.vc, torch.cat(vc))]:
        assert torch.equal(got, want)
    # chunks only (no decode rows, no fills), as a pass of one long prompt sends them
    w = Work.decode(wire, Work(0, 0, [], [], [], [], q[:0], k[:0], v[:0], [], [],
                               chunk_slots=[4], chunk_pos=[8], chunk_len=[2], qc=[qc[1]],
                               kc=[kc[1]], vc=[vc[1]]).encode(wire), H, KV, D)
    assert len(w.dec_slots) == len(w.fill_slots) == 0 and w.n_reply == 2
    assert torch.equal(w.qc, qc[1]) and torch.equal(w.vc, vc[1])


def test_staged_frames_hold_the_same_bytes() -> None:
    """The prefill lane's messages are framed without waiting (`wait=False`) and sent once
    `Copies` says the copies are done: the bytes are those of a waited framing, the layer word
    patched per call, and off a GPU the copies are done at once."""
    wire = WireFormat(torch.float32)
    g = torch.Generator().manual_seed(1)
    H, KV, D = 4, 2, 3
    q, k, v = (torch.randn(5, h, D, generator=g) for h in (H, KV, KV))
    works = [Work(0, 0, [1], [7], [2], [4], q[:1], k[:1], v[:1], [k[1:5]], [v[1:5]]),
             Work(0, 0, [3], [9], [], [], q[1:2], k[1:2], v[1:2], [], [])]
    payloads = [w.parts() for w in works]
    waited = Shipment(works).frames(wire, 6, payloads, [wire.alloc] * 2)
    staged = Shipment(works).frames(wire, 6, payloads, [wire.alloc] * 2, wait=False)
    assert Copies(torch.device("cpu")).done()
    for a, b, w in zip(waited, staged, works):
        assert np.array_equal(a, b)
        got = Work.decode(wire, b, H, KV, D)
        assert got.layer == 6 and torch.equal(got.q, w.q) and torch.equal(got.k, w.k)
    assert torch.equal(Work.decode(wire, staged[0], H, KV, D).kf, k[1:5])


def test_plan_sends_later_chunks_to_their_owner() -> None:
    """A later chunk on a tier-2 slot goes to its owner with the owner's decode rows, its reply
    spans are the decode span then the chunk's; a local slot's chunk stays in plan.chunks."""
    owner = np.array([-1, 5, 5, 6])
    local_index = np.array([0, -1, -1, -1])
    rows = [Row(1, 0, 7, np.array([3]), False),
            Row(3, 1, 0, np.array([1, 2]), True, final=False),
            Row(2, 2, 4, np.array([4, 5, 6]), True, final=False),
            Row(0, 3, 6, np.array([7, 8]), True)]
    plan = build_plan(rows, owner, np.array(local_index), torch.device("cpu"))
    assert plan.chunks == [(6, 8, 0, 6)]  # (tokens, local cache row, position)
    assert plan.local_prefill == [] and plan.prefill == slice(1, 3)
    sh5, sh6 = plan.remote
    assert (sh5.owner, sh5.dec_slots, sh5.chunk_slots, sh5.chunk_pos, sh5.chunk_spans) == (
        5, [1], [2], [4], [(3, 6)])
    assert sh5.reply_spans == [slice(0, 1), slice(3, 6)]
    assert (sh6.owner, sh6.fill_slots, sh6.fill_spans, sh6.reply_spans) == (6, [3], [(1, 3)], [])


def test_draws_per_sample_streams_and_logprobs() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 50)
    p = Params(0.9, 0, 1.0, 7)
    rows = [Row(0, 4, 0, np.arange(3), True, 0, p, ((1, 1), (2, 2))),
            Row(3, 5, 8, np.array([1]), False, 1, Params())]
    d = choose(logits, rows, 3)
    assert d.tokens.shape == (4,) and d.top_ids.shape == (4, 3)
    # each draw equals the single-row draw with its own sample index
    for j, s in enumerate((0, 1, 2)):
        one = sample(logits[:1], torch.tensor([4]), torch.tensor([3]), 0.9, 0, 1.0, 7,
                     torch.tensor([s]))
        assert d.tokens[j] == int(one)
    assert d.tokens[3] == int(logits[1].argmax())
    lsm = torch.log_softmax(logits, -1)
    np.testing.assert_allclose(d.logprobs[3], lsm[1, d.tokens[3]].item(), rtol=1e-6)
    mixed = sample_rows(logits[[0, 0]], torch.tensor([4, 4]), torch.tensor([3, 3]),
                        torch.tensor([0, 0]), [0.9, 0.0], [0, 0], [1.0, 1.0],
                        torch.tensor([7, 7]))
    assert mixed[0] == d.tokens[0] and mixed[1] == logits[0].argmax()
    d.prompt_logprobs = [np.array([np.nan, -1.5], np.float32)]
    header, payload = tp.unpack(encode_draws(6, d))
    mb, back = decode_draws(header, payload)
    assert mb == 6 and back.tokens.tolist() == d.tokens.tolist()
    np.testing.assert_array_equal(back.top_logprobs, d.top_logprobs)
    np.testing.assert_array_equal(back.prompt_logprobs[0], d.prompt_logprobs[0])


def test_prompt_logprobs_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    import ghmpi.runtime.draws as dr

    monkeypatch.setattr(dr, "PROMPT_CHUNK", 2)
    torch.manual_seed(1)
    head = torch.randn(16, 4)
    x = torch.randn(7, 4)
    rows = [Row(0, 0, 0, np.array([1, 2]), True),
            Row(1, 1, 0, np.array([3, 4, 5, 6, 7]), True, prompt_logprobs=True)]
    [got] = prompt_logprobs(lambda h: h @ head.T, x, rows)
    lsm = torch.log_softmax(x[2:] @ head.T, -1)
    want = [math.nan] + [lsm[i, t].item() for i, t in enumerate([4, 5, 6, 7])]
    np.testing.assert_allclose(got, want, rtol=1e-5)


class CharTokenizer:
    """One character per id (id = code point); decode joins them."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_stop_strings_keep_or_strip() -> None:
    tok = CharTokenizer()
    ids = [ord(c) for c in "abcSTOPdef"]
    assert cut_at_stop(tok, ids, ("STOP",), keep=False) == ids[:3]
    assert cut_at_stop(tok, ids, ("STOP",), keep=True) == ids[:7]
    assert cut_at_stop(tok, ids, ("xyz", "cS"), keep=False) == ids[:2]
    assert cut_at_stop(tok, ids, ("nope",), keep=True) is None


def test_store_keeps_logprobs_in_row_order(tmp_path: Path) -> None:
    out = tmp_path / "c.h5"
    n = np.array([2, 1])
    with CompletionStore(out, 3, "job", flush_every=1) as store:
        store.add(2, [7], FINISH_STOP_STRING, {"logprobs": np.array([-0.5], np.float32),
                                               "top_logprob_ids": np.array([[7]], np.int32),
                                               "top_logprobs": np.array([[-0.5]], np.float32),
                                               "prompt_logprobs": np.array([np.nan, -2], np.float32)})
        store.add(1, [8, 9], FINISH_LENGTH, {"logprobs": np.array([-1, -2], np.float32),
                                             "top_logprob_ids": np.array([[8], [9]], np.int32),
                                             "top_logprobs": np.array([[-1], [-2]], np.float32)})
        store.add(0, [], FINISH_STOP, {"logprobs": np.zeros(0, np.float32),
                                       "top_logprob_ids": np.zeros((0, 1), np.int32),
                                       "top_logprobs": np.zeros((0, 1), np.float32),
                                       "prompt_logprobs": np.array([np.nan, -3, -4], np.float32)})
        store.finalize({}, n)
    with CompletionFile(out) as cf:
        assert cf.samples_per_prompt().tolist() == [2, 1]
        rows = list(cf.iter_rows())
        assert [r[1].tolist() for r in rows] == [[], [8, 9], [7]]
        assert [r[2] for r in rows] == [FINISH_STOP, FINISH_LENGTH, FINISH_STOP_STRING]
        assert rows[1][3]["logprobs"].tolist() == [-1, -2]
        assert rows[2][3]["top_logprob_ids"].tolist() == [[7]]
        np.testing.assert_array_equal(cf.prompt_logprobs(0, 5), [np.nan, -3, -4, np.nan, -2])
    with h5py.File(out, "r") as f:
        assert f["n"][:].tolist() == [2, 1]


def test_settings_datasets_and_digest(tmp_path: Path) -> None:
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    write_prompts(a, [[1, 2], [3]])
    write_prompts(b, [[1, 2], [3]], temperature=[math.nan, math.nan])
    with PromptFile(a) as pa, PromptFile(b) as pb:
        sa, sb = pa.validate(10, 100), pb.validate(10, 100)
        assert sa.n_rows(3) == 6 and sa.max_logprobs == -1
        settings = [s for _, _, s in pb.iter_requests()]
    assert sa.sha256 != sb.sha256  # a settings dataset is part of the prompts' identity
    assert settings[0].temperature is None
    write_prompts(b, [[1, 2], [3]], top_p=[0.5, 2.0])
    with PromptFile(b) as pb, pytest.raises(Exception, match=r"prompt 1 has top_p 2\.0"):
        pb.validate(10, 100)
    write_prompts(b, [[1, 2], [3]], stop=['["a"]', "nope"])
    with PromptFile(b) as pb, pytest.raises(Exception, match=r"prompt 1 has stop 'nope'"):
        pb.validate(10, 100)


def test_staged_messages_equal_one_by_one_and_need_no_gather() -> None:
    """Tier 1 ships a layer's messages together (Work.encode_all): every message is
    byte for byte what Work.encode makes alone; owners' decode rows cut from one packed q/k/v
    tensor lie back to back, so they are staged as one run (no gather); and packed_qkv finds that
    layout without a copy, in inference mode too."""
    H, KV, D = 4, 2, 3
    g = torch.Generator().manual_seed(1)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            qkv = torch.randn(7, H + 2 * KV, D, generator=g)
            q, k, v = split_qkv(qkv, H)
            assert packed_qkv(q[2:5], k[2:5], v[2:5]).data_ptr() == qkv[2].data_ptr()
            assert torch.equal(packed_qkv(q.clone(), k, v), qkv)  # separate tensors: one cat
            kf, vf = torch.randn(3, KV, D, generator=g), torch.randn(3, KV, D, generator=g)
            works = [Work(0, 2, [1, 2], [5, 6], [], [], q[0:2], k[0:2], v[0:2], [], []),
                     Work(0, 2, [3, 4, 0], [5, 6, 7], [8], [3], q[2:5], k[2:5], v[2:5], [kf],
                          [vf]),
                     Work(0, 2, [9, 10], [1, 2], [], [], q[5:7], k[5:7], v[5:7], [], [])]
            wire = WireFormat(torch.float32)
            staged = Work.encode_all(works, wire, [wire.alloc] * 3)
            for w, msg in zip(works, staged):
                assert np.array_equal(msg, w.encode(wire))
                back = Work.decode(wire, msg, H, KV, D)
                assert torch.equal(back.q, w.q) and torch.equal(back.v, w.v)
            runs = coalesce([p for w in works for p in w.parts()])
            assert len(runs) == 4  # rows of owners 1-2 | kf | vf | rows of owner 3
            assert runs[0].data_ptr() == qkv.data_ptr() and runs[0].numel() == 5 * (H + 2 * KV) * D
