"""End-to-end fixtures: the prompts of the e2e jobs and Hugging Face transformers' greedy
generate on the same checkpoint, the reference every layout must equal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from e2e_jobs import MAX_NEW, MODEL, N_PROMPTS, REPO
from ghmpi.io.prompts import PromptFile, write_prompts


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory) -> Path:
    """The first N_PROMPTS shipped prompts (varied lengths), as a flat prompts file."""
    with PromptFile(REPO / "data" / "prompts.h5") as pf:
        prompts = [t for _, t, _ in pf.iter_prompts()][:N_PROMPTS]
    path = tmp_path_factory.mktemp("prompts") / "prompts.h5"
    write_prompts(path, prompts)
    return path


@pytest.fixture(scope="session")
def reference(prompts_file) -> tuple[list[list[int]], list[int]]:
    """transformers' greedy generate, one prompt at a time (no padding), float32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    with PromptFile(prompts_file) as pf:
        prompts = [t for _, t, _ in pf.iter_prompts()]
    completions, reasons = [], []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor(np.asarray(p, dtype=np.int64))[None]
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=MAX_NEW, pad_token_id=min(eos))
            new = out[0, ids.shape[1]:].tolist()
            completions.append(new)
            reasons.append(1 if new[-1] in eos else 2)
    assert 1 in reasons and 2 in reasons, "the reference should cover both EOS and length stops"
    return completions, reasons
