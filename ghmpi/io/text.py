"""`ghmpi prepare` (text -> prompts HDF5) and `ghmpi export` (completions HDF5 -> JSONL with text).

Tokenizers come from the model folder through transformers (`AutoTokenizer`, local files only).
transformers and torch are imported only when a command runs, so `python -m ghmpi --help` stays
light.

Input formats of `prepare`:
- `.txt`: one prompt per line, taken verbatim without its line break; blank lines are skipped.
- `.jsonl`: one JSON object per non-blank line, with either `"prompt": "text"` or
  `"messages": [{"role": ..., "content": ...}, ...]`, and optionally the per-prompt settings
  `"max_new_tokens"` (or its alias `"max_tokens"`), `"temperature"`, `"top_p"`, `"top_k"`,
  `"seed"`, `"n"`, `"stop"` (a string or a list), `"logprobs"` (true, or the number of top
  log-probabilities) with `"top_logprobs"`, and `"custom_id"`. Other keys are ignored.
- OpenAI batch-input `.jsonl` (what `vllm run-batch` and the OpenAI Batch API read): lines
  `{"custom_id": ..., "method": "POST", "url": "/v1/chat/completions" or "/v1/completions",
  "body": {"messages": [...] or "prompt": "...", "max_tokens" (or "max_completion_tokens"),
  "temperature", "top_p", "seed", "n", "stop", "logprobs", "top_logprobs", ...}}`; `custom_id` is
  kept for `export --format openai`.

`messages`, and every prompt when `--chat` is given, go through the chat template of the model's
tokenizer_config.json (with the generation prompt added); a plain prompt under `--chat` becomes
one user message. Otherwise text is encoded the way `tokenizer(text)` does it, so prompts start
with BOS exactly when the model's own tokenizer adds one. `--add-bos` makes every prompt start
with BOS (added once, never doubled); `--no-add-bos` makes none start with it.

Per-prompt settings go into the datasets of the same names (ghmpi/io/requests.py); a line
without a setting another line gives gets the dataset's sentinel, "use the job's value" (for
max_new_tokens, `--max-new-tokens` fills the lines without one instead).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ghmpi.errors import InputError, ModelError
from ghmpi.io import openai
from ghmpi.io.completions import (FINISH_LENGTH, FINISH_STOP, FINISH_STOP_STRING, CompletionFile,
                                  check_output_path)
from ghmpi.io.prompts import PromptFile, PromptStats, PromptWriter

__all__ = ["register", "prepare", "export", "load_tokenizer", "read_source", "SourcePrompt"]

FINISH_NAMES = {FINISH_STOP: "stop", FINISH_LENGTH: "length", FINISH_STOP_STRING: "stop"}


@dataclass(frozen=True, slots=True)
class SourcePrompt:
    line: int  # 1-based line number in the input file
    text: str | None  # a plain prompt, or None when messages are given
    messages: list[dict[str, Any]] | None  # chat messages, or None
    max_new_tokens: int | None  # per-prompt limit, or None
    settings: dict[str, Any] = field(default_factory=dict)  # dataset name -> cell (requests.py)


# ---- reading the input ---------------------------------------------------------------------------

def read_source(path: str | os.PathLike) -> Iterator[SourcePrompt]:
    """Prompts of a .txt or .jsonl file, in order. InputError names the file and line."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".txt", ".jsonl"):
        raise InputError(f"input {path}: unknown format '{ext or '(no extension)'}'; "
                         "use a .txt (one prompt per line) or .jsonl file")
    if not os.path.isfile(path):
        raise InputError(f"input {path}: no such file")
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:  # line by line, so that a bad byte is reported with its line
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise InputError(f"input {path}, line {n}: not UTF-8 text ({e.reason})") from None
            if not line.strip():
                continue
            if ext == ".txt":
                yield SourcePrompt(n, line, None, None)
            else:
                yield _parse_json_line(path, n, line)


def _parse_json_line(path: str, n: int, line: str) -> SourcePrompt:
    where = f"input {path}, line {n}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: bad JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    chat_request = None
    if "body" in obj and "custom_id" in obj:  # an OpenAI batch request
        obj, chat_request = openai.request_body(obj, where)
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt == has_messages:
        raise InputError(f"{where}: needs exactly one of \"prompt\" or \"messages\"")
    text, messages = obj.get("prompt"), obj.get("messages")
    if has_prompt and not isinstance(text, str):
        raise InputError(f"{where}: \"prompt\" must be a string")
    if has_messages:
        ok = isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in messages)
        if not ok:
            raise InputError(f"{where}: \"messages\" must be a non-empty list of "
                             "{\"role\": str, \"content\": str} objects")
    settings = openai.settings_of(obj, where)
    settings["chat"] = int(has_messages if chat_request is None else chat_request)
    mnt = settings.pop("max_new_tokens", None)
    return SourcePrompt(n, text, messages, mnt, settings)


# ---- tokenizer ---------------------------------------------------------------------------------

def load_tokenizer(model_dir: str | os.PathLike) -> Any:
    """The Hugging Face tokenizer of a local model folder (no network)."""
    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
        raise ModelError(f"model folder {model_dir}: no such folder")
    if not any(os.path.isfile(os.path.join(model_dir, f))
               for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ModelError(f"model folder {model_dir}: no tokenizer (tokenizer.json) in it")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ModelError("prepare and export need the transformers package "
                         "(pip install transformers)") from None
    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:  # transformers raises many types; all mean "cannot use this folder"
        raise ModelError(f"model folder {model_dir}: cannot load its tokenizer ({e})") from None


class _Encoder:
    """Text or messages -> token ids, with the BOS policy of `prepare`."""

    def __init__(self, tok: Any, model_dir: str, chat: bool, add_bos: bool | None) -> None:
        self.tok, self.model_dir, self.chat, self.add_bos = tok, model_dir, chat, add_bos
        self.bos = tok.bos_token_id
        if add_bos and self.bos is None:
            raise ModelError(f"model folder {model_dir}: its tokenizer has no BOS token to add "
                             "(--add-bos)")

    def __call__(self, src: SourcePrompt, where: str) -> list[int]:
        if src.messages is not None or self.chat:
            messages = src.messages or [{"role": "user", "content": src.text}]
            text = self._render(messages, where)
            special = False  # the template writes its own special tokens, as HF does
        else:
            text = src.text
            special = self.add_bos is not False
        ids = list(self.tok(text, add_special_tokens=special)["input_ids"])
        if self.add_bos and (not ids or ids[0] != self.bos):
            ids.insert(0, self.bos)
        elif self.add_bos is False and ids and ids[0] == self.bos:
            ids.pop(0)
        if not ids:
            raise InputError(f"{where}: the prompt encodes to no tokens")
        return ids

    def _render(self, messages: list[dict[str, Any]], where: str) -> str:
        if not getattr(self.tok, "chat_template", None):
            raise ModelError(f"model folder {self.model_dir}: tokenizer_config.json has no "
                             f"chat_template (needed for {where})")
        try:
            return self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # jinja2 errors from the template itself
            raise InputError(f"{where}: the chat template failed ({e})") from None


# ---- prepare -----------------------------------------------------------------------------------

def prepare(input: str | os.PathLike, model_dir: str | os.PathLike, output: str | os.PathLike,
            chat: bool = False, max_new_tokens: int | None = None, add_bos: bool | None = None,
            source_name: str | None = None, tokenizer_name: str | None = None) -> PromptStats:
    """Tokenize a .txt/.jsonl file into a prompts file (flat layout). Returns its stats.

    source_name / tokenizer_name: what the `source` / `tokenizer` attributes record
    (default: the paths as given).
    """
    input, model_dir, output = os.fspath(input), os.fspath(model_dir), os.fspath(output)
    if max_new_tokens is not None and max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    check_output_path(output)
    with_mnt, names = _datasets_needed(input, max_new_tokens)
    tok = load_tokenizer(model_dir)
    encode = _Encoder(tok, model_dir, chat, add_bos)
    attrs = {"source": source_name or input, "tokenizer": tokenizer_name or model_dir,
             "chat": int(chat), "add_bos": {None: "auto", True: "yes", False: "no"}[add_bos]}
    with PromptWriter(output, with_max_new_tokens=with_mnt, attrs=attrs, settings=names) as w:
        for src in read_source(input):
            where = f"input {input}, line {src.line}"
            mnt = src.max_new_tokens if src.max_new_tokens is not None else max_new_tokens
            w.add(encode(src, where), mnt if with_mnt else None,
                  **{k: v for k, v in src.settings.items() if k in names})
        if w.n == 0:
            raise InputError(f"input {input}: holds no prompts")
    with PromptFile(output) as pf:
        return pf.validate(vocab_size=len(tok), context_len=1 << 62)


def _datasets_needed(input: str, flag: int | None) -> tuple[bool, list[str]]:
    """(whether the output gets a max_new_tokens dataset, the other per-prompt datasets it
    gets): those some line gives (first, cheap pass over the input)."""
    with_mnt, names, chat = flag is not None, set(), False
    for src in read_source(input):
        with_mnt = with_mnt or src.max_new_tokens is not None
        names.update(k for k, v in src.settings.items() if v is not None and k != "chat")
        chat = chat or bool(src.settings.get("chat"))
    if chat or "custom_id" in names:
        names.add("chat")  # export --format openai answers chat requests as chat completions
    return with_mnt, sorted(names)


# ---- export ------------------------------------------------------------------------------------

def export(completions: str | os.PathLike, prompts: str | os.PathLike,
           model_dir: str | os.PathLike, output: str | os.PathLike, format: str = "ghmpi") -> int:
    """Write one JSON line per prompt with prompt and completion text. Returns the line count.

    format "ghmpi": `index`, `prompt`, then for one sample per prompt `completion`, `token_ids`,
    `finish_reason` (and `logprobs`, `top_logprob_ids`, `top_logprobs` when stored), for several
    `completions`: a list of such objects, one per sample; `prompt_logprobs` (null for the first
    token) and `custom_id` when stored. format "openai": the OpenAI batch-output lines of
    ghmpi/io/openai.py. Texts are decoded without special tokens (BOS, EOS); `token_ids` keeps
    every stored id.
    """
    if format not in ("ghmpi", "openai"):
        raise InputError(f"--format must be ghmpi or openai, got {format!r}")
    completions, prompts, output = os.fspath(completions), os.fspath(prompts), os.fspath(output)
    check_output_path(output)
    with PromptFile(prompts) as pf:
        with CompletionFile(completions) as cf:
            n = cf.samples_per_prompt()
            if len(n) != pf.n:
                raise InputError(f"completions {completions} hold {len(n)} prompts but prompts "
                                 f"file {prompts} has {pf.n}: not the same job")
            tok = load_tokenizer(model_dir)
            return _write_jsonl(pf, cf, n, tok, output, format)


class _Cells:
    """Per-prompt cells of a prompts file's dataset, read a block at a time."""

    def __init__(self, pf: PromptFile, name: str, block: int = 65536) -> None:
        self.pf, self.name, self.block, self.a, self.col = pf, name, block, -1, None

    def __getitem__(self, i: int) -> Any:
        if self.a < 0 or not self.a <= i < self.a + self.block:
            self.a = i - i % self.block
            self.col = self.pf.column(self.name, self.a, min(self.a + self.block, self.pf.n))
        return None if self.col is None else self.col[i - self.a]


def _nan_null(x: np.ndarray) -> list:
    return [None if math.isnan(v) else float(v) for v in x.tolist()]


def _write_jsonl(pf: PromptFile, cf: CompletionFile, n: np.ndarray, tok: Any, output: str,
                 format: str) -> int:
    """Write to `<output>.tmp`, then rename: a failed export leaves no half file."""
    tmp = output + ".tmp"
    count = 0
    rows = cf.iter_rows()
    cid, chat, asked = _Cells(pf, "custom_id"), _Cells(pf, "chat"), _Cells(pf, "logprobs")
    many = bool((n != 1).any())
    top_k = 0
    if cf.has("top_logprob_ids"):
        top_k = int(cf._f["top_logprob_ids"].shape[1])
    model = os.path.basename(os.path.normpath(str(cf.attrs.get("model_path", "ghmpi")))) or "ghmpi"
    created = int(os.path.getmtime(cf.path))
    cache: dict = {}
    p_at = 0  # start of the prompt in the prompts' flat tokens
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            for i, p_ids, _ in pf.iter_prompts():
                samples = []
                for _ in range(int(n[i])):
                    r, c_ids, reason, extra = next(rows)
                    samples.append((tok.decode(c_ids.tolist(), skip_special_tokens=True), c_ids,
                                    FINISH_NAMES.get(reason, str(reason)), extra))
                plp = cf.prompt_logprobs(p_at, p_at + len(p_ids))
                p_at += len(p_ids)
                custom = cid[i]
                if format == "openai":
                    k = asked[i]
                    k = (None if k is not None and k < 0 else k) if k is not None else (
                        top_k if cf.has("logprobs") else None)
                    record = openai.response_line(i, custom or f"request-{i}", bool(chat[i]), model,
                                                  len(p_ids), samples, tok, k, created, cache)
                else:
                    record = {"index": i,
                              "prompt": tok.decode(p_ids.tolist(), skip_special_tokens=True)}
                    if custom:
                        record["custom_id"] = custom
                    each = [_sample_record(*x) for x in samples]
                    if many:
                        record["completions"] = each
                    else:
                        record.update(each[0])
                    if plp is not None:
                        record["prompt_logprobs"] = _nan_null(plp)
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
        os.replace(tmp, output)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return count


def _sample_record(text: str, ids: np.ndarray, reason: str, extra: dict) -> dict:
    rec = {"completion": text, "token_ids": ids.tolist(), "finish_reason": reason}
    for key, value in extra.items():
        rec[key] = value.tolist()
    return rec


# ---- command line ------------------------------------------------------------------------------

def _cmd_prepare(args: argparse.Namespace) -> int:
    stats = prepare(args.input, args.model, args.output, chat=args.chat,
                    max_new_tokens=args.max_new_tokens, add_bos=args.add_bos)
    print(f"wrote {args.output}: {stats.n_prompts} prompts, {stats.n_tokens} tokens "
          f"(longest {stats.max_prompt_len}), sha256 {stats.sha256}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    n = export(args.completions, args.prompts, args.model, args.output, format=args.format)
    print(f"wrote {args.output}: {n} lines")
    return 0


def register(subparsers: "argparse._SubParsersAction") -> None:
    """Add the `prepare` and `export` subcommands to the ghmpi command line."""
    p = subparsers.add_parser(
        "prepare", help="tokenize .txt/.jsonl prompts into a prompts HDF5 file",
        description="Tokenize prompts with the model's own tokenizer into the HDF5 prompts file "
                    "the job reads.\n\n" + __doc__[__doc__.index("Input formats"):],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="prompts: .txt (one per line) or .jsonl")
    p.add_argument("-m", "--model", required=True, help="model folder holding the tokenizer")
    p.add_argument("-o", "--output", required=True, help="prompts HDF5 file to write")
    p.add_argument("--chat", action="store_true",
                   help="apply the model's chat template to every prompt")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="per-prompt limit stored in the file for lines without their own")
    p.add_argument("--add-bos", action=argparse.BooleanOptionalAction, default=None,
                   help="force (or forbid) a leading BOS token; default: as the tokenizer does")
    p.set_defaults(func=_cmd_prepare)

    e = subparsers.add_parser(
        "export", help="write completions as JSONL with decoded text",
        description="One JSON line per prompt: index, prompt (text), completion (text), "
                    "token_ids, finish_reason (\"stop\" or \"length\"), or with several samples "
                    "per prompt `completions`, a list of those; log-probabilities and custom_id "
                    "when stored. --format openai writes OpenAI batch-output lines instead. "
                    "Special tokens are left out of the texts.")
    e.add_argument("completions", help="completions HDF5 file written by a job")
    e.add_argument("-p", "--prompts", required=True, help="the job's prompts HDF5 file")
    e.add_argument("-m", "--model", required=True, help="model folder holding the tokenizer")
    e.add_argument("-o", "--output", required=True, help="JSONL file to write")
    e.add_argument("--format", choices=("ghmpi", "openai"), default="ghmpi",
                   help="ghmpi: one line per prompt with its completion(s) (a list when a prompt "
                        "has several samples); openai: OpenAI batch-output lines (custom_id, "
                        "response.body with choices and usage)")
    e.set_defaults(func=_cmd_export)

