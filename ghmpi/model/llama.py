"""The weight-holding stages of a Llama-family decoder, on a token-packed batch.

`Transformer` holds a contiguous slice of layers (plus the embedding and/or the head if asked) and
exposes the stages the tiers run: `embed`, `pre_attention`, `post_attention`, `classify`. Attention
itself has no weights and lives in `attention.py` / `kvcache.py`. Every stage works on n tokens of
any mix of sequences, as rows of a (n, dim) matrix; only attention cares which sequence a row is in.

Numerics follow Hugging Face: RMSNorm in float32 and cast back, RoPE with float32 cos/sin, matmuls
in the weight dtype. q/k/v and gate/up projections are fused into one matmul each (the rows of the
fused weight are the checkpoint's rows, stacked), which is the same arithmetic per output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ghmpi.errors import ModelError
from ghmpi.model.args import ModelArgs
from ghmpi.model.loader import Checkpoint, layer_shapes
from ghmpi.model.rope import Rotary, apply_rope


@dataclass(slots=True)
class LayerWeights:
    attention_norm: torch.Tensor  # (dim,)  input_layernorm
    wqkv: torch.Tensor  # (q_size + 2 * kv_size, dim)  q_proj, k_proj, v_proj stacked
    bqkv: torch.Tensor | None  # (q_size + 2 * kv_size,)
    wo: torch.Tensor  # (dim, q_size)  o_proj
    bo: torch.Tensor | None  # (dim,)
    ffn_norm: torch.Tensor  # (dim,)  post_attention_layernorm
    w13: torch.Tensor  # (2 * hidden_dim, dim)  gate_proj (w1), up_proj (w3) stacked
    w2: torch.Tensor  # (dim, hidden_dim)  down_proj


def _fused_kernels(device: torch.device, dtype: torch.dtype):
    """The fused Triton elementwise kernels for a bf16/fp16 model on a GPU, else None (torch ops:
    the CPU, float32 (exact to HF), no Triton, or GHMPI_GPU_KERNEL=torch)."""
    if (device.type != "cuda" or dtype == torch.float32
            or os.environ.get("GHMPI_GPU_KERNEL") == "torch"):
        return None
    try:
        from ghmpi.kernels import triton_fused
    except Exception:
        return None
    return triton_fused


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As HF LlamaRMSNorm: normalise in float32, cast back, then scale."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


class Transformer:
    """Weights for a contiguous slice of layers, plus embedding and/or head if asked."""

    args: ModelArgs
    layers: range  # global layer indices held
    device: torch.device
    dtype: torch.dtype

    def __init__(self, args: ModelArgs, layers: range, device: torch.device, dtype: torch.dtype,
                 weights: dict[int, LayerWeights], tok_embeddings: torch.Tensor | None,
                 norm: torch.Tensor | None, output: torch.Tensor | None,
                 loaded_names: frozenset[str] = frozenset()) -> None:
        self.args = args
        self.layers = layers
        self.device = device
        self.dtype = dtype
        self.weights = weights
        self.tok_embeddings = tok_embeddings  # (vocab, dim) or None
        self.norm = norm  # (dim,) final norm, held with the head
        self.output = output  # (vocab, dim) LM head (the embedding matrix when tied) or None
        self.loaded_names = loaded_names  # checkpoint tensor names this slice read
        self.rotary = Rotary(args, device)
        self.fused = _fused_kernels(device, dtype)  # None: the torch ops (CPU, float32)

    @property
    def has_embed(self) -> bool:
        return self.tok_embeddings is not None

    @property
    def has_head(self) -> bool:
        return self.output is not None

    @classmethod
    def load(cls, path: str | os.PathLike, layers: range | None = None, embed: bool = True,
             head: bool = True, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> "Transformer":
        """Read a model folder's config and only the tensors this slice needs."""
        args = ModelArgs.from_folder(path)
        if layers is None:
            layers = range(args.n_layers)
        if not isinstance(layers, range) or layers.step != 1 or (
                len(layers) and (layers.start < 0 or layers.stop > args.n_layers)):
            raise ModelError(f"{path}: layers {layers} is not a contiguous slice of "
                             f"range(0, {args.n_layers})")
        device = torch.device(device)
        ckpt = Checkpoint(path)
        loaded: set[str] = set()

        def place(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device).to(dtype)

        weights: dict[int, LayerWeights] = {}
        for i in layers:  # one layer at a time keeps the host copy small
            shapes = layer_shapes(args, i)
            t = ckpt.load(shapes)
            loaded.update(t)
            p = f"model.layers.{i}."
            a = p + "self_attn."
            bqkv = None
            if args.qkv_bias:
                bqkv = place(torch.cat([t[a + "q_proj.bias"], t[a + "k_proj.bias"],
                                        t[a + "v_proj.bias"]]))
            weights[i] = LayerWeights(
                attention_norm=place(t[p + "input_layernorm.weight"]),
                wqkv=place(torch.cat([t[a + "q_proj.weight"], t[a + "k_proj.weight"],
                                      t[a + "v_proj.weight"]])),
                bqkv=bqkv,
                wo=place(t[a + "o_proj.weight"]),
                bo=place(t[a + "o_proj.bias"]) if args.o_bias else None,
                ffn_norm=place(t[p + "post_attention_layernorm.weight"]),
                w13=place(torch.cat([t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"]])),
                w2=place(t[p + "mlp.down_proj.weight"]),
            )
            del t

        emb_name, head_name, norm_name = "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"
        tok_embeddings = norm = output = None
        if embed or (head and args.tie_word_embeddings):
            tok_embeddings = place(ckpt.load({emb_name: (args.vocab_size, args.dim)})[emb_name])
            loaded.add(emb_name)
        if head:
            norm = place(ckpt.load({norm_name: (args.dim,)})[norm_name])
            loaded.add(norm_name)
            if args.tie_word_embeddings:
                output = tok_embeddings
            else:
                output = place(ckpt.load({head_name: (args.vocab_size, args.dim)})[head_name])
                loaded.add(head_name)
        if not embed:
            tok_embeddings = None  # a tied head keeps its own reference in `output`
        return cls(args, layers, device, dtype, weights, tok_embeddings, norm, output,
                   frozenset(loaded))

    def _layer(self, layer: int) -> LayerWeights:
        w = self.weights.get(layer)
        if w is None:
            raise ValueError(f"layer {layer} is not held by this slice (holds {self.layers})")
        return w

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (n,) long -> hidden states (n, dim) in self.dtype."""
        if self.tok_embeddings is None:
            raise ValueError("this slice was loaded without the embedding (embed=False)")
        return F.embedding(tokens, self.tok_embeddings)

    def pre_attention(self, layer: int, x: torch.Tensor, positions: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (n, dim), positions (n,) long -> q (n, n_heads, hd), k and v (n, n_kv_heads, hd):
        input RMSNorm, q/k/v projections (+bias), RoPE on q and k. `layer` is a global index."""
        w = self._layer(layer)
        a = self.args
        f = self.fused
        h = rms_norm(x, w.attention_norm, a.norm_eps) if f is None else \
            f.add_rms_norm(x, None, w.attention_norm, a.norm_eps)[1]
        qkv = F.linear(h, w.wqkv, w.bqkv)  # (n, q_size + 2 * kv_size)
        q, k, v = qkv.split([a.q_size, a.kv_size, a.kv_size], dim=-1)
        n = x.shape[0]
        q = q.view(n, a.n_heads, a.head_dim)  # (n, n_heads, head_dim)
        k = k.view(n, a.n_kv_heads, a.head_dim)  # (n, n_kv_heads, head_dim)
        v = v.reshape(n, a.n_kv_heads, a.head_dim)  # contiguous copy, so callers may keep it
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        if f is not None:
            return f.rope(q, cos, sin), f.rope(k, cos, sin), v
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def post_attention(self, layer: int, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """x (n, dim) the layer's residual input, o (n, n_heads * hd) attention output
        -> x + wo(o) + mlp(norm(x + wo(o))), shape (n, dim)."""
        w = self._layer(layer)
        f = self.fused
        if f is not None:
            h, n = f.add_rms_norm(x, F.linear(o.to(x.dtype), w.wo, w.bo), w.ffn_norm,
                                  self.args.norm_eps)
            return h + F.linear(f.silu_mul(F.linear(n, w.w13)), w.w2)
        h = x + F.linear(o.to(x.dtype), w.wo, w.bo)
        gate, up = F.linear(rms_norm(h, w.ffn_norm, self.args.norm_eps), w.w13).chunk(2, dim=-1)
        return h + F.linear(F.silu(gate) * up, w.w2)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """x (n, dim) after the last layer -> logits (n, vocab) float32 (final norm + LM head)."""
        if self.output is None or self.norm is None:
            raise ValueError("this slice was loaded without the head (head=False)")
        return F.linear(rms_norm(x, self.norm, self.args.norm_eps), self.output).float()

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Whole-model logits of ONE sequence without a cache: tokens (L,) -> (L, vocab) float32.
        For tests and debugging; needs every layer, the embedding and the head."""
        from ghmpi.model.attention import prefill_attention

        if positions is None:
            positions = torch.arange(tokens.shape[0], device=self.device)
        x = self.embed(tokens)
        for layer in self.layers:
            q, k, v = self.pre_attention(layer, x, positions)
            x = self.post_attention(layer, x, prefill_attention(q, k, v))
        return self.classify(x)
