"""`ghmpi prepare` and `ghmpi export` with a real BPE tokenizer trained here, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer

from ghmpi.cli import main
from ghmpi.errors import InputError, ModelError
from ghmpi.io.completions import FINISH_LENGTH, FINISH_STOP, CompletionStore
from ghmpi.io.prompts import PromptFile
from ghmpi.io.text import export, prepare

CORPUS = """The quick brown fox jumps over the lazy dog.
Every prompt becomes a list of token ids, and every completion a list of new ids.
Offline batch inference reads many prompts and writes their completions to a file.
A tokenizer turns text into ids; the model turns ids into more ids.
Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich.
""" * 20
CHAT = ("{{ bos_token }}{% for m in messages %}{{ '[' + m['role'] + '] ' + m['content'] + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder with just a tokenizer: byte-level BPE, <s>/</s>, a chat template."""
    d = tmp_path_factory.mktemp("model")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS.splitlines(), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": CHAT}))
    return d


@pytest.fixture(scope="module")
def hf(model_dir: Path):
    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


def prompts_of(path: Path) -> list[tuple[list[int], int | None]]:
    with PromptFile(path) as pf:
        return [(t.tolist(), m) for _, t, m in pf.iter_prompts()]


TEXTS = ["The quick brown fox", "  leading spaces and trailing  ", "Zwölf Boxkämpfer über ids",
         "x", "A tokenizer turns text into ids; the model turns ids into more ids."]


def test_prepare_txt_through_cli(tmp_path: Path, model_dir: Path, hf, capsys) -> None:
    src = tmp_path / "p.txt"
    src.write_text(f"{TEXTS[0]}\n\n{TEXTS[1]}\r\n   \n" + "\n".join(TEXTS[2:]) + "\n",
                   encoding="utf-8")
    out = tmp_path / "p.h5"
    assert main(["prepare", str(src), "-m", str(model_dir), "-o", str(out)]) == 0
    assert "5 prompts" in capsys.readouterr().out
    got = prompts_of(out)
    assert got == [(hf(t)["input_ids"], None) for t in TEXTS]
    assert all(ids[0] == hf.bos_token_id for ids, _ in got)  # this tokenizer adds BOS itself
    with h5py.File(out, "r") as f:
        assert set(f) == {"tokens", "offsets"}  # no max_new_tokens unless asked
        assert f.attrs["source"] == str(src) and f.attrs["tokenizer"] == str(model_dir)
        assert f["tokens"].compression == "gzip" and f["tokens"].shuffle
    # --no-add-bos: plain ids; --add-bos: BOS once, never doubled; --max-new-tokens: stored
    main(["prepare", str(src), "-m", str(model_dir), "-o", str(out), "--no-add-bos"])
    assert prompts_of(out) == [(hf(t, add_special_tokens=False)["input_ids"], None) for t in TEXTS]
    main(["prepare", str(src), "-m", str(model_dir), "-o", str(out), "--add-bos",
          "--max-new-tokens", "9"])
    assert prompts_of(out) == [(hf(t)["input_ids"], 9) for t in TEXTS]


def test_prepare_jsonl_chat_and_max_new_tokens(tmp_path: Path, model_dir: Path, hf) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi fox"}]
    lines = [{"prompt": "The lazy dog", "max_new_tokens": 3, "id": "a"},
             {"messages": msgs, "max_new_tokens": 5},
             {"prompt": "over the"}]
    src = tmp_path / "p.jsonl"
    src.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n\n")
    out = tmp_path / "p.h5"
    stats = prepare(src, model_dir, out, max_new_tokens=7)
    chat = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert chat == "<s>[system] Be brief.\n[user] Hi fox\n[assistant] "
    expect = [(hf("The lazy dog")["input_ids"], 3),
              (hf(chat, add_special_tokens=False)["input_ids"], 5),  # template's own BOS only
              (hf("over the")["input_ids"], 7)]  # the flag fills lines without a value
    assert prompts_of(out) == expect
    assert stats.n_prompts == 3 and stats.max_max_new_tokens == 7
    # --chat: plain prompts become one user message; --no-add-bos strips the template's BOS
    prepare(src, model_dir, out, chat=True, max_new_tokens=7, add_bos=False)
    user = hf.apply_chat_template([{"role": "user", "content": "over the"}],
                                  add_generation_prompt=True, tokenize=False)
    assert prompts_of(out)[2] == (hf(user, add_special_tokens=False)["input_ids"][1:], 7)
    # without the flag, lines lacking max_new_tokens take the job's value (stored as 0)
    prepare(src, model_dir, out)
    assert [m for _, m in prompts_of(out)] == [3, 5, None]
    with h5py.File(out, "r") as f:
        assert f["max_new_tokens"][:].tolist() == [3, 5, 0]


def bad_inputs(tmp_path: Path) -> list[tuple[str, str, type, str]]:
    """(file name, content, error type, regex) for every malformed input."""
    return [
        ("bad.jsonl", '{"prompt": "ok"}\n\n{"prompt": oops}\n', InputError,
         r"bad\.jsonl, line 3: bad JSON"),
        ("list.jsonl", '["prompt"]\n', InputError, r"line 1: expected a JSON object"),
        ("neither.jsonl", '{"prompt": "a"}\n{"text": "b"}\n', InputError,
         r"line 2: needs exactly one of \"prompt\" or \"messages\""),
        ("both.jsonl", '{"prompt": "a", "messages": []}\n', InputError, r"line 1: needs exactly"),
        ("notstr.jsonl", '{"prompt": 5}\n', InputError, r"line 1: \"prompt\" must be a string"),
        ("msgs.jsonl", '{"prompt": "a"}\n{"messages": [{"role": "user"}]}\n', InputError,
         r"line 2: \"messages\" must be a non-empty list"),
        ("mnt.jsonl", '{"prompt": "a", "max_new_tokens": 0}\n', InputError,
         r"line 1: \"max_new_tokens\" must be an integer >= 1, got 0"),
        ("alias.jsonl", '{"prompt": "a", "max_new_tokens": 3, "max_tokens": 4}\n', InputError,
         r"line 1: \"max_new_tokens\" \(3\) and its alias \"max_tokens\" \(4\) differ"),
        ("temp.jsonl", '{"prompt": "a", "temperature": -1}\n', InputError,
         r"line 1: \"temperature\" must be a number >= 0, got -1"),
        ("topp.jsonl", '{"prompt": "a", "top_p": 0}\n', InputError,
         r"line 1: \"top_p\" must be a number in \(0, 1\]"),
        ("n.jsonl", '{"prompt": "a", "n": 0}\n', InputError, r"line 1: \"n\" must be an integer"),
        ("stop.jsonl", '{"prompt": "a", "stop": [""]}\n', InputError,
         r"line 1: \"stop\" must be a non-empty string or a list"),
        ("batch.jsonl", '{"custom_id": "x", "url": "/v1/embeddings", "body": {"input": "a"}}\n',
         InputError, r"line 1: url '/v1/embeddings' is not"),
        ("mntbool.jsonl", '{"prompt": "a", "max_new_tokens": true}\n', InputError,
         r"line 1: \"max_new_tokens\" must be an integer"),
        ("empty.txt", "\n  \n", InputError, r"empty\.txt: holds no prompts"),
        ("latin1.txt", "ok\ncaf\xe9\n".encode("latin-1"), InputError,
         r"latin1\.txt, line 2: not UTF-8"),
        ("prompts.csv", "a,b\n", InputError, r"unknown format '\.csv'"),
    ]


def test_prepare_errors_name_file_and_line(tmp_path: Path, model_dir: Path) -> None:
    out = tmp_path / "out.h5"
    for name, content, err, regex in bad_inputs(tmp_path):
        path = tmp_path / name
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        with pytest.raises(err, match=regex):
            prepare(path, model_dir, out)
        assert not out.exists() and not Path(str(out) + ".tmp").exists(), name
    good = tmp_path / "good.txt"
    good.write_text("hello\n")
    with pytest.raises(InputError, match=r"missing\.txt: no such file"):
        prepare(tmp_path / "missing.txt", model_dir, out)
    with pytest.raises(ModelError, match=r"model folder .*nomodel: no such folder"):
        prepare(good, tmp_path / "nomodel", out)
    (tmp_path / "emptymodel").mkdir()
    with pytest.raises(ModelError, match=r"no tokenizer"):
        prepare(good, tmp_path / "emptymodel", out)
    with pytest.raises(InputError, match=r"folder .* does not exist"):
        prepare(good, model_dir, tmp_path / "no" / "out.h5")
    nochat = tmp_path / "nochat"
    nochat.mkdir()
    (nochat / "tokenizer.json").write_bytes((model_dir / "tokenizer.json").read_bytes())
    (nochat / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}))
    with pytest.raises(ModelError, match=r"no chat_template \(needed for input .*good\.txt, line 1\)"):
        prepare(good, nochat, out, chat=True)


def test_cli_error_is_one_line_exit_2(tmp_path: Path, model_dir: Path, capsys) -> None:
    src = tmp_path / "bad.jsonl"
    src.write_text('{"prompt": "a"}\n{oops\n')
    code = main(["prepare", str(src), "-m", str(model_dir), "-o", str(tmp_path / "o.h5")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("ghmpi: error: ") and err.count("\n") == 1 and "line 2" in err


def write_completions(path: Path, completions: list[tuple[list[int], int]]) -> None:
    store = CompletionStore(path, len(completions), "test-job", flush_every=2)
    for i in reversed(range(len(completions))):  # any order: the file is in prompt order
        store.add(i, *completions[i])
    store.finalize({"model": "test"})


def test_export_round_trip(tmp_path: Path, model_dir: Path, hf, capsys) -> None:
    src = tmp_path / "p.txt"
    src.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    prompts = tmp_path / "p.h5"
    assert main(["prepare", str(src), "-m", str(model_dir), "-o", str(prompts)]) == 0
    eos = hf.eos_token_id
    replies = ["jumps over the lazy dog.", " über den Deich", "", "ids", "more ids"]
    completions = []
    for i, text in enumerate(replies):
        ids = hf(text, add_special_tokens=False)["input_ids"]
        completions.append((ids + [eos], FINISH_STOP) if i % 2 == 0 else (ids, FINISH_LENGTH))
    out_h5 = tmp_path / "c.h5"
    write_completions(out_h5, completions)
    out = tmp_path / "c.jsonl"
    assert main(["export", str(out_h5), "-p", str(prompts), "-m", str(model_dir),
                 "-o", str(out)]) == 0
    assert "5 lines" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["index"] for r in rows] == list(range(5))
    assert [r["prompt"] for r in rows] == TEXTS  # BOS left out of the text
    assert [r["completion"] for r in rows] == replies  # EOS left out of the text
    assert [r["token_ids"] for r in rows] == [c[0] for c in completions]  # EOS kept in the ids
    assert [r["finish_reason"] for r in rows] == ["stop", "length"] * 2 + ["stop"]
    # the vlen prompts layout reads the same
    vlen = tmp_path / "v.h5"
    with h5py.File(vlen, "w") as f:
        ds = f.create_dataset("prompts", (5,), dtype=h5py.vlen_dtype(np.int32))
        for i, (ids, _) in enumerate(prompts_of(prompts)):
            ds[i] = ids
    export(out_h5, vlen, model_dir, tmp_path / "v.jsonl")
    assert (tmp_path / "v.jsonl").read_text(encoding="utf-8") == out.read_text(encoding="utf-8")


def test_export_errors(tmp_path: Path, model_dir: Path) -> None:
    src = tmp_path / "p.txt"
    src.write_text("one\ntwo\n")
    prompts = tmp_path / "p.h5"
    prepare(src, model_dir, prompts)
    three = tmp_path / "three.h5"
    write_completions(three, [([1], FINISH_LENGTH)] * 3)
    with pytest.raises(InputError, match=r"hold 3 prompts but prompts file .*p\.h5 has 2"):
        export(three, prompts, model_dir, tmp_path / "o.jsonl")
    with pytest.raises(InputError, match=r"completions file .*none\.h5: no such file"):
        export(tmp_path / "none.h5", prompts, model_dir, tmp_path / "o.jsonl")
    with pytest.raises(InputError, match=r"prompts file .*none\.h5: no such file"):
        export(three, tmp_path / "none.h5", model_dir, tmp_path / "o.jsonl")
    assert not (tmp_path / "o.jsonl").exists()
