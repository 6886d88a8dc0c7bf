"""Build the default job's data: a tiny random Llama with a real tokenizer, and sample prompts.

    .venv/bin/python data/make_default.py                  # rebuild everything from corpus.txt
    .venv/bin/python data/make_default.py --gather-corpus  # also rewrite corpus.txt (Debian only)

Deterministic: rerunning reproduces every file byte for byte (the tokenizer is trained on the
shipped corpus.txt, the weights come from a seeded torch.Generator, HDF5 stores no timestamps).
Only `tokenizers`, `torch`, `safetensors`, `h5py` and ghmpi itself are used to write files, so the
output does not depend on the installed transformers version (transformers is used by `prepare`
to read the tokenizer, and by the checks at the end).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from anywhere without installing ghmpi

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

MODEL_DIR = HERE / "tiny-llama"
CORPUS = HERE / "corpus.txt"
PROMPTS_TXT = HERE / "prompts.txt"
PROMPTS_H5 = HERE / "prompts.h5"

# Freely redistributable texts shipped by Debian's base-files (see README.md).
CORPUS_SOURCES = ["GPL-3", "GPL-2", "LGPL-2.1", "GFDL-1.3", "MPL-2.0", "Apache-2.0",
                  "Artistic", "CC0-1.0", "BSD"]

VOCAB_SIZE = 1024
BOS, EOS = "<s>", "</s>"
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] | trim + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, MAX_POS = 128, 4, 4, 2, 352, 512
HEAD_DIM = HIDDEN // HEADS
LOGIT_SCALE = 4.0  # std of the logits (in units of the normed hidden state): peaked, not noise
# The eos row of lm_head is scaled so that some greedy generations end on </s> within 64 tokens
# and others run to the length limit: the default job exercises both finish reasons.
EOS_ROW_SCALE = 1.6


def gather_corpus() -> None:
    parts = []
    for name in CORPUS_SOURCES:
        text = Path("/usr/share/common-licenses", name).read_text(encoding="ascii")
        text = text.replace("\f", "").replace("\r", "")
        parts.append(text.strip("\n") + "\n")
    CORPUS.write_text("\n\n".join(parts), encoding="utf-8")


def train_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    lines = CORPUS.read_text(encoding="utf-8").splitlines()
    tok.train_from_iterator(lines, trainer, length=len(lines))
    # Like Llama: plain encoding starts with <s>.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_tokenizer(tok: Tokenizer) -> None:
    tok.save(str(MODEL_DIR / "tokenizer.json"), pretty=True)
    write_json(MODEL_DIR / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "model_max_length": MAX_POS,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    })


def model_config(vocab: int, bos: int, eos: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POS,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "vocab_size": vocab,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def random_weights(vocab: int, eos: int) -> dict[str, torch.Tensor]:
    """Llama weights drawn from N(0, std) with a seeded generator, in a fixed order.

    std keeps activations O(1) through every layer (1/sqrt(fan_in)) rather than the tiny 0.02 of
    transformers' init, and the head is scaled so logits have std LOGIT_SCALE: greedy decoding
    then follows clear maxima (robust to bf16) instead of near-ties.
    """
    g = torch.Generator().manual_seed(0)

    def normal(shape: tuple[int, ...], std: float) -> torch.Tensor:
        return (torch.randn(shape, generator=g, dtype=torch.float32) * std).contiguous()

    kv = KV_HEADS * HEAD_DIM
    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": normal((vocab, HIDDEN), 1.0)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = normal((HEADS * HEAD_DIM, HIDDEN), 1 / math.sqrt(HIDDEN))
        w[p + "self_attn.k_proj.weight"] = normal((kv, HIDDEN), 1 / math.sqrt(HIDDEN))
        w[p + "self_attn.v_proj.weight"] = normal((kv, HIDDEN), 1 / math.sqrt(HIDDEN))
        w[p + "self_attn.o_proj.weight"] = normal((HIDDEN, HEADS * HEAD_DIM),
                                                  1 / math.sqrt(HEADS * HEAD_DIM))
        w[p + "mlp.gate_proj.weight"] = normal((INTERMEDIATE, HIDDEN), 1 / math.sqrt(HIDDEN))
        w[p + "mlp.up_proj.weight"] = normal((INTERMEDIATE, HIDDEN), 1 / math.sqrt(HIDDEN))
        w[p + "mlp.down_proj.weight"] = normal((HIDDEN, INTERMEDIATE), 1 / math.sqrt(INTERMEDIATE))
        w[p + "input_layernorm.weight"] = torch.ones(HIDDEN)
        w[p + "post_attention_layernorm.weight"] = torch.ones(HIDDEN)
    w["model.norm.weight"] = torch.ones(HIDDEN)
    head = normal((vocab, HIDDEN), LOGIT_SCALE / math.sqrt(HIDDEN))
    head[eos] *= EOS_ROW_SCALE
    w["lm_head.weight"] = head
    return w


def write_model(tok: Tokenizer) -> None:
    vocab = tok.get_vocab_size()
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    write_json(MODEL_DIR / "config.json", model_config(vocab, bos, eos))
    write_json(MODEL_DIR / "generation_config.json", {"bos_token_id": bos, "eos_token_id": eos})
    save_file(random_weights(vocab, eos), str(MODEL_DIR / "model.safetensors"),
              metadata={"format": "pt"})


def write_prompts() -> None:
    from ghmpi.io.text import prepare

    stats = prepare(PROMPTS_TXT, MODEL_DIR, PROMPTS_H5,
                    source_name="data/prompts.txt", tokenizer_name="data/tiny-llama")
    print(f"{PROMPTS_H5.name}: {stats.n_prompts} prompts, {stats.n_tokens} tokens, "
          f"longest {stats.max_prompt_len}, sha256 {stats.sha256[:16]}...")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--gather-corpus", action="store_true",
                    help="rewrite corpus.txt from /usr/share/common-licenses first")
    args = ap.parse_args(argv)
    if args.gather_corpus:
        gather_corpus()
    os.makedirs(MODEL_DIR, exist_ok=True)
    tok = train_tokenizer()
    write_tokenizer(tok)
    write_model(tok)
    write_prompts()
    return 0


if __name__ == "__main__":
    sys.exit(main())
