"""prepare -> run -> export through the command line, with the shipped model's own tokenizer."""

import json

from tokenizers import Tokenizer

from e2e_jobs import MODEL, ghmpi, read_output, write_job


def test_prepare_run_export_round_trip(tmp_path):
    texts = ["The license grants you the right to copy",
             "Permission is hereby granted, free of charge, to any person",
             "You may not impose any further restrictions"]
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": t, "max_new_tokens": 5 + i}) + "\n"
                           for i, t in enumerate(texts)))
    prompts = tmp_path / "prompts.h5"
    r = ghmpi(0, "prepare", str(src), "-m", str(MODEL), "-o", str(prompts))
    assert r.returncode == 0, r.stderr

    out = tmp_path / "completions.h5"
    job = write_job(tmp_path / "job.yaml", prompts, out, generation={"max_new_tokens": 64})
    r = ghmpi(2, "-c", str(job))
    assert r.returncode == 0, r.stderr
    completions, reasons = read_output(out)
    # per-prompt max_new_tokens from the JSONL lines were carried through prepare into the run
    for i, (toks, why) in enumerate(zip(completions, reasons)):
        assert len(toks) == 5 + i or why == 1

    jsonl = tmp_path / "completions.jsonl"
    r = ghmpi(0, "export", str(out), "-p", str(prompts), "-m", str(MODEL), "-o", str(jsonl))
    assert r.returncode == 0, r.stderr
    lines = [json.loads(l) for l in jsonl.read_text().splitlines()]
    tok = Tokenizer.from_file(str(MODEL / "tokenizer.json"))
    assert [l["index"] for l in lines] == [0, 1, 2]
    for line, text, toks, why in zip(lines, texts, completions, reasons):
        assert line["prompt"].strip() == text
        assert line["token_ids"] == toks
        assert line["completion"] == tok.decode(toks, skip_special_tokens=True)
        assert line["finish_reason"] == ("stop" if why == 1 else "length")
