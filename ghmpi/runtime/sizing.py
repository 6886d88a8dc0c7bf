"""How much KV cache each rank may hold, and how many sequence slots that makes.

Pure arithmetic on the model's shapes and the memory a rank reports, unit-tested without a GPU.
A GPU rank that keeps caches (the single tier, hybrid slots) gets `gpu_memory_fraction` of its
device memory, less what is already in use, the slice's weights and the activations of the
largest pass; a CPU rank gets 80 % of its node's available memory, shared evenly by the node's
ranks. An explicit `topology.kv_memory_gb` replaces both.
"""

from __future__ import annotations

from dataclasses import dataclass

from ghmpi.model.args import ModelArgs

GiB = 2**30
CPU_MEMORY_FRACTION = 0.8  # of MemAvailable, shared by the node's ranks
_SLACK = GiB  # allocator fragmentation, library workspaces (cuBLAS, FlashAttention)


@dataclass(frozen=True)
class Budget:
    """KV bytes one rank may hold, and where that number came from (for the error message)."""

    nbytes: int
    source: str


def layer_matmul_params(args: ModelArgs) -> int:
    """Weights of one layer's matrix products: the q/k/v and output projections, the MLP's three."""
    return ((args.q_size + 2 * args.kv_size) * args.dim + args.dim * args.q_size
            + 3 * args.hidden_dim * args.dim)


def weight_bytes(args: ModelArgs, n_layers: int, embed: bool, head: bool, itemsize: int) -> int:
    """Bytes of a slice's weights in the compute dtype."""
    per_layer = layer_matmul_params(args) + 2 * args.dim  # + the two norms
    table = args.vocab_size * args.dim
    tables = (embed + (head and not (embed and args.tie_word_embeddings))) * table
    return itemsize * (n_layers * per_layer + tables + args.dim)


def activation_bytes(args: ModelArgs, tokens: int, rows: int) -> int:
    """Peak activations of a pass of `tokens` tokens and `rows` sampled rows (float32-sized,
    so a bf16 job has headroom): residual, norms, q/k/v, attention output, gate/up, logits."""
    per_token = 4 * (6 * args.dim + 3 * args.hidden_dim + args.q_size + 4 * args.kv_size)
    return tokens * per_token + rows * args.vocab_size * 8 + _SLACK


def gpu_budget(args: ModelArgs, free: int, total: int, fraction: float, n_layers: int,
               embed: bool, head: bool, itemsize: int, pass_tokens: int, rows: int) -> Budget:
    """KV budget of a GPU rank from (free, total) device memory before the weights are loaded."""
    in_use = total - free
    weights = weight_bytes(args, n_layers, embed, head, itemsize)
    act = activation_bytes(args, pass_tokens, rows)
    nbytes = int(fraction * total) - in_use - weights - act
    return Budget(max(nbytes, 0), f"{fraction:g} of {total / GiB:.1f} GiB of GPU memory less "
                                  f"{weights / GiB:.1f} GiB of weights, {act / GiB:.1f} GiB of "
                                  f"activations and {in_use / GiB:.1f} GiB in use")


def cpu_budget(available: int, ranks_on_node: int) -> Budget:
    nbytes = int(CPU_MEMORY_FRACTION * available / max(ranks_on_node, 1))
    return Budget(nbytes, f"{CPU_MEMORY_FRACTION:g} of {available / GiB:.1f} GiB available on the "
                          f"node, shared by {ranks_on_node} rank(s)")


def fixed_budget(gb: float) -> Budget:
    return Budget(int(gb * GiB), f"topology.kv_memory_gb={gb:g}")


def slot_bytes(args: ModelArgs, n_layers: int, max_len: int, itemsize: int) -> int:
    """KV bytes of one sequence slot over n_layers layers (k and v)."""
    return 2 * n_layers * max_len * args.n_kv_heads * args.head_dim * itemsize


def mem_available() -> int:
    """MemAvailable of this node (Linux), else a guess from os.sysconf."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
